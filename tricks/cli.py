"""The ``tricks`` command: one entry point, one subcommand per job.

Each subcommand imports what it needs when it runs, so ``tricks backbones`` never imports the
trainer, and detectron2/mmseg are imported only by the commands that use them.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Optional, Sequence

# Table 5 of the paper (ImageNet, ResNet-50 variants), printed beside our measured counts.
PAPER_TABLE5 = {
    "resnet50": ("25M", "3.86G", "76.21", "92.97"),
    "resnet50b": ("25M", "4.36G", "76.66", "93.28"),
    "resnet50c": ("25M", "4.35G", "76.87", "93.48"),
    "resnet50d": ("25M", "4.35G", "77.16", "93.52"),
}


def _table(rows: list[Sequence[str]], header: Sequence[str], left: Sequence[int] = (0,)) -> str:
    """Plain-text table; columns in ``left`` are left-aligned, the others (numbers) right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i in left else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def cmd_backbones(args: argparse.Namespace) -> int:
    from backbones import get_builder, list_backbones, profile_backbone

    if args.table5:
        rows = []
        for name, paper in PAPER_TABLE5.items():
            prof = profile_backbone(name)
            rows.append((name, f"{prof['params'] / 1e6:.2f}M", f"{prof['macs'] / 1e9:.2f}G", *paper))
        print("Table 5 (ResNet-50 tweaks): parameters and multiply-adds measured by torch.utils.flop_counter "
              "at 3x224x224,\nbeside the paper's reported numbers (its FLOPs are multiply-adds).\n")
        print(_table(rows, ("model", "params", "GMACs", "paper params", "paper FLOPs", "paper top-1", "paper top-5")))
        return 0
    names = [n for n in list_backbones() if not args.filter or args.filter in n]
    rows = []
    for name in names:
        prof = profile_backbone(name)
        doc = (get_builder(name).__doc__ or "").strip().splitlines()[0]
        size = "x".join(map(str, prof["input_size"][1:]))
        rows.append((name, f"{prof['params'] / 1e6:.2f}M", f"{prof['macs'] / 1e9:.2f}G", size, doc))
    print(_table(rows, ("name", "params", "GMACs", "input", "description"), left=(0, 4)))
    return 0


def _add_backbones(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backbones", help="list the backbone registry with parameters and multiply-adds")
    p.add_argument("--table5", action="store_true", help="print the paper's Table 5 layout (ResNet-50 variants)")
    p.add_argument("--filter", default="", help="only names containing this string")
    p.set_defaults(func=cmd_backbones)


def _setup_logging() -> None:
    import os

    rank = os.environ.get("RANK", "0")
    root = logging.getLogger()
    if not root.handlers:  # as logging.basicConfig: a handler the user (or pytest) set up wins
        root.setLevel(logging.INFO if rank == "0" else logging.WARNING)
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)


