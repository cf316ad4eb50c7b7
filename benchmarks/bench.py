"""``tricks bench``: every speed comparison of the suite against its reference libraries, by one method.

The method, the same for every row:

* a row compares the suite (A) with a reference (B) doing the same work: same model, data, batch,
  precision and memory format unless the row says otherwise;
* the sides run in alternated rounds, A B in even rounds and B A in odd ones (``round_order``), so a drift
  of the shared machine's speed hits both alike;
* a round's value of a side is the median of its per-unit times after warm-up: per iteration from the
  engines' own step timers (the suite's ``runtime.logger.Progress`` windows in ``metrics.jsonl``,
  detectron2's ``IterationTimer`` "time" in its ``EventStorage``, mmengine's ``IterTimerHook`` "train/time"
  in its ``MessageHub``), per train step, per image or per evaluation timed around the call;
* the engine rows and the trainer's train-step row run each side in a process of its own (as a user runs it:
  process-wide state such as the suite's CPU allocator setting or torch.compile's caches stays with its side);
* the result is the median of the per-round ratios A / B (time ratio: < 1 means the suite is faster)
  with their spread (interquartile range and min-max), never a ratio of whole-process wall times.

Rows: train step vs timm and torchvision (ResNet-50-B/C/D; same precision and memory format, and each
library's defaults; both sides in this process: the models' kernels), the train step as each trainer runs it
(ResNet-50-D vs timm, a new process per side: the suite's after its runtime's device set-up), each detection
and segmentation engine vs its reference engine (detectron2, mmseg), the input pipeline (images/s per core) vs torchvision.transforms.v2 + PIL doing the same augmentation,
evaluation vs detectron2's ``voc_eval`` and mmseg's ``IoUMetric``, and the model FLOP utilisation of the
train steps against a matmul/conv peak measured in the same run. Output: ``bench.md``, ``bench.png`` and the
raw per-round times ``bench.json`` in ``--out``.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from benchmarks._common import header, round_order, table
from runtime.errors import UsageError

GROUPS = ("train", "engines", "pipeline", "eval")
REPO = Path(__file__).resolve().parents[1]
SEG_CONFIG = "configs/segmentation/fashion_scenes/fcn_resnet18d-d8_1xb8-1k_fashion-scenes.yaml"
ADE_CONFIG = "configs/segmentation/fcn_resnet50d-d8_4xb4-80k_ade20k-512x512.yaml"
DET_CONFIG = "configs/detection/fashion_voc/faster-rcnn_resnet18d-fpn_1xb8-400_fashion-voc.yaml"
FASHION_CONFIG = "configs/classification/fashion_mnist/resnet18d_1xb128_efficient-cosine-ls_fashion-mnist.yaml"

# ------------------------------------------------------------------------------------------------ method


def run_rounds(sides: Sequence[Callable[[], list[float]]], rounds: int, warmup_calls: int = 1) -> list[list[list[float]]]:
    """``times[round][side]``: the per-unit seconds each side's ``measure()`` returns, the sides alternated by
    ``round_order``. Each side is first called ``warmup_calls`` times untimed (compilation, caches, allocator)."""
    for _ in range(warmup_calls):
        for measure in sides:
            measure()
    times: list[list[list[float]]] = []
    for r in range(rounds):
        got: list[list[float]] = [[] for _ in sides]
        for j in round_order(len(sides), r):
            got[j] = list(sides[j]())
            if not got[j]:
                raise RuntimeError(f"side {j} of a benchmark row returned no timed units in round {r}")
        times.append(got)
    return times


@dataclass
class Spread:
    """Median of per-round values with their quartiles and extremes."""
    median: float
    q1: float
    q3: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        values = sorted(values)
        if len(values) == 1:
            q1 = q3 = values[0]
        else:
            q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(statistics.median(values), q1, q3, values[0], values[-1])


def round_values(times: list[list[list[float]]]) -> list[list[float]]:
    """``values[round][side]``: the median unit time of each side in each round."""
    return [[statistics.median(side) for side in rnd] for rnd in times]


def ratios(times: list[list[list[float]]], ours: int = 0, reference: int = 1) -> list[float]:
    """Per-round time ratios ``ours / reference`` of the rounds' median unit times."""
    return [v[ours] / v[reference] for v in round_values(times)]


@dataclass
class Row:
    """One comparison: the suite's side against a reference's, measured by ``run_rounds``."""
    group: str                      # one of GROUPS
    what: str                       # the work both sides do
    ours: str
    reference: str
    unit: str                       # what one timed unit is: "iteration", "step", "image", "evaluation"
    times: list[list[list[float]]]  # [round][side][unit] seconds; side 0 = ours, 1 = reference
    target: str = ""                # the target on the ratio, if any
    notes: dict[str, str] = field(default_factory=dict)  # extra columns (e.g. MFU)

    @property
    def ratio(self) -> Spread:
        return Spread.of(ratios(self.times))

    def side(self, j: int) -> Spread:
        return Spread.of([v[j] for v in round_values(self.times)])


# ------------------------------------------------------------------------------------------------ sizes


@dataclass
class Sizes:
    """What a mode runs (``QUICK``: minutes, to check the command; ``FULL``: ~30-60 minutes on 2 cores)."""
    rounds: int
    step_batch: int          # train step rows: batch and square image size
    step_size: int
    step_timed: int          # timed train steps per side and round
    engine_warmup: int       # engine rows: iterations left out at the start of each run
    engine_timed: int        # ... and timed after them
    engine_scenes: int       # training scenes written for the engine rows (2 test scenes)
    jpeg_images: int         # pipeline rows: JPEGs decoded and augmented per round ...
    jpeg_size: tuple[int, int]
    tensor_batch: int        # ... and small in-memory images augmented per round (one batch)
    voc_images: int          # evaluation rows: synthetic VOC images, segmentation maps and their size
    seg_images: int
    seg_size: int
    peak_size: int           # matmul n (and conv channels / 2) of the FLOP/s peak
    ade_images: int          # segmentation pipeline row: ADE20K-like image + mask pairs per round, batches of 4 ...
    ade_scale: tuple[int, int]  # ... resized into this bound (x 0.5-2.0) and cropped to ade_crop (ADE20K's recipe)
    ade_crop: int


