"""``tricks reproduce``: the paper's Tables 3-6, 8 and 9 regenerated at small scale, with seeds.

Every row is an ordinary ``tricks train CONFIG key=value ...`` (``ROWS``: a config under ``configs/`` and the
overrides printed before it runs), and each row differs from the row above by exactly the paper's step (the
tests compare the resolved configs). A row is run once per seed, even when several tables show it (Table 3's
ResNet rows are Table 4's first and last, Table 5's ResNet-50-D is Table 6's first row).

Scale (one CPU thread per run): Fashion-MNIST at its own 28 px through the classification trainer's ``tensor``
pipeline, 2 epochs; the bottleneck ResNet-50 family, MobileNet and Inception-V3 at quarter width. Inception-V3
needs 75 px (its valid-padding convs), so it costs about 3x a ResNet row and runs only with ``--nets`` naming it.
The distillation teacher (the paper's ResNet-152-D) is a quarter-width ResNet-101-D trained by the suite
once in total (seed 0) with the recipe of the row it teaches (cosine + label smoothing; + mixup for the
distillation-with-mixup row); it sees the 28 px it was trained at (``distill.teacher_img_size``) when it
teaches Inception-V3. Tables 8 and 9 fine-tune each Table 6 ResNet-D row's backbone (and ResNet-50-B
with the baseline recipe, the paper's "B-standard") on the embedded VOC-layout and ADE20K-layout scenes.

Resumable: each finished row-seed writes ``OUT/records/<row>-<hash>-seed<N>.json`` (the command, resolved
overrides, metrics, wall time, machine, commit) and is read back instead of rerun; a killed run continues from
its ``last.pth`` (``train.resume=auto``). The hash is over the row's resolved config (its values that differ
from the schema's defaults; output paths and the seed left out), so a changed recipe is a new record, and the
records stay valid when the folder is copied elsewhere. Weights a later row needs (the teacher, the backbones
of Tables 8-9) live in ``OUT/runs/``; when they are missing (a copied ``records/`` only) their row is rerun.
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from runtime.errors import UsageError

REPO = Path(__file__).resolve().parent.parent
CLS = "configs/classification/fashion_mnist/reproduce"
BASELINE = {"resnet": f"{CLS}/resnet50_1xb256_baseline-w0.25-28px-2e_fashion-mnist.yaml",
            "mobilenet": f"{CLS}/mobilenet_1xb256_baseline-w0.25-28px-2e_fashion-mnist.yaml",
            "inception": f"{CLS}/inception_v3_1xb256_baseline-w0.25-75px-2e_fashion-mnist.yaml"}
EFFICIENT = {"resnet": f"{CLS}/resnet50_1xb1024_efficient-w0.25-28px-2e_fashion-mnist.yaml",
             "mobilenet": f"{CLS}/mobilenet_1xb1024_efficient-w0.25-28px-2e_fashion-mnist.yaml",
             "inception": f"{CLS}/inception_v3_1xb1024_efficient-w0.25-75px-2e_fashion-mnist.yaml"}
TEACHER = f"{CLS}/resnet101d_1xb1024_efficient-cosine-ls-w0.25-28px-2e_fashion-mnist.yaml"
DETECTION = "configs/detection/fashion_voc/faster-rcnn_resnet18d-fpn_1xb8-400_fashion-voc.yaml"
SEGMENTATION = "configs/segmentation/fashion_scenes/fcn_resnet18d-d8_1xb8-1k_fashion-scenes.yaml"
BASE_EPOCHS = 2          # the classification configs' schedule; --epochs scales every row from it
NETS = ("resnet", "mobilenet", "inception")
DEFAULT_NETS = ("resnet", "mobilenet")

# Overrides that are the paper's steps (§3, §5); the mixup step also lengthens training by 200/120 (2 -> 3 epochs).
COSINE = ("optim.schedule=cosine",)
SMOOTHING = ("train.label_smoothing=0.1",)
MIXUP = ("train.mixup_alpha=0.2", "train.epochs=3")
TEACHER_ARGS = ("distill.teacher=resnet101d", "distill.teacher_kwargs={width_mult: 0.25}", "distill.temperature=20.0")


def DISTILL(teacher: str, net: str = "resnet") -> tuple[str, ...]:
    # the teacher is trained at 28 px: a student at another size (Inception-V3's 75) shows it the batch at 28
    view = ("distill.teacher_img_size=28",) if net == "inception" else ()
    return (*TEACHER_ARGS, f"distill.teacher_weights=<weights:{teacher}>", *view)



@dataclass(frozen=True)
class Row:
    """One ``tricks train`` run of the tables: ``config`` + ``overrides`` (``<weights:ROW>`` is replaced by that
    row's ``model.safetensors`` when it runs; ``<voc>``, ``<voc_classes>``, ``<scenes>`` by the embedded data)."""
    id: str
    label: str                                   # the paper's name of the row
    config: str                                  # relative to the repository root
    overrides: tuple[str, ...] = ()
    paper: dict = field(default_factory=dict)    # {metric: the paper's number}
    net: str = "resnet"                          # resnet / mobilenet / inception (for --nets)
    once: bool = False                           # trained once in total (seed 0): the teacher
    backbone: Optional[str] = None               # tables 8/9: the classification row fine-tuned here

    @property
    def task(self) -> str:
        return "detection" if self.config == DETECTION else "segmentation" if self.config == SEGMENTATION \
            else "classification"


def _rows() -> dict[str, Row]:
    rows: list[Row] = []
    add = rows.append
    # Tables 3 and 4 (ResNet-50): the baseline, then the efficient tricks one at a time at batch 256 and 1024.
    r50 = BASELINE["resnet"]
    steps = [("linear scaling", ()), ("+ LR warmup", ("optim.warmup_epochs=0.2",)),
             ("+ zero gamma", ("model.zero_init_last=true",)), ("+ no bias decay", ("optim.no_bias_decay=true",)),
             ("+ FP16", ("train.precision=bf16",))]
    paper4 = {256: (75.87, 76.03, 76.19, 76.16, 76.15), 1024: (75.17, 75.93, 76.37, 76.03, 76.21)}
    for batch in (256, 1024):
        acc: tuple[str, ...] = () if batch == 256 else ("train.batch_size=1024",)
        for i, ((label, step), top1) in enumerate(zip(steps, paper4[batch])):
            acc = (*acc, *step)
            row_id = f"r50-b{batch}-{i}"
            if (batch, i) == (256, 0):
                row_id = "r50-baseline"
            if (batch, i) == (1024, 4):   # all five steps: the efficient recipe, its own config file
                add(Row("r50-efficient", label, EFFICIENT["resnet"], (), {"top1": top1, "min_per_epoch": 4.4}))
                continue
            add(Row(row_id, label, r50, acc, {"top1": top1, "min_per_epoch": 13.3} if row_id == "r50-baseline"
                    else {"top1": top1}))
    # Table 3: MobileNet and Inception-V3, baseline -> efficient (ResNet's rows are Table 4's).
    for net, base, eff in (("mobilenet", (69.03, 6.2), (71.90, 4.2)), ("inception", (77.32, 19.8), (77.50, 8.3))):
        add(Row(f"{net}-baseline", "baseline (BS256, FP32)", BASELINE[net], (),
                {"top1": base[0], "min_per_epoch": base[1]}, net=net))
        add(Row(f"{net}-efficient", "efficient (BS1024, FP16)", EFFICIENT[net], (),
                {"top1": eff[0], "min_per_epoch": eff[1]}, net=net))
    # Table 5: ResNet-50 original -> B -> C -> D, efficient recipe (the original is Table 4's last row).
    for variant, top1 in (("b", 76.66), ("c", 76.87), ("d", 77.16)):
        add(Row(f"r50{variant}-efficient", f"ResNet-50-{variant.upper()}", EFFICIENT["resnet"],
                (f"model.name=resnet50{variant}",), {"top1": top1}))
    # Teachers (the paper's ResNet-152-D with cosine + label smoothing; with mixup for the combined row).
    add(Row("teacher", "teacher: ResNet-101-D, cosine + LS", TEACHER, (), once=True))
    add(Row("teacher-mixup", "teacher: ResNet-101-D, cosine + LS + mixup", TEACHER, MIXUP, once=True))
    # Table 6: the refinements on top of efficient training, for ResNet-50-D, MobileNet and Inception-V3.
    paper6 = {"resnet": (77.16, 77.91, 78.31, 78.67, 79.15, 79.29), "mobilenet": (71.90, 72.83, 72.93, 71.97, 73.28, 72.51),
              "inception": (77.50, 78.19, 78.40, 78.26, 78.77, 78.34)}
    for net in NETS:
        prefix = "r50d" if net == "resnet" else net
        config = EFFICIENT[net]
        base = ("model.name=resnet50d",) if net == "resnet" else ()
        chain = [("+ cosine decay", f"{prefix}-cos", (*base, *COSINE)),
                 ("+ label smoothing", f"{prefix}-cos-ls", (*base, *COSINE, *SMOOTHING)),
                 ("+ distill w/o mixup", f"{prefix}-cos-ls-distill", (*base, *COSINE, *SMOOTHING, *DISTILL("teacher", net))),
                 ("+ mixup w/o distill", f"{prefix}-cos-ls-mixup", (*base, *COSINE, *SMOOTHING, *MIXUP)),
                 ("+ distill w/ mixup", f"{prefix}-cos-ls-mixup-distill",
                  (*base, *COSINE, *SMOOTHING, *MIXUP, *DISTILL("teacher-mixup", net)))]
        for (label, row_id, overrides), top1 in zip(chain, paper6[net][1:]):
            add(Row(row_id, label, config, overrides, {"top1": top1}, net=net))
    # "B-standard" of Tables 8-9: ResNet-50-B with the baseline recipe.
    add(Row("r50b-baseline", "ResNet-50-B, standard", r50, ("model.name=resnet50b",), {"top1": 76.14}))
    # Tables 8 and 9: each backbone fine-tuned with the same schedule.
    # backbone: (ImageNet top-1 as Tables 8-9 list it, VOC07 mAP, ADE20K pixel accuracy, mIoU)
    paper89 = {"r50b-baseline": (76.14, 77.54, 78.08, 37.05), "r50d-efficient": (77.16, 78.30, 78.88, 38.88),
               "r50d-cos": (77.91, 79.23, 79.25, 39.33), "r50d-cos-ls": (78.34, 80.71, 78.64, 38.75),
               "r50d-cos-ls-distill": (78.67, 80.96, 78.97, 38.90), "r50d-cos-ls-mixup": (79.16, 81.10, 78.47, 37.99),
               "r50d-cos-ls-mixup-distill": (79.29, 81.33, 78.72, 38.40)}
    by_id = {r.id: r for r in rows}
    for backbone, (top1, mAP, pix, miou) in paper89.items():
        name = dict(o.split("=", 1) for o in by_id[backbone].overrides)["model.name"]
        common = (f"model.backbone={name}", "model.kwargs={width_mult: 0.25}", f"model.weights=<weights:{backbone}>",
                  "data.mean=[0.286,0.286,0.286]", "data.std=[0.353,0.353,0.353]")
        add(Row(f"det-{backbone}", by_id[backbone].label, DETECTION,
                (*common, "model.norm=frozenbatchnorm", "model.frozen_stages=1", "data.root=<voc>",
                 "data.classes=<voc_classes>", "train.visualize=0"), {"mAP": mAP, "top1": top1}, backbone=backbone))
        # precision pinned: a record's hash is over the config, and `auto` would mean another precision on
        # another machine (bf16: what the demo config said when the first full run began)
        add(Row(f"seg-{backbone}", by_id[backbone].label, SEGMENTATION,
                (*common, "data.root=<scenes>", "eval.overlays=0", "train.precision=bf16"),
                {"aAcc": pix, "mIoU": miou, "top1": top1}, backbone=backbone))
    return {r.id: r for r in rows}


ROWS: dict[str, Row] = _rows()


@dataclass(frozen=True)
class Metric:
    key: str            # in the record's metrics
    label: str
    paper_label: str
    paper_key: str = ""  # in Row.paper; default: key
    verdict: bool = True


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    groups: tuple[tuple[str, tuple[str, ...]], ...]   # (column group label, row ids top to bottom)
    metrics: tuple[Metric, ...]
    note: str = ""
    labels: dict = field(default_factory=dict)          # {row id: its name in this table}, else Row.label

    def label(self, row: Row) -> str:
        return self.labels.get(row.id, row.label)


TOP1 = Metric("top1", "top-1 %", "ImageNet top-1 %")
TABLE4_256 = ("r50-baseline", "r50-b256-1", "r50-b256-2", "r50-b256-3", "r50-b256-4")
TABLE4_1024 = ("r50-b1024-0", "r50-b1024-1", "r50-b1024-2", "r50-b1024-3", "r50-efficient")
TABLE6 = {"resnet": ("r50d-efficient", "r50d-cos", "r50d-cos-ls", "r50d-cos-ls-distill", "r50d-cos-ls-mixup",
                     "r50d-cos-ls-mixup-distill"),
          "mobilenet": tuple(f"mobilenet-{s}" for s in ("efficient", "cos", "cos-ls", "cos-ls-distill", "cos-ls-mixup",
                                                         "cos-ls-mixup-distill")),
          "inception": tuple(f"inception-{s}" for s in ("efficient", "cos", "cos-ls", "cos-ls-distill", "cos-ls-mixup",
                                                         "cos-ls-mixup-distill"))}
BACKBONES_89 = ("r50b-baseline", *TABLE6["resnet"])
LABELS_89 = {f"{task}-{b}": label for task in ("det", "seg") for b, label in zip(BACKBONES_89, (
    "B-standard", "D-efficient", "+ cosine", "+ label smoothing", "+ distill w/o mixup", "+ mixup w/o distill",
    "+ distill w/ mixup"))}

TABLES: dict[str, Table] = {t.name: t for t in (
    Table("table5", "Table 5: ResNet-50 architecture tweaks (efficient recipe)",
          (("ResNet-50", ("r50-efficient", "r50b-efficient", "r50c-efficient", "r50d-efficient")),), (TOP1,),
          labels={"r50-efficient": "ResNet-50"}),
    Table("table4", "Table 4: the efficient-training tricks one at a time, ResNet-50, batch 256 | 1024",
          (("BS=256", TABLE4_256), ("BS=1024", TABLE4_1024)), (TOP1,),
          "FP16 is bf16 autocast here (the CPU has no fast FP16)."),
    Table("table3", "Table 3: baseline (BS256, FP32) vs efficient (BS1024, FP16) training",
          (("ResNet-50", ("r50-baseline", "r50-efficient")), ("MobileNet", ("mobilenet-baseline", "mobilenet-efficient")),
           ("Inception-V3", ("inception-baseline", "inception-efficient"))),
          (TOP1, Metric("s_per_epoch", "s/epoch", "min/epoch (8 V100)", "min_per_epoch")),
          "Time per epoch: our last epoch's training time on one CPU thread, beside the paper's minutes on 8 V100s; "
          "low precision is bf16 autocast, which an Intel CPU without AMX runs slower than FP32 and one with AMX "
          "(or an AMD CPU with AVX-512-BF16) faster for dense convolutions (slower for MobileNet's depthwise ones): the machine is under Runs.",
          labels={"r50-baseline": "baseline (BS256, FP32)", "r50-efficient": "efficient (BS1024, FP16)"}),
    Table("table6", "Table 6: the training refinements on top of efficient training",
          (("ResNet-50-D", TABLE6["resnet"]), ("MobileNet", TABLE6["mobilenet"]), ("Inception-V3", TABLE6["inception"])),
          (TOP1,), "Teacher: a quarter-width ResNet-101-D (the paper: ResNet-152-D) trained once (seed 0) with "
          "cosine + label smoothing (+ mixup for the last row), temperature 20.",
          labels={"r50d-efficient": "efficient", "mobilenet-efficient": "efficient", "inception-efficient": "efficient"}),
    Table("table8", "Table 8: ImageNet-pretrained backbones fine-tuned in Faster R-CNN (VOC07 mAP)",
          (("ResNet-50", tuple(f"det-{b}" for b in BACKBONES_89)),),
          (Metric("mAP", "VOC07 mAP %", "VOC07 mAP %"),), labels=LABELS_89),
    Table("table9", "Table 9: ImageNet-pretrained backbones fine-tuned in the dilated FCN (ADE20K)",
          (("ResNet-50", tuple(f"seg-{b}" for b in BACKBONES_89)),),
          (Metric("aAcc", "pixel acc %", "pixAcc %"), Metric("mIoU", "mIoU %", "mIoU %")), labels=LABELS_89),
)}
SCALE = ("Fashion-MNIST at 28 px (Inception-V3: 75 px) in memory, 2 epochs (mixup rows 3, as the paper's 200 vs 120), "
         "batch 256 / 1024 with lr 0.1 per 256, step decay at 25/50/75% of training, warm-up 10%, bf16 as low "
         "precision; ResNet-50 family, MobileNet and Inception-V3 at quarter width; teacher a quarter-width "
         "ResNet-101-D trained once (seed 0) at 28 px; Tables 8-9 fine-tune each seed's backbone on the embedded VOC/ADE20K-layout scenes with "
         "the schedules of configs/detection/fashion_voc and configs/segmentation/fashion_scenes.")
ORDER = ("table5", "table4", "table3", "table6", "table8", "table9")   # cheapest complete tables first


# ------------------------------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std of one value is nan."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, std


def verdict(ours: Sequence[float], above: Sequence[float], paper_change: float) -> str:
    """The step from ``above`` to ``ours`` against the paper's change: "within noise" when |change| is less than
    two standard errors of the difference of the means, else "same direction" or "opposite"."""
    if len(ours) < 2 or len(above) < 2:
        return "n/a (1 seed)"
    (m1, s1), (m0, s0) = mean_std(ours), mean_std(above)
    change = m1 - m0
    se = math.sqrt(s1 ** 2 / len(ours) + s0 ** 2 / len(above))
    if abs(change) < 2 * se:
        return "within noise"
    if paper_change == 0:
        return "paper: no change"
    return "same direction" if (change > 0) == (paper_change > 0) else "opposite"


# ---------------------------------------------------------------------------------------------- resolving
def quick_overrides(row: Row, epochs: Optional[int] = None, iters: Optional[int] = None) -> list[str]:
    """``--epochs``/``--iters``: classification rows scaled from BASE_EPOCHS to ``epochs`` (milestones and warm-up
    at the same fractions; the longer mixup rows keep their ratio) and cut after ``iters`` optimizer steps; the
    fine-tuning rows' iteration schedules scaled to ``iters`` iterations."""
    out: list[str] = []
    if row.task == "classification" and epochs:
        from tricks.cli import load_task_config

        cfg = load_task_config(str(REPO / row.config), _logical(row))
        scale = epochs / BASE_EPOCHS
        new = max(1, round(cfg.train.epochs * scale))
        ratio = new / cfg.train.epochs
        out += [f"train.epochs={new}", f"optim.milestones=[{','.join(f'{m * ratio:g}' for m in cfg.optim.milestones)}]",
                f"optim.warmup_epochs={cfg.optim.warmup_epochs * ratio:g}"]
    if iters and row.task == "classification":
        out.append(f"train.max_steps={iters}")
    elif iters:   # detection / segmentation: the iteration schedule scaled to `iters` (warm-up, steps at the same fractions)
        cfg = resolved_config(row)
        scale = iters / cfg.train.max_iter
        out += [f"train.max_iter={iters}", f"optim.warmup_iters={round(cfg.optim.warmup_iters * scale)}"]
        if row.task == "detection":
            out.append(f"optim.milestones=[{','.join(str(round(m * scale)) for m in cfg.optim.milestones)}]")
    return out


def _logical(row: Row) -> list[str]:
    """The row's overrides with its placeholders left in (they are strings to the schema)."""
    return list(row.overrides)


def resolved_config(row: Row, extra: Sequence[str] = ()):
    """The row's config object (placeholders unresolved) + ``extra`` overrides."""
    from tricks.cli import load_task_config

    return load_task_config(str(REPO / row.config), [*_logical(row), *extra])


def flat(cfg) -> dict[str, Any]:
    """A config object as ``{"section.key": value}``."""
    from runtime.config import to_dict

    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value and prefix.count(".") < 1 and not prefix.endswith("kwargs"):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value

    for k, v in to_dict(cfg).items():
        walk(k, v)
    return out


def config_diff(a, b) -> dict[str, tuple[Any, Any]]:
    """``{key: (value in a, value in b)}`` for every key whose value differs."""
    fa, fb = flat(a), flat(b)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


RUN_KEYS = ("output_dir", "train.seed", "train.resume")   # where and which seed: not part of the recipe


def row_key(row: Row, extra: Sequence[str] = ()) -> str:
    """``<row id>-<8 hex>``: a hash of the row's resolved config where it differs from the schema's defaults."""
    import hashlib

    cfg = resolved_config(row, extra)
    defaults = flat(type(cfg)())
    values = {k: v for k, v in flat(cfg).items() if k not in RUN_KEYS and defaults.get(k) != v}
    digest = hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{row.id}-{digest}"


# -------------------------------------------------------------------------------------------------- running
def machine() -> dict[str, Any]:
    import torch

    from runtime.precision import cpu_description

    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu": cpu_description(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


@functools.lru_cache(maxsize=None)   # once per process: the code that runs is the code of its start
def commit() -> str:
    """The repository's commit (``+dirty`` with uncommitted changes to tracked files)."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Reproduction:
    """The runs of some tables under ``out``: records, weights, data, reports."""

    def __init__(self, out: Path | str, seeds: int = 3, epochs: Optional[int] = None, iters: Optional[int] = None,
                 nets: Sequence[str] = DEFAULT_NETS, runner: Optional[Callable[[Any], dict]] = None):
        self.out = Path(out)
        self.seeds, self.epochs, self.iters, self.nets = seeds, epochs, iters, tuple(nets)
        self.runner = runner
        self.records_dir = self.out / "records"
        commit()   # read now: the records name the code this process started with, not later edits of the tree
        self.started = time.time()
        self.ran = 0
        self._keys: dict[str, str] = {}
        self.failed: list[str] = []

    # names and paths
    def extra(self, row: Row) -> list[str]:
        return quick_overrides(row, self.epochs, self.iters)

    def key(self, row: Row) -> str:
        if row.id not in self._keys:   # loading the YAML files is the slow part of writing a report
            self._keys[row.id] = row_key(row, self.extra(row))
        return self._keys[row.id]

    def seeds_of(self, row: Row) -> list[int]:
        return [0] if row.once else list(range(self.seeds))

    def record_path(self, row: Row, seed: int) -> Path:
        return self.records_dir / f"{self.key(row)}-seed{seed}.json"

    def run_dir(self, row: Row, seed: int) -> Path:
        return self.out / "runs" / self.key(row) / f"seed{seed}"

    def record(self, row: Row, seed: int) -> Optional[dict]:
        path = self.record_path(row, seed)
        return json.loads(path.read_text()) if path.is_file() else None

    def wanted(self, row: Row) -> bool:
        return row.net in self.nets

    # placeholders
    def _weights(self, row_id: str, seed: int) -> str:
        """A row's ``model.safetensors`` for seed ``seed`` (seed 0 for a row trained once): trained now if missing."""
        row = ROWS[row_id]
        seed = 0 if row.once else seed
        path = self.run_dir(row, seed) / "model.safetensors"
        if not path.is_file():
            self.run(row, seed, force=True)
        return str(path)

    def _data(self, kind: str) -> str:
        if kind == "scenes":
            from segmentation.scenes import write_fashion_scenes

            return str(write_fashion_scenes(self.out / "data" / "fashion_scenes" / "ADEChallengeData2016", 2000, 500,
                                            seed=0))
        from detection.scenes import write_fashion_voc

        devkit = write_fashion_voc(self.out / "data" / "fashion_voc", 2000, 500, seed=0)
        return str(devkit / "classes.txt") if kind == "voc_classes" else str(devkit)

    def overrides(self, row: Row, seed: int) -> list[str]:
        """The overrides ``tricks train`` gets: the row's, placeholders resolved, seed, output folder, resume."""
        def resolve(text: str) -> str:
            def one(m: re.Match) -> str:
                kind, _, arg = m.group(1).partition(":")
                return self._weights(arg, seed) if kind == "weights" else self._data(kind)
            return re.sub(r"<(weights:[\w-]+|voc|voc_classes|scenes)>", one, text)

        return [*(resolve(o) for o in row.overrides), *self.extra(row), f"train.seed={seed}",
                f"output_dir={self.run_dir(row, seed)}", "train.resume=auto"]

    def run(self, row: Row, seed: int, force: bool = False) -> dict:
        """The row-seed's record: read back if it exists (unless ``force``: weights a later row needs are gone),
        else trained now (continuing a killed run from its last checkpoint) and recorded."""
        existing = self.record(row, seed)
        if existing is not None and not force:
            return existing
        overrides = self.overrides(row, seed)
        command = f"tricks train {row.config} {' '.join(overrides)}"
        print(f"\n== {row.id} seed {seed} ({row.label}) ==\n   {command}", flush=True)
        from tricks.cli import load_task_config, run_config

        cfg = load_task_config(str(REPO / row.config), overrides)
        tic = time.perf_counter()
        diverged = None
        try:
            metrics = (self.runner or run_config)(cfg)
        except Exception as e:  # noqa: BLE001 - only the trainer's divergence is a result; anything else re-raises
            if type(e).__name__ != "TrainingDiverged":
                raise
            metrics, diverged = {}, str(e).splitlines()[0]
        wall = time.perf_counter() - tic
        record = {"row": row.id, "label": row.label, "key": self.key(row), "seed": seed, "task": row.task,
                  "config": row.config, "overrides": [_relative_to(o, self.out) for o in overrides],
                  "row_overrides": list(row.overrides), "quick_overrides": self.extra(row),
                  "metrics": _metrics(row, metrics, cfg), "diverged": diverged, "wall_s": round(wall, 1),
                  "machine": machine(), "commit": commit(), "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "command": f"tricks train {row.config} {' '.join(_relative_to(o, self.out) for o in overrides)}"}
        path = self.record_path(row, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=_json_default) + "\n")
        tmp.replace(path)
        for ckpt in ("last.pth", "best.pth"):   # the record marks the run finished; keep model.safetensors
            (Path(cfg.output_dir) / ckpt).unlink(missing_ok=True)
        self.ran += 1
        return record

    def rows_of(self, table: Table) -> list[Row]:
        ids = [rid for _, group in table.groups for rid in group]
        return [ROWS[rid] for rid in dict.fromkeys(ids) if self.wanted(ROWS[rid])]

    def run_table(self, table: Table, run: bool = True) -> Path:
        """Every wanted row of ``table`` for every seed (seed by seed, so a one-seed table lands first), then its
        report. ``run=False`` only writes the report from the records present."""
        if run:
            for seed in range(self.seeds):
                for row in self.rows_of(table):
                    if seed not in self.seeds_of(row):
                        continue
                    try:
                        self.run(row, seed)
                    except Exception as e:  # noqa: BLE001 - a long unattended run goes on with the other rows
                        import traceback

                        traceback.print_exc()
                        self.failed.append(f"{row.id} seed {seed}: {type(e).__name__}: {e}".splitlines()[0])
                        print(f"!! {self.failed[-1]} (no record written; the next invocation retries it)", flush=True)
                    self.write_report(table, plot=False)   # the table so far, after every run
        return self.write_report(table)

    # reports
    def values(self, row: Row, metric: str) -> list[float]:
        out = []
        for seed in self.seeds_of(row):
            rec = self.record(row, seed)
            if rec is not None and rec["metrics"].get(metric) is not None:
                out.append(float(rec["metrics"][metric]))
        return out

    def write_report(self, table: Table, plot: bool = True) -> Path:
        """``OUT/<table>.md`` (and with ``plot`` ``OUT/<table>.png``) from the records present."""
        self.out.mkdir(parents=True, exist_ok=True)
        md = render_markdown(table, self.values, self.seeds, self._context(table),
                             complexity=table5_complexity() if table.name == "table5" else None)
        path = self.out / f"{table.name}.md"
        path.write_text(md)
        if plot:
            plot_table(table, self.values, self.out / f"{table.name}.png", self.nets)
        return path

    def _context(self, table: Table) -> dict[str, Any]:
        recs = [r for row in self.rows_of(table) for s in self.seeds_of(row) if (r := self.record(row, s))]
        commands = {}
        for row in self.rows_of(table):
            overrides = [*row.overrides, *self.extra(row), "train.seed=<seed>"]
            commands[row.id] = f"tricks train {row.config} {' '.join(overrides)}"
        machines = sorted({f"{m.get('cpu', m['machine'])}, {m['cpus']} CPUs, {m['threads']} thread(s), torch {m['torch']}"
                           for m in (r["machine"] for r in recs)})
        return {"records": len(recs), "wanted": sum(len(self.seeds_of(r)) for r in self.rows_of(table)),
                "wall_s": sum(r["wall_s"] for r in recs), "machines": machines,
                "commits": sorted({r["commit"] for r in recs}), "commands": commands,
                "nets": self.nets, "quick": {k for row in self.rows_of(table) for k in self.extra(row)}}


def _relative_to(text: str, out: Path) -> str:
    """An override with ``out`` written as ``$OUT``: records stay meaningful when the folder is copied."""
    return text.replace(str(out), "$OUT")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def _metrics(row: Row, metrics: dict, cfg) -> dict[str, Any]:
    """What a record keeps of a run's metrics (small: no per-image detections)."""
    if row.task == "classification":
        keep = {k: metrics.get(k) for k in ("top1", "top5", "loss", "images", "epoch", "train_time_s", "train_img_per_s")}
        keep["s_per_epoch"] = metrics.get("train_time_s")
        return keep
    if row.task == "detection":
        return {"mAP": metrics.get("mAP"), "AP": metrics.get("AP"), "images": metrics.get("images")}
    return {k: metrics.get(k) for k in ("mIoU", "mAcc", "aAcc", "images")} | {"IoU": metrics.get("IoU")}


@functools.lru_cache(maxsize=None)
def table5_complexity() -> dict[str, tuple[str, str]]:
    """Parameters and multiply-adds of the Table 5 networks as trained here (1x28x28, quarter width, 10 classes)."""
    from backbones import profile_backbone as profile

    out = {}
    for row_id in TABLES["table5"].groups[0][1]:
        name = dict(o.split("=", 1) for o in ROWS[row_id].overrides).get("model.name", "resnet50")
        prof = profile(name, (1, 28, 28), in_chans=1, num_classes=10, width_mult=0.25)
        out[row_id] = (f"{prof['params'] / 1e6:.2f}M", f"{prof['macs'] / 1e6:.1f}M")
    return out


PAPER_COMPLEXITY = {"r50-efficient": ("25M", "3.86G"), "r50b-efficient": ("25M", "4.36G"),
                    "r50c-efficient": ("25M", "4.35G"), "r50d-efficient": ("25M", "4.35G")}


def _fmt(mean: float, std: float, n: int) -> str:
    if n == 0:
        return "pending"
    return f"{mean:.2f}" if n == 1 else f"{mean:.2f} ± {std:.2f}"


def render_markdown(table: Table, values: Callable[[Row, str], list[float]], seeds: int, context: dict[str, Any],
                    complexity: Optional[dict[str, tuple[str, str]]] = None) -> str:
    """The table in the paper's layout: per row and column group our mean ± std over the seeds, the change from the
    row above, the paper's number and change beside it, and the verdict of the step."""
    from runtime.logger import format_duration

    lines = [f"# {table.title}", "",
             f"Small scale: {SCALE} {seeds} seed(s). Mean ± sample std over the seeds; Δ: change from the row "
             "above; verdict: within noise when |Δ| < 2 standard errors of the difference, else same direction as "
             "the paper's Δ or opposite. Wall times are per run on the thread count listed under Runs (the long "
             "run: one thread).", ""]
    if table.note:
        lines += [table.note, ""]
    for group, ids in table.groups:
        rows = [ROWS[i] for i in ids]
        if not all(r.net in context["nets"] for r in rows):
            lines += [f"## {group}", "", f"Not run (`--nets` {','.join(context['nets'])}; add "
                      f"`--nets {','.join(dict.fromkeys([*context['nets'], rows[0].net]))}`).", ""]
            continue
        header = ["row"]
        if table.name in ("table8", "table9"):
            header += ["backbone top-1 % (ours)", "ImageNet top-1 % (paper)"]
        if complexity is not None:
            header += ["params (ours)", "MACs (ours)", "params (paper)", "FLOPs (paper)"]
        for m in table.metrics:
            header += [f"{m.label} (ours)", "Δ", f"{m.paper_label} (paper)", "Δ paper"]
            if m.verdict:
                header.append("verdict")
        lines += [f"## {group}", "", "| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
        for i, row in enumerate(rows):
            cells = [table.label(row)]
            if table.name in ("table8", "table9"):
                top1 = values(ROWS[row.backbone], "top1")
                cells += [_fmt(*mean_std(top1), len(top1)), f"{row.paper['top1']:.2f}"]
            if complexity is not None:
                cells += [*complexity[row.id], *PAPER_COMPLEXITY[row.id]]
            for m in table.metrics:
                ours = values(row, m.key)
                mean, std = mean_std(ours)
                paper = row.paper.get(m.paper_key or m.key)
                cells.append(_fmt(mean, std, len(ours)))
                if i == 0:
                    cells += ["", f"{paper:.2f}" if paper is not None else "-", ""]
                    if m.verdict:
                        cells.append("")
                    continue
                above = rows[i - 1]
                prev = values(above, m.key)
                paper_prev = above.paper.get(m.paper_key or m.key)
                change = mean - mean_std(prev)[0] if ours and prev else math.nan
                pchange = paper - paper_prev if paper is not None and paper_prev is not None else math.nan
                cells += ["" if math.isnan(change) else f"{change:+.2f}", f"{paper:.2f}" if paper is not None else "-",
                          "" if math.isnan(pchange) else f"{pchange:+.2f}"]
                if m.verdict:
                    cells.append(verdict(ours, prev, pchange) if ours and prev else "pending")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Commands", "", "Each row is `tricks train CONFIG OVERRIDES` (the reproduction adds "
              "`output_dir=OUT/runs/<row>-<hash>/seed<N> train.resume=auto`; `<weights:ROW>` is that row's "
              "`model.safetensors`, `<voc>`/`<scenes>` the embedded data):", ""]
    lines += [f"- `{row_id}`: `{cmd}`" for row_id, cmd in context["commands"].items()]
    lines += ["", "## Runs", "",
              f"- records: {context['records']} of {context['wanted']} row-seeds finished",
              f"- wall time of those runs: {format_duration(context['wall_s'])} (each run on the thread count below)",
              f"- machine: {'; '.join(context['machines']) or '-'}",
              f"- commit: {', '.join(context['commits']) or '-'}"]
    if context["quick"]:
        lines.append(f"- shortened with {' '.join(sorted(context['quick']))}: not the full schedule")
    return "\n".join(lines) + "\n"


def plot_table(table: Table, values: Callable[[Row, str], list[float]], path: Path, nets: Sequence[str] = NETS) -> None:
    """Per column group (of the networks in ``nets``) and metric: our mean ± std per row (left axis) and the paper's
    number (right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(g, ids, m) for g, ids in table.groups for m in table.metrics if all(ROWS[i].net in nets for i in ids)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (group, ids, m) in zip(axes[0], panels):
        rows = [ROWS[i] for i in ids]
        x = list(range(len(rows)))
        stats = [mean_std(values(r, m.key)) for r in rows]
        ax.errorbar(x, [s[0] for s in stats], yerr=[0 if math.isnan(s[1]) else s[1] for s in stats], fmt="o-",
                    capsize=3, label="ours (mean ± std)", color="C0")
        ax.set_ylabel(f"ours: {m.label}", color="C0")
        paper = [r.paper.get(m.paper_key or m.key, math.nan) for r in rows]
        if not all(math.isnan(p) for p in paper):
            twin = ax.twinx()
            twin.plot(x, paper, "s--", color="C1", label="paper")
            twin.set_ylabel(f"paper: {m.paper_label}", color="C1")
        ax.set_xticks(x, [table.label(r) for r in rows], rotation=35, ha="right", fontsize=7)
        ax.set_title(f"{group}: {m.label}", fontsize=9)
    fig.suptitle(table.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def expand(tables: Sequence[str]) -> list[str]:
    """``all`` -> every table in ORDER; unknown names are an error naming the choices."""
    names: list[str] = []
    for name in tables:
        if name == "all":
            names += ORDER
        elif name in TABLES:
            names.append(name)
        else:
            raise UsageError(f"unknown table {name!r}; choose from {', '.join(ORDER)} or all")
    return list(dict.fromkeys(names))


def reproduce(tables: Sequence[str], out: Path | str = "runs/reproduce", seeds: int = 3, epochs: Optional[int] = None,
              iters: Optional[int] = None, nets: Sequence[str] = DEFAULT_NETS, run: bool = True,
              runner: Optional[Callable[[Any], dict]] = None) -> list[Path]:
    """Run (or with ``run=False`` only report) ``tables`` under ``out``; returns the Markdown files written."""
    unknown = [n for n in nets if n not in NETS]
    if unknown:
        raise UsageError(f"--nets: unknown {unknown}; choose from {', '.join(NETS)}")
    repro = Reproduction(out, seeds, epochs, iters, nets, runner)
    written = []
    for name in expand(tables):
        written.append(repro.run_table(TABLES[name], run=run))
        print(f"-> {written[-1]}", flush=True)
    if repro.failed:
        raise RuntimeError(f"tricks reproduce: {len(repro.failed)} row-seed(s) failed: " + "; ".join(repro.failed))
    return written