class _CurrentStderrHandler(logging.StreamHandler):
    """A console handler writing to the ``sys.stderr`` of the moment, not the one it was made with (a second
    ``tricks`` call in one process, from a test or a notebook, may have swapped it since)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _split_config(path: Optional[str], overrides: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """``CONFIG`` is optional: ``tricks train model.name=resnet18d ...`` starts from the defaults."""
    if path is not None and "=" in path and not path.endswith((".yaml", ".yml")):
        return None, [path, *overrides]
    return path, list(overrides)


# task -> (schema "module:Class", {engine: ("module", train function, eval function)})
TASKS: dict[str, tuple[str, dict[str, tuple[str, str, str]]]] = {
    "classification": ("classification.config:Config", {"torch": ("classification.train", "train", "evaluate_checkpoint")}),
    "detection": ("detection.config:DetectionConfig", {
        "torch": ("detection.train", "train_detector", "evaluate_checkpoint"),
        "detectron2": ("detection.d2_engine", "train", "evaluate")}),
    "segmentation": ("segmentation.config:SegmentationConfig", {
        "torch": ("segmentation.train", "train", "evaluate_checkpoint"),
        "mmseg": ("segmentation.mmseg_engine", "train", "evaluate")}),
}


def load_task_config(path: Optional[str], overrides: Sequence[str]):
    """The config of ``path`` + overrides in the schema of its ``task`` key (classification if unset)."""
    import importlib

    from runtime.config import ConfigError, load_config, read_top_level

    path, overrides = _split_config(path, overrides)
    task = read_top_level(path, overrides, "task") or "classification"
    if task not in TASKS:
        raise ConfigError(f"task={task!r} ({path or 'command line'}): one of {', '.join(TASKS)}")
    module, cls = TASKS[task][0].split(":")
    cfg = load_config(path, getattr(importlib.import_module(module), cls), overrides)
    check_run_lengths(cfg, path)
    return cfg


# Counts every engine needs to be at least 1 (the keys a task's schema has).
_POSITIVE_KEYS = ("train.batch_size", "train.epochs", "train.max_iter", "train.accum_steps")


def check_run_lengths(cfg, path: Optional[str] = None) -> None:
    """Batch size, run length and accumulation >= 1, and a warm-up no longer than the run: checked on the
    config, so the error names the key (an inner function would only see its own argument names)."""
    from runtime.config import ConfigError

    where = path or "command line"
    for key in _POSITIVE_KEYS:
        section, _, name = key.partition(".")
        value = getattr(getattr(cfg, section, None), name, None)
        if value is not None and value < 1:
            raise ConfigError(f"{key}={value} ({where}): must be at least 1")
    t, o = cfg.train, cfg.optim
    for warmup_key, length_key in (("warmup_iters", "max_iter"), ("warmup_epochs", "epochs")):
        warmup, length = getattr(o, warmup_key, None), getattr(t, length_key, None)
        if warmup is not None and length is not None and not 0 <= warmup <= length:
            raise ConfigError(f"optim.{warmup_key}={warmup} ({where}): must be in [0, train.{length_key}={length}]")


def _engine(cfg, verb: str) -> Callable:
    """The train (``verb="train"``) or eval function of the config's task and engine (imported lazily)."""
    import importlib

    engine = getattr(cfg, "engine", "torch")
    module, train_fn, eval_fn = TASKS[cfg.task][1][engine]
    return getattr(importlib.import_module(module), train_fn if verb == "train" else eval_fn)