QUICK = Sizes(rounds=2, step_batch=2, step_size=32, step_timed=1, engine_warmup=3, engine_timed=4, engine_scenes=16,
              jpeg_images=8, jpeg_size=(160, 120), tensor_batch=64, voc_images=100, seg_images=8, seg_size=128,
              peak_size=256, ade_images=8, ade_scale=(256, 64), ade_crop=64)
FULL = Sizes(rounds=5, step_batch=8, step_size=224, step_timed=4, engine_warmup=10, engine_timed=60, engine_scenes=200,
             jpeg_images=64, jpeg_size=(500, 375), tensor_batch=512, voc_images=5000, seg_images=200, seg_size=512,
             peak_size=2048, ade_images=40, ade_scale=(2048, 512), ade_crop=512)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str = "cpu") -> float:
    _sync(device)
    tic = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - tic


# ------------------------------------------------------------------------------------------------ train step

# (ours, library, its name): the same architecture in both libraries. Neither library ships the original
# ResNet-50 (stride 2 in the first 1x1 conv): its "resnet50" is ResNet-B.
STEP_PAIRS = (("resnet50b", "timm", "resnet50"), ("resnet50b", "torchvision", "resnet50"),
              ("resnet50c", "timm", "resnet50c"), ("resnet50d", "timm", "resnet50d"))
# (label, ours (dtype, channels_last), theirs (dtype, channels_last)). The libraries' defaults: the suite's
# classification config trains fp32 channels_last; timm's train.py fp32 contiguous (without --amp,
# --channels-last), torchvision's references likewise.
STEP_SETTINGS = (("bf16 autocast, channels_last", (torch.bfloat16, True), (torch.bfloat16, True)),
                 ("fp32, channels_last", (torch.float32, True), (torch.float32, True)),
                 ("each library's default: ours fp32 channels_last, theirs fp32 contiguous",
                  (torch.float32, True), (torch.float32, False)))


def _library_model(library: str, name: str) -> torch.nn.Module:
    if library == "timm":
        try:
            import timm
        except ImportError as e:
            raise ImportError(f"tricks bench compares with timm ({e}): pip install -e '.[dev]'") from e

        return timm.create_model(name)
    import torchvision

    return torchvision.models.get_model(name)


def step_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call of a train step closure (forward and backward), by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def train_step_rows(sizes: Sizes, peaks: dict[torch.dtype, float], pairs=STEP_PAIRS, settings=STEP_SETTINGS) -> list[Row]:
    """Train step (forward, backward, SGD step on a fixed batch) of the suite's ResNet-50 variants vs timm's and
    torchvision's, 1000 classes. Notes: model FLOP utilisation of each side against ``peaks``."""
    from backbones import create_backbone
    from benchmarks._common import train_step

    device, rows = _device(), []
    for ours_name, library, their_name in pairs:
        torch.manual_seed(0)
        models = [create_backbone(ours_name), _library_model(library, their_name)]
        flops: list[int] = []  # of one step of each model: the same whatever the precision and memory format
        for label, (our_dtype, our_cl), (their_dtype, their_cl) in settings:
            steps = [train_step(model, sizes.step_batch, sizes.step_size, 3, 1000, dtype, channels_last, device)
                     for model, (dtype, channels_last) in zip(models, ((our_dtype, our_cl), (their_dtype, their_cl)))]
            if flops:
                for step in steps:  # warm-up in this precision and format
                    step()
            else:
                flops = [step_flops(step) for step in steps]  # one step each: also the warm-up

            def measure(step):
                return [_timed(step, device) for _ in range(sizes.step_timed)]

            times = run_rounds([lambda s=s: measure(s) for s in steps], sizes.rounds, warmup_calls=0)
            row = Row("train", f"train step, {ours_name} vs {library}, batch {sizes.step_batch}, "
                      f"3x{sizes.step_size}x{sizes.step_size}, {label}", f"suite `{ours_name}`",
                      f"{library} `{their_name}`", "step", times,
                      target="<= 0.95 (>= 1.05x speed)" if library == "timm" and our_dtype == their_dtype
                      and our_cl == their_cl else "")
            mfu = [f / row.side(j).median / peaks[dtype] for j, (f, dtype) in
                   enumerate(zip(flops, (our_dtype, their_dtype)))]
            row.notes["MFU ours / ref"] = f"{100 * mfu[0]:.1f}% / {100 * mfu[1]:.1f}%"
            rows.append(row)
        del models
    return rows


# The train step as each library's trainer runs it, each side in a process of its own: the suite's after what its
# trainer sets up on the device (runtime.precision.setup_precision: on a CPU, keep_cpu_memory), the reference's in
# a plain process, as its train.py runs. The rows above hold both sides in one process and one allocator state:
# the models' kernels alone.
RUNTIME_PAIRS = (("resnet50d", "timm", "resnet50d"),)


