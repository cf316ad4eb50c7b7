"""The ``tricks`` command: one entry point, one subcommand per job.

Each subcommand imports what it needs when it runs, so ``tricks backbones`` never imports the
trainer, and detectron2/mmseg are imported only by the commands that use them.
"""
from __future__ import annotations

import argparse
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
    import logging
    import os

    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")


def _load_config(schema: type, path: Optional[str], overrides: Sequence[str]):
    """``CONFIG`` is optional: ``tricks train model.name=resnet18d ...`` starts from the defaults."""
    from runtime.config import load_config

    if path is not None and "=" in path and not path.endswith((".yaml", ".yml")):
        path, overrides = None, [path, *overrides]
    return load_config(path, schema, overrides)


def _load_classification_config(path: Optional[str], overrides: Sequence[str]):
    from classification.config import Config

    return _load_config(Config, path, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    _setup_logging()
    from classification.train import train

    cfg = _load_classification_config(args.config, args.overrides)
    metrics = train(cfg)
    if "top1" in metrics:
        print(f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  ({metrics['images']} images)  "
              f"-> {cfg.output_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _setup_logging()
    from classification.train import evaluate_checkpoint

    cfg = _load_classification_config(args.config, args.overrides)
    m = evaluate_checkpoint(cfg, args.checkpoint)
    print(f"top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}  ({m['images']} images)")
    return 0


DEMO_CONFIG = "configs/classification/fashion_mnist/resnet18d_1xb128_efficient-cosine-ls_fashion-mnist.yaml"


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole pipeline on the embedded real data (Fashion-MNIST from the Debian package)."""
    from pathlib import Path

    config = Path(__file__).resolve().parent.parent / DEMO_CONFIG
    print(f"== backbones: Table 5 ==")
    cmd_backbones(argparse.Namespace(table5=True, filter=""))
    print(f"\n== classification: {config.name} ==")
    return cmd_train(argparse.Namespace(config=str(config), overrides=list(args.overrides)))


def _add_classification(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a classifier: tricks train CONFIG [key=value ...]")
    p.add_argument("config", help="YAML file (configs/classification/...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=2 optim.lr=0.2")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="top-1/top-5 of a checkpoint: tricks eval CONFIG CHECKPOINT [key=value ...]")
    p.add_argument("config")
    p.add_argument("checkpoint", help=".pth (suite, timm, torchvision) or .safetensors")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("demo", help="the main job: the pipeline on the embedded Fashion-MNIST")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the demo's config")
    p.set_defaults(func=cmd_demo)


def _load_detection_config(path: Optional[str], overrides: Sequence[str]):
    from detection.config import DetectionConfig

    return _load_config(DetectionConfig, path, overrides)


def cmd_detection_train(args: argparse.Namespace) -> int:
    _setup_logging()
    from detection.train import train_detector

    cfg = _load_detection_config(args.config, args.overrides)
    metrics = train_detector(cfg)
    print(f"VOC07 mAP {metrics['mAP']:.2f}%  ({metrics['images']} images)  -> {cfg.output_dir}")
    return 0


def cmd_detection_eval(args: argparse.Namespace) -> int:
    _setup_logging()
    from detection.train import evaluate_checkpoint

    cfg = _load_detection_config(args.config, args.overrides)
    metrics = evaluate_checkpoint(cfg, args.checkpoint)
    print(_table([(name, f"{ap:.2f}") for name, ap in metrics["AP"].items()], ("class", "AP %")))
    print(f"VOC07 mAP {metrics['mAP']:.2f}%  ({metrics['images']} images)")
    return 0


def _add_detection(sub: argparse._SubParsersAction) -> None:
    det = sub.add_parser("detection", help="Faster R-CNN on PASCAL VOC (torchvision engine): train | eval")
    det_sub = det.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = det_sub.add_parser("train", help="tricks detection train CONFIG [key=value ...]")
    p.add_argument("config", help="YAML file (configs/detection/...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_iter=100 data.root=/data/VOCdevkit")
    p.set_defaults(func=cmd_detection_train)
    p = det_sub.add_parser("eval", help="VOC07 mAP of a detector: tricks detection eval CONFIG CHECKPOINT")
    p.add_argument("config")
    p.add_argument("checkpoint", help="model_final.pth or last.pth of a detection run")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_detection_eval)


# Each entry adds its subcommand; later jobs append theirs here.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_backbones, _add_classification,
                                                                   _add_detection]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tricks", description="Bag of Tricks for image classification and transfer.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from runtime.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:  # a mistake in a config file or override: the message says where and what
        parser.exit(2, f"tricks {args.command}: config error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