def _report(cfg, metrics: dict) -> None:
    """The result of a run or an evaluation as the task reports it (nothing for an empty result: the ranks
    other than the main one under the detectron2 engine, which scores on the main rank)."""
    if not metrics:
        return
    if cfg.task == "classification":
        if "top1" in metrics:
            print(f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  ({metrics['images']} images)")
    elif cfg.task == "detection":
        import math

        from detection.cli import without_ground_truth_note
        from detection.coco_eval import describe_metrics

        print(_table([(name, "no ground truth" if math.isnan(ap) else f"{ap:.2f}") for name, ap in
                      metrics["AP"].items()], ("class", "AP %")))
        print(f"{describe_metrics(metrics)}  ({metrics.get('images', '?')} images)")
        for line in without_ground_truth_note(metrics["AP"], "test"):
            print(line)
    else:  # the engines log their per-class IoU tables
        print(f"mIoU {metrics['mIoU']:.2f}%  mAcc {metrics['mAcc']:.2f}%  aAcc {metrics['aAcc']:.2f}%")


def run_config(cfg) -> dict:
    """Train ``cfg`` with its task's engine, print the result; returns the engine's final metrics."""
    metrics = _engine(cfg, "train")(cfg)
    _report(cfg, metrics)
    print(f"-> {cfg.output_dir}")
    return metrics


def cmd_train(args: argparse.Namespace) -> int:
    from runtime.errors import check_writable_dir

    _setup_logging()
    cfg = load_task_config(args.config, args.overrides)
    check_writable_dir(cfg.output_dir, "output_dir")  # before any work, not when the first file is written
    run_config(cfg)
    return 0


def _eval_arguments(args: argparse.Namespace) -> tuple[Optional[str], str, list[str]]:
    """``CONFIG CHECKPOINT key=value ...`` in any order after the config: the one word without ``=`` that
    is not the config is the checkpoint, the others are overrides."""
    from runtime.errors import UserError

    checkpoint_suffixes = (".pth", ".pt", ".pkl", ".safetensors")
    words = [w for w in (args.config, args.checkpoint, *args.overrides) if w is not None]
    config = None
    if words and (words[0].endswith((".yaml", ".yml")) or not ("=" in words[0] or words[0].endswith(checkpoint_suffixes))):
        config, words = words[0], words[1:]
    paths = [w for w in words if "=" not in w or w.endswith(checkpoint_suffixes)]
    if len(paths) != 1:
        raise UserError("tricks eval CONFIG CHECKPOINT [key=value ...]: "
                        + (f"{len(paths)} checkpoints given ({', '.join(paths)}); give one" if paths else
                           "no CHECKPOINT given (a .pth or .safetensors file)"))
    return config, paths[0], [w for w in words if w != paths[0]]


def cmd_eval(args: argparse.Namespace) -> int:
    from runtime.errors import UserError, check_writable_dir

    _setup_logging()
    config, checkpoint, overrides = _eval_arguments(args)
    cfg = load_task_config(config, overrides)
    coco = cfg.task == "detection" and getattr(cfg.data, "format", "voc") == "coco"
    if args.write_results and cfg.task != "detection":
        raise UserError("--write-results: only detection runs (either engine) write results (the VOC results "
                        "format, or COCO results JSON for data.format=coco)")
    check_writable_dir(cfg.output_dir, "output_dir")  # pictures and overlays go there after the evaluation
    if args.write_results:  # found now, not after the whole evaluation
        check_writable_dir(args.write_results, "--write-results")
    metrics = _engine(cfg, "eval")(cfg, checkpoint)
    _report(cfg, metrics)
    if cfg.task == "classification" and "loss" in metrics:
        print(f"loss {metrics['loss']:.4f}")
    if args.write_results and metrics and coco:
        from pathlib import Path

        from detection.coco_eval import write_coco_results

        path = write_coco_results(Path(args.write_results) / "coco_results.json", metrics["results"])
        print(f"wrote {len(metrics['results'])} detections in the COCO results format to {path}")
    elif args.write_results and metrics:
        from detection.voc_eval import write_voc_results

        split = cfg.data.test_splits.split("+")[0].partition("-")[2]
        files = write_voc_results(args.write_results, metrics["detections"], list(metrics["AP"]), split=split)
        print(f"wrote {len(files)} result files (comp4_det_{split}_<class>.txt) to {args.write_results}")
    return 0


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of seeds, epochs, steps, images)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: needs to be at least 1")
    return value


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole pipeline on the embedded real data (Fashion-MNIST from the Debian package): tricks/demo.py."""
    from tricks.demo import check_demo, run_demo

    _setup_logging()
    check_demo(args.out, args.overrides, args.stages.split(","))  # before the first line of output
    print("== backbones: Table 5 ==")
    cmd_backbones(argparse.Namespace(table5=True, filter=""))
    run_demo(args.out, args.overrides, stages=args.stages.split(","), scenes=tuple(args.scenes))
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """The paper's tables at small scale with seeds: tricks/reproduce.py."""
    from tricks.reproduce import reproduce

    _setup_logging()
    try:  # an unknown table or net is a UsageError (status 2, from main)
        reproduce(args.tables, args.out, seeds=args.seeds, epochs=args.epochs, iters=args.iters,
                  nets=args.nets.split(","), run=not args.report_only)
    except RuntimeError as e:  # rows that failed, after all the others ran: status 1
        if not str(e).startswith("tricks reproduce"):
            raise
        raise SystemExit(str(e)) from None
    return 0


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="the paper's Tables 3-6, 8, 9 at small scale with seeds, beside the paper's "
                       "numbers (resumable): tricks reproduce table5 [table4 ...|all]")
    p.add_argument("tables", nargs="+", metavar="TABLE", help="table3, table4, table5, table6, table8, table9 or all")
    p.add_argument("--seeds", type=_positive_int, default=3, help="seeds per row (default 3)")
    p.add_argument("--epochs", type=_positive_int, help="shorten: classification rows scaled from 2 epochs to this many")
    p.add_argument("--iters", type=_positive_int, help="shorten: at most this many optimizer steps per run")
    p.add_argument("--out", default="runs/reproduce", help="records/, runs/, data/ and <table>.md/.png go here")
    p.add_argument("--nets", default="resnet,mobilenet", help="networks of Tables 3 and 6: resnet,mobilenet[,inception]"
                   " (Inception-V3 at 75 px costs about 3x a ResNet row)")
    p.add_argument("--report-only", action="store_true", help="write the tables from the records present, run nothing")
    p.set_defaults(func=cmd_reproduce)