def run_step(library: str, name: str, precision: str, channels_last: bool, batch: int, size: int,
             timed: int) -> list[float]:
    """Seconds of ``timed`` train steps (after 2 untimed) of ``name`` from ``library`` ("suite": the registry, after
    its trainer's device set-up; "timm", "torchvision": the library's model, nothing else)."""
    from benchmarks._common import train_step
    from runtime.precision import AUTOCAST_DTYPES

    device = _device()
    torch.manual_seed(0)
    if library == "suite":
        from backbones import create_backbone
        from runtime.precision import setup_precision

        model = create_backbone(name)
        setup_precision(precision, torch.device(device), channels_last=channels_last, model=model)
    else:
        model = _library_model(library, name)
    step = train_step(model, batch, size, 3, 1000, AUTOCAST_DTYPES.get(precision, torch.float32), channels_last,
                      device)
    for _ in range(2):
        step()
    return [_timed(step, device) for _ in range(timed)]


def runtime_step_rows(sizes: Sizes, work: Path, pairs=RUNTIME_PAIRS) -> list[Row]:
    """The train step of the suite's trainer vs the reference library's, a new process per side and round, at the
    precision the suite's ``auto`` takes on this device, channels_last in both."""
    from runtime.precision import resolve_precision

    precision = resolve_precision("auto", torch.device(_device()))
    rows = []
    for ours_name, library, their_name in pairs:
        calls = [0]

        def side(lib: str, name: str) -> Callable[[], list[float]]:
            def measure() -> list[float]:
                calls[0] += 1
                spec = {"kind": "step", "library": lib, "name": name, "precision": precision, "channels_last": True,
                        "batch": sizes.step_batch, "size": sizes.step_size, "timed": sizes.step_timed}
                return _run_child(spec, work / f"{lib}_{name}_{calls[0]}.log", f"the {lib} {name} train step")
            return measure

        times = run_rounds([side("suite", ours_name), side(library, their_name)], sizes.rounds, warmup_calls=0)
        rows.append(Row("train", f"train step as each trainer runs it (a process each; the suite's after its "
                        f"runtime's device set-up), {ours_name} vs {library}, batch {sizes.step_batch}, "
                        f"3x{sizes.step_size}x{sizes.step_size}, {precision}{' autocast' if precision != 'fp32' else ''}"
                        ", channels_last", f"suite `{ours_name}`", f"{library} `{their_name}`", "step", times,
                        target="<= 0.95 (>= 1.05x speed)" if library == "timm" else ""))
    return rows


def measure_peaks(sizes: Sizes, reps: int = 3) -> dict[torch.dtype, dict[str, float]]:
    """Achievable FLOP/s on this device per dtype: the best of ``reps`` timings of a square matmul (n =
    ``peak_size``) and of a 3x3 convolution (``peak_size / 2`` channels in and out, 28x28, batch 8, channels_last)."""
    device, n = _device(), sizes.peak_size
    c = max(n // 2, 8)
    result: dict[torch.dtype, dict[str, float]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        x = torch.randn(8, c, 28, 28, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(device, dtype, memory_format=torch.channels_last)
        with torch.no_grad():
            matmul_s = min(_timed(lambda: a @ b, device) for _ in range(reps + 1))
            conv_s = min(_timed(lambda: conv(x), device) for _ in range(reps + 1))
        result[dtype] = {"matmul": 2 * n**3 / matmul_s, "conv": 2 * 8 * c * c * 9 * 28 * 28 / conv_s}
    return result


# ------------------------------------------------------------------------------------------------ engines


def per_iteration_suite(output_dir: Path, images_per_iter: int) -> dict[int, float]:
    """Seconds per iteration from a suite engine's ``metrics.jsonl``: each "train" record's ``img_per_s`` is its
    ``Progress`` window (the iterations since the previous record), turned back into seconds per iteration."""
    from runtime.logger import read_records

    return {r["step"]: images_per_iter / r["img_per_s"] for r in read_records(output_dir / "metrics.jsonl", "train")}


def _run_suite_engine(cfg) -> dict[int, float]:
    from tricks.cli import _engine

    _engine(cfg, "train")(cfg)
    return per_iteration_suite(Path(cfg.output_dir), cfg.train.batch_size * getattr(cfg.train, "accum_steps", 1))


def _run_detectron2(cfg) -> dict[int, float]:
    """detectron2's trainer, and its ``IterationTimer``'s per-iteration "time" (the first iterations of a run
    are left out by the timer itself)."""
    from detection.d2_engine import build_trainer

    trainer = build_trainer(cfg, resume=None)
    trainer.train()
    return {it + 1: value for value, it in trainer.storage.history("time").values()}


def _run_mmseg(cfg) -> dict[int, float]:
    """mmengine's Runner, and its ``IterTimerHook``'s per-iteration "train/time" from the run's ``MessageHub``."""
    from mmengine.logging import MessageHub

    from segmentation.mmseg_engine import train

    train(cfg)
    values = MessageHub.get_current_instance().get_scalar("train/time").data[0]
    return {i + 1: float(v) for i, v in enumerate(values)}


ENGINE_RUNNERS = {"torch": _run_suite_engine, "detectron2": _run_detectron2, "mmseg": _run_mmseg}
# Each engine run in a process of its own, as a user runs it: one engine's process-wide state (the suite's CPU
# allocator setting, runtime.precision.keep_cpu_memory; torch.compile's caches; mmengine's registries) never
# reaches the other's. False: in this process (the tests' stand-in runners).
ISOLATE_ENGINES = True


def run_engine(config: str, engine: str, overrides: Sequence[str]) -> dict[int, float]:
    """Train ``config`` with ``engine`` here; ``{iteration: seconds}`` from the engine's own timer."""
    from tricks.cli import load_task_config

    cfg = load_task_config(str(REPO / config), [f"engine={engine}", *overrides])
    return ENGINE_RUNNERS[engine](cfg)


def run_engine_process(config: str, engine: str, overrides: Sequence[str], log: Path) -> dict[int, float]:
    """``run_engine`` in a new Python process with this one's torch threads (its output to ``log``); an error
    names the log and ends with its last lines."""
    spec = {"kind": "engine", "config": config, "engine": engine, "overrides": list(overrides)}
    result = _run_child(spec, log, f"the {engine} engine's run of {config}")
    return {int(it): s for it, s in result.items()}


def _run_child(spec: dict, log: Path, what: str) -> Any:
    """Run ``_child`` on ``spec`` in a new Python process (this one's torch threads, its output to ``log``) and
    return what it wrote; a failure names the log and ends with its last lines."""
    import subprocess
    import sys

    log.parent.mkdir(parents=True, exist_ok=True)
    result = log.with_suffix(".json")
    result.unlink(missing_ok=True)
    spec = json.dumps({**spec, "threads": torch.get_num_threads(), "result": str(result)})
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.bench import _child; _child()"
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-c", code, spec], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode != 0 or not result.exists():
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"tricks bench: {what} failed (exit {done.returncode}); its output is in {log}, "
                           f"ending:\n{tail}")
    return json.loads(result.read_text())


def _child() -> None:
    """The process ``_run_child`` starts: its spec (JSON) is the one argument; "engine": ``run_engine``,
    "step": ``run_step``."""
    import sys

    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    if spec["kind"] == "engine":
        per_iter = run_engine(spec["config"], spec["engine"], spec["overrides"])
        out: Any = {str(it): s for it, s in per_iter.items()}
    else:
        out = run_step(spec["library"], spec["name"], spec["precision"], spec["channels_last"], spec["batch"],
                       spec["size"], spec["timed"])
    Path(spec["result"]).write_text(json.dumps(out))


def engine_side(config: str, engine: str, overrides: list[str], work: Path, warmup: int) -> Callable[[], list[float]]:
    """A ``measure()`` that trains ``config`` with ``engine`` afresh (a new output folder per call, in a new
    process unless ``ISOLATE_ENGINES`` is off) and returns its per-iteration seconds after the first ``warmup``
    iterations, from the engine's own timer."""
    calls = [0]

    def measure() -> list[float]:
        calls[0] += 1
        out = work / f"{engine}_{calls[0]}"
        args = [*overrides, f"output_dir={out}"]
        per_iter = (run_engine_process(config, engine, args, work / f"{engine}_{calls[0]}.log") if ISOLATE_ENGINES
                    else run_engine(config, engine, args))
        return [s for it, s in sorted(per_iter.items()) if it > warmup]

    return measure


# The tasks with an engine row (suite engine vs reference engine). "segmentation-compiled": both segmentation
# engines with train.compile=true (the suite: torch.compile of the model; mmseg: mmengine's cfg.compile).
ENGINE_TASKS = ("segmentation", "segmentation-compiled", "detection")
QUICK_TASKS = ("segmentation", "detection")  # --quick's default: without the compiled row's minutes of compilation
COMPILE_WARMUP = 20  # iterations left out of a compiled run: mmengine's compiled train_step recompiles in its first ~15


def engine_rows(sizes: Sizes, work: Path, tasks: Sequence[str] = ENGINE_TASKS) -> list[Row]:
    """Each task engine of the suite vs its reference engine: the demo's configs, the same data, model and batch,
    data loaded in the main process (``data.workers=0``), every iteration logged by both (``train.log_every=1``),
    random initialisation (trainable BN), evaluation only after the last iteration (on 2 scenes)."""
    from detection.scenes import write_fashion_voc
    from segmentation.scenes import write_fashion_scenes

    iters = sizes.engine_warmup + sizes.engine_timed
    common = ["data.workers=0", f"train.max_iter={iters}", "train.log_every=1", f"train.checkpoint_every={iters}",
              "train.eval_every=0", "train.seed=0"]
    seg_root = write_fashion_scenes(work / "data" / "fashion_scenes", sizes.engine_scenes, 2)
    devkit = write_fashion_voc(work / "data" / "fashion_voc", sizes.engine_scenes, 2)
    # Both sides of a row at one precision, pinned: `auto` resolves per engine (detectron2's AMPTrainer has no
    # bf16, so its `auto` is fp32 on every CPU, where the suite's engines take bf16 on CPUs that run it fast).
    from runtime.precision import resolve_precision

    cuda = torch.cuda.is_available()
    seg_precision = resolve_precision("auto", torch.device("cuda" if cuda else "cpu"))
    det_precision = "fp16" if cuda else "fp32"
    seg = [f"data.root={seg_root}", "eval.overlays=0", f"train.precision={seg_precision}", *common]
    det = [f"data.root={devkit}", f"data.classes={devkit / 'classes.txt'}", f"train.precision={det_precision}",
           "optim.warmup_iters=0", f"optim.milestones=[{iters + 1}]", "train.visualize=0", *common]
    # compiled: more iterations left out (the compilation), the same number timed
    warm_c = max(sizes.engine_warmup, COMPILE_WARMUP)
    seg_c = [*seg, "train.compile=true", f"train.max_iter={warm_c + sizes.engine_timed}",
             f"train.checkpoint_every={warm_c + sizes.engine_timed}"]
    rows = []
    for task, config, reference, overrides, target, setting, warmup in (
            ("segmentation", SEG_CONFIG, "mmseg", seg, "<= 0.80", seg_precision, sizes.engine_warmup),
            ("segmentation-compiled", SEG_CONFIG, "mmseg", seg_c, "<= 0.80", f"{seg_precision}, train.compile=true",
             warm_c),
            ("detection", DET_CONFIG, "detectron2", det, "<= 0.90", det_precision, sizes.engine_warmup)):
        if task not in tasks:
            continue
        sides = [engine_side(config, engine, overrides, work / task, warmup) for engine in ("torch", reference)]
        times = run_rounds(sides, sizes.rounds, warmup_calls=0)
        rows.append(Row("engines", f"{task.split('-')[0]}: `{Path(config).name}`, {sizes.engine_timed} iterations "
                        f"after {warmup}, {setting}", "engine=torch", f"engine={reference}", "iteration", times,
                        target=target))
    return rows


# ------------------------------------------------------------------------------------------------ input pipeline


def reference_augmentation(data_cfg, mean: Sequence[float], std: Sequence[float]):
    """torchvision.transforms.v2 on a PIL image doing the suite's training augmentation of ``data_cfg``
    (random resized crop, flip, colour jitter, to float, normalise; no PCA lighting: torchvision has none)."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(data_cfg.img_size, scale=(data_cfg.min_area, data_cfg.max_area), ratio=(3 / 4, 4 / 3),
                             antialias=True),
        v2.RandomHorizontalFlip(data_cfg.hflip),
        v2.ColorJitter(brightness=data_cfg.brightness or None, contrast=data_cfg.contrast or None,
                       saturation=data_cfg.saturation or None),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])


def _smooth_rgb(rng, width: int, height: int):
    """A smooth random RGB image (PIL): 16 px random colour cells, bilinearly upsampled."""
    import numpy as np
    from PIL import Image

    coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BILINEAR)


def _write_jpegs(root: Path, count: int, size: tuple[int, int]) -> None:
    """An ImageNet-layout folder of smooth random RGB JPEGs (quality 90), 2 classes, train and val."""
    import numpy as np

    rng = np.random.default_rng(0)
    w, h = size
    for split, n in (("train", count), ("val", 2)):
        for i in range(n):
            folder = root / split / f"n{i % 2:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            _smooth_rgb(rng, w, h).save(folder / f"{i:06d}.JPEG", quality=90)


def pipeline_rows(sizes: Sizes, work: Path) -> list[Row]:
    """Images/s per core (one thread) of the suite's two training input pipelines vs torchvision.transforms.v2 +
    PIL doing the same augmentation: JPEG files (``data.pipeline=samples``) and small images held in memory as
    uint8 (``data.pipeline=tensor``: the batch augmented at once, Fashion-MNIST's recipe)."""
    import dataclasses

    import numpy as np
    from PIL import Image
    from torchvision import datasets

    from classification.batch_transforms import BatchAugment
    from classification.config import Config, DataConfig
    from classification.data import build_datasets
    from runtime.config import load_config
    from runtime.scenes import load_fashion_mnist

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        root = work / "jpeg"
        _write_jpegs(root, sizes.jpeg_images, sizes.jpeg_size)
        jpeg_cfg = DataConfig(name="imagenet", root=str(root), pipeline="samples", workers=0, lighting=0.0)
        ours_ds = build_datasets(jpeg_cfg, mean, std)[0]
        theirs_ds = datasets.ImageFolder(str(root / "train"), transform=reference_augmentation(jpeg_cfg, mean, std))

        def per_image(dataset) -> list[float]:
            return [_timed(lambda i=i: dataset[i]) for i in range(len(dataset))]

        times = run_rounds([lambda: per_image(ours_ds), lambda: per_image(theirs_ds)], sizes.rounds)
        rows.append(Row("pipeline", f"JPEG {sizes.jpeg_size[0]}x{sizes.jpeg_size[1]} decode + augment to "
                        f"{jpeg_cfg.img_size} px, 1 thread", "`data.pipeline=samples`", "ImageFolder + v2 (PIL)",
                        "image", times))

        # hybrid: decode, crop and flip per image (uint8), then colour jitter and normalisation per batch (on the
        # training device; here the same CPU thread), its time shared out over the batch's images
        hybrid_cfg = dataclasses.replace(jpeg_cfg, pipeline="hybrid")
        hybrid_ds = build_datasets(hybrid_cfg, mean, std, uint8=True)[0]
        colour = BatchAugment(hybrid_cfg, mean, std, in_chans=3, train=True, geometry=False)

        worker_share: list[float] = []  # per round: the workers' part of an image's time

        def hybrid_per_image() -> list[float]:
            images, times = [], []
            for i in range(len(hybrid_ds)):
                times.append(_timed(lambda i=i: images.append(hybrid_ds[i][0])))
            batch = torch.stack(images)
            per_image_colour = _timed(lambda: colour(batch)) / len(images)
            worker_share.append(statistics.median(times) / (statistics.median(times) + per_image_colour))
            return [t + per_image_colour for t in times]

        times = run_rounds([hybrid_per_image, lambda: per_image(theirs_ds)], sizes.rounds)
        row = Row("pipeline", f"JPEG {sizes.jpeg_size[0]}x{sizes.jpeg_size[1]} decode + augment to "
                  f"{jpeg_cfg.img_size} px, 1 thread", "`data.pipeline=hybrid` (colour per batch, here on the CPU)",
                  "ImageFolder + v2 (PIL)", "image", times)
        # on a GPU the colour step leaves the CPU: what stays is the workers' share of the suite's time
        row.notes["workers' share"] = f"{100 * statistics.median(worker_share):.0f}%"
        rows.append(row)

        fashion = dataclasses.replace(load_config(str(REPO / FASHION_CONFIG), Config).data, lighting=0.0)
        images = torch.from_numpy(load_fashion_mnist("test")[0][: sizes.tensor_batch]).unsqueeze(1)
        augment = BatchAugment(fashion, fashion.mean or [0.5], fashion.std or [0.5], in_chans=1, train=True)
        reference = reference_augmentation(fashion, fashion.mean or [0.5], fashion.std or [0.5])
        arrays = [np.ascontiguousarray(im[0].numpy()) for im in images]

        def ours_tensor() -> list[float]:
            return [_timed(lambda: augment(images)) / len(images)]

        def theirs_pil() -> list[float]:
            return [_timed(lambda: torch.stack([reference(Image.fromarray(a)) for a in arrays])) / len(arrays)]

        times = run_rounds([ours_tensor, theirs_pil], sizes.rounds)
        rows.append(Row("pipeline", f"Fashion-MNIST 28x28 uint8 in memory, batch {len(arrays)}, augment to "
                        f"{fashion.img_size} px, 1 thread", "`data.pipeline=tensor` (BatchAugment)",
                        "v2 per image (PIL)", "image", times))
        rows.append(segmentation_pipeline_row(sizes, work / "ade"))
    finally:
        torch.set_num_threads(threads)
    return rows


def _write_ade_like(root: Path, count: int) -> Path:
    """ADE20K's layout with ``count`` training pairs at its common sizes (683x512, 512x683, 640x480, 800x600):
    smooth random colour JPEGs (quality 90) with grain, and masks of 15 regions of classes 1..150 with 2% of
    0 ("other"); 2 validation pairs. Returns the ADEChallengeData2016 folder."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root = root / "ADEChallengeData2016"
    for split, n in (("training", count), ("validation", 2)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = ((683, 512), (512, 683), (640, 480), (800, 600))[i % 4]
            image = np.asarray(_smooth_rgb(rng, w, h)).astype(np.int16)
            image = np.clip(image + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"ADE_{split}_{i:08d}.jpg", quality=90)
            seeds, classes = rng.integers(0, [h, w], (15, 2)), rng.integers(1, 151, 15)
            yy, xx = np.mgrid[0:h, 0:w]
            nearest = ((yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2).argmin(0)
            mask = classes[nearest].astype(np.uint8)
            mask[rng.random((h, w)) < 0.02] = 0
            Image.fromarray(mask).save(root / "annotations" / split / f"ADE_{split}_{i:08d}.png")
    return root


def segmentation_pipeline_row(sizes: Sizes, work: Path) -> Row:
    """Images/s per core of the segmentation training pipeline of the ADE20K recipe (read image and mask, random
    resize, crop with cat_max_ratio, flip, photometric distortion, batches of 4) in the torch engine's loader
    (``_TrainSamples`` + ``_collate_train``, the distortion in the workers) vs mmseg's own pipeline and
    ``pseudo_collate``, on ADE20K-like pairs; a batch's time shared over its images. The workers' share: of the
    suite's time, what stays in the workers with ``data.photometric_on=device`` (auto on CUDA)."""
    from runtime.data import SeededDataset
    from segmentation import train as seg_train
    from segmentation.mmseg_engine import build_mmseg_config, register_modules
    from tricks.cli import load_task_config

    register_modules()  # mmseg, mmengine and mmcv, or an ImportError naming the install command
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import init_default_scope

    root = _write_ade_like(work, sizes.ade_images)
    crop = sizes.ade_crop
    cfg = load_task_config(str(REPO / ADE_CONFIG), [f"data.root={root}", "data.workers=0", "train.batch_size=4",
                                                    f"data.scale=[{sizes.ade_scale[0]},{sizes.ade_scale[1]}]",
                                                    f"data.crop_size=[{crop},{crop}]"])
    ours = SeededDataset(seg_train._TrainSamples(seg_train._dataset(cfg, cfg.data.train_split), cfg.data))
    init_default_scope("mmseg")
    from mmseg.registry import DATASETS

    theirs = DATASETS.build(build_mmseg_config(cfg).train_dataloader.dataset)
    batches = [list(range(i, min(i + 4, sizes.ade_images))) for i in range(0, sizes.ade_images, 4)]
    calls, worker_share = [0], []

    def ours_per_image() -> list[float]:
        calls[0] += 1
        times, kept = [], []
        for batch in batches:
            samples = []
            load = _timed(lambda: samples.extend(ours[(i, 1000 * calls[0] + i)] for i in batch))
            collate = _timed(lambda: seg_train._collate_train(samples, (crop, crop)))
            raw = _timed(lambda: seg_train._collate_train(samples, (crop, crop), photometric=False))
            times += [(load + collate) / len(batch)] * len(batch)
            kept.append((load + raw) / (load + collate))
        worker_share.append(statistics.median(kept))
        return times

    def theirs_per_image() -> list[float]:
        times = []
        for batch in batches:
            seconds = _timed(lambda: pseudo_collate([theirs[i] for i in batch]))
            times += [seconds / len(batch)] * len(batch)
        return times

    times = run_rounds([ours_per_image, theirs_per_image], sizes.rounds)
    row = Row("pipeline", f"ADE20K-like JPEG + mask (683x512 and others) through the ADE20K recipe's training "
              f"pipeline to {crop}x{crop} crops, batches of 4, 1 thread", "torch engine's loader (`_TrainSamples`)",
              "mmseg's pipeline", "image", times)
    row.notes["workers' share"] = f"{100 * statistics.median(worker_share):.0f}%"
    return row


# ------------------------------------------------------------------------------------------------ evaluation


def _seg_maps(count: int, size: int, classes: int = 150) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(prediction, label) pairs: blocky labels with 5% ``ignore_index`` pixels, predictions 70% right."""
    g = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(count):
        coarse = torch.randint(0, classes, (1, 1, size // 16, size // 16), generator=g).float()
        label = torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")[0, 0].long()
        label[torch.rand(size, size, generator=g) < 0.05] = 255
        wrong = torch.rand(size, size, generator=g) < 0.3
        pred = torch.where(wrong, torch.randint(0, classes, (size, size), generator=g), label.clamp(max=classes - 1))
        pairs.append((pred, label))
    return pairs


def eval_rows(sizes: Sizes, work: Path) -> list[Row]:
    """Evaluation on synthetic data: VOC AP (``detection.voc_eval`` vs detectron2's ``voc_eval``, warm: its
    annotation cache filled by the warm-up call) and segmentation IoU (``segmentation.metrics`` vs mmseg's
    ``IoUMetric``, 150 classes). Both sides must agree (VOC: 1e-9 per class; IoU: mmseg's 0.01 rounding)."""
    import numpy as np

    from benchmarks.voc_eval_speed import ours as voc_ours, synthesize, theirs as voc_theirs, write_devkit
    from detection.d2_engine import import_detectron2
    from detection.voc_eval import VOCBoxes
    from segmentation.metrics import SegmentationMetric
    from segmentation.mmseg_engine import import_mmseg

    import_detectron2()
    IoUMetric = import_mmseg().mmseg.evaluation.IoUMetric
    rows = []
    truth, detections = synthesize(sizes.voc_images, np.random.default_rng(0))
    truth_boxes = [VOCBoxes(np.array([(x1 - 1, y1 - 1, x2, y2) for x1, y1, x2, y2, _, _ in gt], np.float64),
                            np.array([g[4] for g in gt]), difficult=np.array([g[5] for g in gt])) for gt in truth]
    predictions = [VOCBoxes(b, l, scores=s) for b, l, s in detections]
    files = write_devkit(work / "voc_eval", truth, detections)
    aps: dict[str, np.ndarray] = {}

    def voc(side: str, fn) -> Callable[[], list[float]]:
        def measure() -> list[float]:
            tic = time.perf_counter()
            aps[side] = fn()
            return [time.perf_counter() - tic]
        return measure

    times = run_rounds([voc("ours", lambda: voc_ours(truth_boxes, predictions, True)),
                        voc("theirs", lambda: voc_theirs(files, True))], sizes.rounds)
    diff = float(np.max(np.abs(aps["ours"] - aps["theirs"])))
    if diff > 1e-9:
        raise RuntimeError(f"VOC AP of detection.voc_eval and detectron2's voc_eval differ by {diff}")
    rows.append(Row("eval", f"VOC07 AP, 20 classes at IoU 0.5, {sizes.voc_images} synthetic images "
                    f"({sum(len(d[1]) for d in detections)} detections)", "`detection.voc_eval.evaluate_voc`",
                    "detectron2 `voc_eval` (warm)", "evaluation", times))

    pairs = _seg_maps(sizes.seg_images, sizes.seg_size)
    miou: dict[str, float] = {}

    def ours_iou() -> list[float]:
        tic = time.perf_counter()
        metric = SegmentationMetric(150)
        for pred, label in pairs:
            metric.update(pred, label)
        miou["ours"] = metric.compute()["mIoU"]
        return [time.perf_counter() - tic]

    def theirs_iou() -> list[float]:
        tic = time.perf_counter()
        metric = IoUMetric(ignore_index=255)
        metric.dataset_meta = {"classes": [str(c) for c in range(150)]}
        for pred, label in pairs:
            metric.process({}, [{"pred_sem_seg": {"data": pred[None]}, "gt_sem_seg": {"data": label[None]}}])
        miou["theirs"] = metric.compute_metrics(metric.results)["mIoU"]
        return [time.perf_counter() - tic]

    from mmengine.logging import MMLogger

    # IoUMetric prints its per-class table through mmengine's logger: timed is the evaluation, not the terminal.
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel("WARNING")
    try:
        times = run_rounds([ours_iou, theirs_iou], sizes.rounds)
    finally:
        logger.setLevel(level)
    if abs(miou["ours"] - miou["theirs"]) > 0.006:  # mmseg rounds to 0.01
        raise RuntimeError(f"mIoU of segmentation.metrics {miou['ours']} and mmseg's IoUMetric {miou['theirs']} differ")
    rows.append(Row("eval", f"mIoU, 150 classes, {sizes.seg_images} maps {sizes.seg_size}x{sizes.seg_size}",
                    "`segmentation.metrics.SegmentationMetric`", "mmseg `IoUMetric`", "evaluation", times))
    return rows


# ------------------------------------------------------------------------------------------------ report

GROUP_TITLES = {"train": "Train step vs timm and torchvision", "engines": "Task engines vs reference engines",
                "pipeline": "Input pipeline (per core)", "eval": "Evaluation"}


def _seconds(s: float) -> str:
    return f"{s:.3g} s" if s >= 0.01 else f"{s * 1e3:.3g} ms"


def markdown(rows: list[Row], peaks: dict | None, title: str, command: str, mode: str,
             load: tuple[float, float] | None = None, measured_commit: str | None = None) -> str:
    """The report: machine and commit (``measured_commit``: the code measured, taken at the start), the method, one
    table per group, the measured peaks. ``load``: the 1-minute load average at the start and the end (how
    shared the machine was)."""
    text = header(title, command, measured_commit)
    rounds = sorted({len(r.times) for r in rows})
    text += f"- mode: {mode}; rounds per row: {', '.join(map(str, rounds))}\n"
    if load is not None:
        text += f"- 1-minute load average: {load[0]:.1f} at the start, {load[1]:.1f} at the end\n"
    text += f"- torch threads: {torch.get_num_threads()} of {os.cpu_count()} cores\n"
    text += ("\n"
             "Method: the two sides of a row alternate round by round (A B, B A, ...); a side's value in a round is "
             "the median of its per-unit times after warm-up (per iteration: the engines' own step timers; per "
             "train step, image or evaluation: timed around the call). **ratio = suite / reference time per unit, "
             "the median of the per-round ratios** (< 1: the suite is faster), with their interquartile range and "
             "min-max over rounds. Medians per side are over rounds too.\n")
    for group in GROUPS:
        chosen = [r for r in rows if r.group == group]
        if not chosen:
            continue
        extra = sorted({k for r in chosen for k in r.notes})
        body = []
        for r in chosen:
            ratio = r.ratio
            ours, ref = r.side(0).median, r.side(1).median
            per = (f"{_seconds(ours)} / {_seconds(ref)}" if group != "pipeline"
                   else f"{1 / ours:.0f} / {1 / ref:.0f} img/s")
            body.append([r.what, r.ours, r.reference, per, f"**{ratio.median:.2f}**",
                         f"{ratio.q1:.2f}-{ratio.q3:.2f}", f"{ratio.low:.2f}-{ratio.high:.2f}",
                         " ".join(f"{x:.2f}" for x in ratios(r.times)), r.target or "-",
                         *(r.notes.get(k, "-") for k in extra)])
        unit = "img/s per core" if group == "pipeline" else f"s per {chosen[0].unit}"
        text += f"\n## {GROUP_TITLES[group]}\n\n" + table(body, [
            "what", "suite", "reference", f"suite / reference ({unit})", "ratio", "IQR", "min-max", "per round",
            "target", *extra])
    if peaks:
        text += "\n## Peak FLOP/s measured in this run (the MFU denominator: the larger of the two)\n\n"
        text += table([[str(dtype).replace("torch.", ""), f"{p['matmul'] / 1e9:.1f}", f"{p['conv'] / 1e9:.1f}"]
                       for dtype, p in peaks.items()], ["dtype", "matmul GFLOP/s", "3x3 conv GFLOP/s"])
    text += "\n![ratios](bench.png)\n"
    return text


def plot(rows: list[Row], path: Path) -> None:
    """Horizontal bars: each row's median ratio, whiskers min-max over rounds, the parity line at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import textwrap

    fig, ax = plt.subplots(figsize=(10, 0.6 * len(rows) + 1.2))
    y = list(range(len(rows)))[::-1]
    spreads = [r.ratio for r in rows]
    colors = {"train": "tab:blue", "engines": "tab:orange", "pipeline": "tab:green", "eval": "tab:purple"}
    ax.barh(y, [s.median for s in spreads], color=[colors[r.group] for r in rows],
            xerr=[[s.median - s.low for s in spreads], [s.high - s.median for s in spreads]], capsize=2)
    ax.axvline(1.0, color="k", lw=0.8)
    labels = [f"{r.ours} vs {r.reference}\n" + "\n".join(textwrap.wrap(r.what, 80)[:2]) for r in rows]
    ax.set_yticks(y, [label.replace("`", "") for label in labels], fontsize=5.5)
    ax.set_xscale("log")
    ax.set_xlabel("time suite / reference: median of per-round ratios, whiskers min-max (< 1: suite faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows: list[Row], peaks: dict | None, out: Path, command: str, mode: str,
          load: tuple[float, float] | None = None, measured_commit: str | None = None) -> Path:
    """``out/bench.md``, ``bench.png`` and ``bench.json`` (the raw per-round, per-unit seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(markdown(rows, peaks, "tricks bench: the suite vs its reference libraries",
                                           command, mode, load, measured_commit))
    plot(rows, out / "bench.png")
    raw = [{"group": r.group, "what": r.what, "ours": r.ours, "reference": r.reference, "unit": r.unit,
            "times": r.times, "ratios": ratios(r.times)} for r in rows]
    (out / "bench.json").write_text(json.dumps({"mode": mode, "rows": raw}, indent=1))
    return out / "bench.md"


def check_groups(groups: Sequence[str]) -> None:
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise UsageError(f"--only {','.join(groups)}: row groups are {', '.join(GROUPS)} (comma-separated)")


def run_bench(out: Path | str, quick: bool = False, groups: Sequence[str] = GROUPS, command: str = "tricks bench",
              rounds: int | None = None, threads: int | None = None,
              tasks: Sequence[str] = ENGINE_TASKS) -> Path:
    """Measure the rows of ``groups`` (``QUICK`` or ``FULL`` sizes; ``rounds``, if given, replaces the mode's) and
    write the report into ``out``. ``threads``: torch's intra-op threads for the whole run (the pipeline rows
    always use one). ``tasks``: the engine rows' tasks."""
    import dataclasses

    from benchmarks._common import commit

    check_groups(groups)
    load_start, measured_commit = os.getloadavg()[0], commit()  # the code measured, whatever happens meanwhile
    sizes, out = (QUICK if quick else FULL), Path(out)
    if rounds is not None:
        sizes = dataclasses.replace(sizes, rounds=rounds)
    if threads is not None:
        torch.set_num_threads(threads)
    rows: list[Row] = []
    peaks = None
    with tempfile.TemporaryDirectory(prefix="tricks_bench_") as tmp:
        work = Path(tmp)
        if "train" in groups:
            peaks = measure_peaks(sizes)
            best = {dtype: max(p.values()) for dtype, p in peaks.items()}
            rows += train_step_rows(sizes, best)
            rows += runtime_step_rows(sizes, work / "train")
        if "engines" in groups:
            rows += engine_rows(sizes, work / "engines", tasks)
        if "pipeline" in groups:
            rows += pipeline_rows(sizes, work / "pipeline")
        if "eval" in groups:
            rows += eval_rows(sizes, work / "eval")
    return write(rows, peaks, out, command, "quick" if quick else "full", (load_start, os.getloadavg()[0]),
                 measured_commit)