def _tasks_epilog() -> str:
    tasks = "; ".join(f"{task} (engines: {', '.join(engines)})" for task, (_, engines) in TASKS.items())
    return f"tricks train / eval run every task; the config's `task` and `engine` keys pick the trainer. Tasks: {tasks}."


def _add_run_commands(sub: argparse._SubParsersAction) -> None:
    epilog = _tasks_epilog()
    p = sub.add_parser("train", help="train: tricks train CONFIG [key=value ...] (classification, detection, "
                       "segmentation)", epilog=epilog)
    p.add_argument("config", help="YAML file (configs/<task>/...), or the first key=value to start from defaults")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=2 optim.lr=0.2")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="evaluate a checkpoint: tricks eval CONFIG CHECKPOINT [key=value ...]",
                       epilog=epilog)
    p.add_argument("config")
    p.add_argument("checkpoint", nargs="?", help="classification: .pth/.safetensors (suite, timm, torchvision); detection / "
                   "segmentation: model_final.pth or last.pth of a run (mmseg/detectron2: their checkpoints)")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--write-results", metavar="DIR", help="detection: also write the detections in the VOC results "
                   "format (comp4_det_<split>_<class>.txt) for tricks voc-eval, or with data.format=coco in the "
                   "COCO results format (DIR/coco_results.json) for tricks coco-eval")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("demo", help="the main job: pretrain on the embedded Fashion-MNIST, fine-tune for "
                       "segmentation and detection, write a report")
    p.add_argument("overrides", nargs="*", help="<stage>.<key>=<value> overrides of a stage's config, e.g. "
                   "classification.train.epochs=12 segmentation.train.max_iter=1000")
    p.add_argument("--out", default="runs/demo", help="output folder: one folder per stage, data/, REPORT.md")
    p.add_argument("--stages", default="classification,segmentation,detection",
                   help="comma-separated stages to run (transfer stages reuse <out>/classification)")
    p.add_argument("--scenes", type=_positive_int, nargs=2, default=[2000, 500], metavar=("TRAIN", "TEST"),
                   help="scenes written for each transfer set")
    p.set_defaults(func=cmd_demo)


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="write the embedded datasets (Fashion-MNIST scenes) in ADE20K / VOC layouts; "
                          "convert detection data between VOC and COCO")
    kinds = data.add_subparsers(dest="data_command", required=True, metavar="DATASET")
    scenes = kinds.add_parser("fashion-scenes", help="Fashion-MNIST scenes in the ADE20K layout (segmentation)")
    scenes.add_argument("--out", required=True, help="the ADEChallengeData2016 folder to write")
    scenes.add_argument("--train", type=_positive_int, default=2000)
    scenes.add_argument("--val", type=_positive_int, default=500)
    scenes.add_argument("--seed", type=int, default=0)
    scenes.add_argument("--size", type=_positive_int, nargs=2, default=[128, 128], metavar=("H", "W"))
    scenes.set_defaults(func=_run_fashion_scenes)
    voc = kinds.add_parser("fashion-voc", help="Fashion-MNIST scenes in the VOCdevkit layout (detection)")
    voc.add_argument("--out", required=True, help="the folder to hold VOCdevkit/")
    voc.add_argument("--train", type=_positive_int, default=2000)
    voc.add_argument("--test", type=_positive_int, default=500)
    voc.add_argument("--seed", type=int, default=0)
    voc.add_argument("--size", type=_positive_int, nargs=2, default=[128, 128], metavar=("H", "W"))
    voc.set_defaults(func=_run_fashion_voc)
    # detection/convert.py: VOC 1-based inclusive corners <-> COCO 0-based [x, y, w, h], exact
    to_coco = kinds.add_parser("voc2coco", help="VOC-layout splits -> a COCO instances JSON (detection/convert.py)")
    to_coco.add_argument("--devkit", required=True, help="the VOCdevkit folder (or its parent)")
    to_coco.add_argument("--splits", required=True, help="e.g. 2007-trainval+2012-trainval or 2007-test")
    to_coco.add_argument("--out", required=True, help="the instances JSON to write")
    names = to_coco.add_mutually_exclusive_group()
    names.add_argument("--classes", metavar="A,B,...", help="class names (category ids 1..N); default the 20 VOC")
    names.add_argument("--classes-file", metavar="FILE", help="file with one class name per line")
    to_coco.set_defaults(func=_run_voc2coco)
    to_voc = kinds.add_parser("coco2voc", help="a COCO instances JSON + images -> the VOCdevkit layout")
    to_voc.add_argument("--gt", required=True, metavar="ANNOTATIONS.json", help="COCO instances JSON")
    to_voc.add_argument("--images", required=True, help="the folder its file_name entries are relative to")
    to_voc.add_argument("--out", required=True, help="the folder to hold VOCdevkit/")
    to_voc.add_argument("--year", default="2007", help="VOC<year> folder to write (default 2007)")
    to_voc.add_argument("--split", default="train", help="ImageSets/Main/<split>.txt to write (default train)")
    to_voc.set_defaults(func=_run_coco2voc)


def _run_voc2coco(args: argparse.Namespace) -> int:
    from detection.convert import run_voc2coco

    classes = args.classes_file or ([n.strip() for n in args.classes.split(",")] if args.classes else None)
    try:
        print(run_voc2coco(args.devkit, args.splits, args.out, classes))
    except (ValueError, OSError) as e:  # VOCFormatError is a ValueError; a folder given for a file: OSError
        print(f"voc2coco: error: {e}", file=sys.stderr)
        return 2
    return 0


def _run_coco2voc(args: argparse.Namespace) -> int:
    from detection.convert import coco_to_voc

    try:
        counts = coco_to_voc(args.gt, args.images, args.out, args.year, args.split)
    except (ValueError, OSError) as e:  # COCOFormatError is a ValueError; a folder given for a file: OSError
        print(f"coco2voc: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {counts['images']} images ({counts['reencoded']} re-encoded as JPEG), {counts['objects']} objects "
          f"to {args.out}/VOCdevkit/VOC{args.year} (split {args.year}-{args.split}; data.classes: "
          f"{args.out}/VOCdevkit/classes.txt)")
    return 0


def _run_fashion_scenes(args: argparse.Namespace) -> int:
    from segmentation.scenes import write_fashion_scenes

    out = write_fashion_scenes(args.out, args.train, args.val, canvas=args.size, seed=args.seed)
    print(f"wrote {args.train} training and {args.val} validation scenes to {out} "
          "(data.root; num_classes 11, reduce_zero_label true)")
    return 0


def _run_fashion_voc(args: argparse.Namespace) -> int:
    from detection.scenes import write_fashion_voc

    devkit = write_fashion_voc(args.out, args.train, args.test, canvas=args.size, seed=args.seed)
    print(f"wrote {args.train} trainval and {args.test} test scenes to {devkit} "
          f"(splits 2007-trainval / 2007-test; classes {devkit / 'classes.txt'})")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    from tricks.export import add_subcommand

    add_subcommand(sub)


def _add_task_tools(sub: argparse._SubParsersAction) -> None:
    from detection.cli import add_subcommands as add_detection_tools
    from segmentation.cli import add_subcommands as add_segmentation_tools

    add_detection_tools(sub)      # voc-eval
    add_segmentation_tools(sub)   # seg-eval


def cmd_bench(args: argparse.Namespace) -> int:
    """Every speed comparison against the reference libraries, one method: benchmarks/bench.py."""
    from benchmarks.bench import ENGINE_TASKS, GROUPS, QUICK_TASKS, check_groups, run_bench

    from runtime.errors import UsageError

    groups = args.only.split(",") if args.only else list(GROUPS)
    check_groups(groups)  # a UsageError, as the two below: one line and status 2 (main)
    tasks = args.tasks.split(",") if args.tasks else list(QUICK_TASKS if args.quick else ENGINE_TASKS)
    if not set(tasks) <= set(ENGINE_TASKS):
        raise UsageError(f"--tasks {args.tasks}: the engine rows' tasks are {', '.join(ENGINE_TASKS)}")
    if args.rounds is not None and args.rounds < 1 or args.threads is not None and args.threads < 1:
        raise UsageError("--rounds and --threads must be >= 1")
    _setup_logging()
    command = ("tricks bench" + (" --quick" if args.quick else "") + (f" --only {args.only}" if args.only else "")
               + (f" --rounds {args.rounds}" if args.rounds else "") + (f" --threads {args.threads}" if args.threads else "")
               + (f" --tasks {args.tasks}" if args.tasks else ""))
    report = run_bench(args.out, quick=args.quick, groups=groups, command=command, rounds=args.rounds,
                       threads=args.threads, tasks=tasks)
    print(report.read_text())
    print(f"-> {report}")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time the suite against timm, torchvision, detectron2 and mmseg (alternated "
                       "rounds, medians of per-round ratios): Markdown + PNG")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds (minutes): checks the command, "
                   "its numbers are not results")
    p.add_argument("--out", default="benchmarks/results/bench", help="folder for bench.md, bench.png, bench.json")
    p.add_argument("--only", default="", metavar="GROUPS", help="comma-separated subset of the row groups: "
                   "train, engines, pipeline, eval (default: all)")
    p.add_argument("--rounds", type=int, default=None, help="alternated rounds per row (default: the mode's, 5 "
                   "full, 2 quick)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the train and engine rows (default: "
                   "torch's, one per core; on a shared machine 1 keeps both sides off each other's cores)")
    p.add_argument("--tasks", default="", metavar="TASKS", help="comma-separated tasks of the engine rows: "
                   "segmentation, segmentation-compiled (both engines with train.compile=true: minutes of "
                   "compilation per run), detection (default: all; --quick: all but segmentation-compiled)")
    p.set_defaults(func=cmd_bench)


# Each entry adds its subcommand; later jobs append theirs here.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_backbones, _add_run_commands, _add_data,
                                                                   _add_task_tools, _add_reproduce, _add_export,
                                                                   _add_bench]


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one line (the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tricks", description="Bag of Tricks for image classification and transfer.",
                     epilog=_tasks_epilog())
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error (bad data, "
                        "checkpoint, config, path) as well as its one-line message; also TRICKS_DEBUG=1")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``tricks``; returns the exit status. A user error (``runtime.errors.user_errors()``: config, data,
    checkpoint, path) is printed as one line with status 2, its traceback only with ``--debug`` or
    ``TRICKS_DEBUG=1``; any other exception is a bug and propagates with its traceback."""
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line, before or after the subcommand.
    debug = "--debug" in argv or os.environ.get("TRICKS_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if not hasattr(args, "overrides") or "=" not in a or a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:  # key=value after an option (``--write-results DIR key=value``)
        args.overrides = [*args.overrides, *extra]
    from runtime.config import ConfigError
    from runtime.errors import one_line, user_errors

    try:
        return args.func(args)
    except user_errors() as e:
        if debug:
            raise
        kind = "config error" if isinstance(e, ConfigError) else "error"
        print(f"tricks {args.command}: {kind}: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        # Under torchrun the engines (and detectron2's and mmengine's launchers) leave the process group up:
        # a gloo/NCCL group alive at interpreter exit can abort the process ("terminate called without an
        # active exception") after a successful run.
        if "torch.distributed" in sys.modules:
            from runtime.distributed import cleanup_distributed

            cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
