"""``tricks demo``: the whole pipeline on the embedded real data (Fashion-MNIST from the Debian package).

1. Table 5 of the backbones (measured beside the paper's numbers).
2. classification: a half-width ResNet-18-D pretrained on Fashion-MNIST with the paper's tricks.
3. segmentation: that backbone fine-tuned in a dilated FCN on "fashion scenes" (ADE20K layout), mIoU.
4. detection: that backbone fine-tuned in Faster R-CNN + FPN on "fashion VOC" (VOCdevkit layout), VOC07 mAP.
5. ``<out>/REPORT.md``: the numbers, the curves, segmentation overlays and pictures of detections.

Every stage is an ordinary ``tricks train`` of a config under ``configs/`` with the overrides listed in
``STAGES`` (the report prints each command), so any stage can be rerun, or run at full length, by hand.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Stage:
    config: str                                         # relative to the repository root
    overrides: list[str] = field(default_factory=list)  # the demo's shortening of the config
    summary: str = ""


# The classification stage is the config's 12-epoch recipe cut to 6 epochs (benchmarks/results/fashion_mnist.md
# has the full-length numbers); the transfer stages run their configs as written, from its weights.
STAGES: dict[str, Stage] = {
    "classification": Stage("configs/classification/fashion_mnist/resnet18d_1xb128_efficient-cosine-ls_fashion-mnist.yaml",
                            ["train.epochs=6"], "ResNet-18-D (half width) pretrained on Fashion-MNIST with the paper's tricks"),
    "segmentation": Stage("configs/segmentation/fashion_scenes/fcn_resnet18d-d8_1xb8-1k_fashion-scenes.yaml", [],
                          "FCN-D8 fine-tuned from it on fashion scenes (ADE20K layout)"),
    "detection": Stage("configs/detection/fashion_voc/faster-rcnn_resnet18d-fpn_1xb8-400_fashion-voc.yaml",
                       ["model.norm=frozenbatchnorm", "model.frozen_stages=1"],
                       "Faster R-CNN + FPN fine-tuned from it on fashion VOC (VOCdevkit layout)"),
}


def split_overrides(overrides: Sequence[str]) -> dict[str, list[str]]:
    """``["segmentation.train.max_iter=50", ...]`` -> ``{"segmentation": ["train.max_iter=50"], ...}``."""
    from runtime.config import ConfigError

    by_stage: dict[str, list[str]] = {name: [] for name in STAGES}
    for item in overrides:
        stage, _, rest = item.partition(".")
        if stage not in STAGES or "=" not in rest:
            raise ConfigError(f"demo override {item!r}: write <stage>.<key>=<value> with a stage of "
                              f"{', '.join(STAGES)} (e.g. classification.train.epochs=12)")
        by_stage[stage].append(rest)
    return by_stage


def normalization_overrides(cls_cfg=None) -> list[str]:
    """``data.mean``/``data.std`` overrides that normalise a transfer stage's RGB input as the classification
    stage (``cls_cfg``; default: its config as the demo runs it) normalised its images: a 1-channel mean/std is
    repeated over the 3 channels, as ``adapt_input`` spreads the 1-channel stem over them."""
    if cls_cfg is None:
        from tricks.cli import load_task_config

        cls_cfg = load_task_config(str(REPO / STAGES["classification"].config), STAGES["classification"].overrides)
    mean, std = cls_cfg.data.mean, cls_cfg.data.std
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    return [f"data.mean=[{','.join(map(str, mean))}]", f"data.std=[{','.join(map(str, std))}]"]


def _pretrained_overrides(weights: Path, cls_cfg) -> list[str]:
    """A transfer stage starts from the classification run's weights and normalises as it did."""
    return [f"model.weights={weights}", *normalization_overrides(cls_cfg)]


def check_demo(out: Path | str, overrides: Sequence[str], stages: Sequence[str]) -> dict[str, list[str]]:
    """The demo's arguments, checked before anything runs: known stages (the transfer stages need the
    classification stage or its weights) and every stage's overrides against its config (a typo in a
    detection override was found only after the classification stage had trained). Returns the overrides
    per stage; a ``ConfigError`` names the stage and key."""
    from runtime.config import ConfigError
    from tricks.cli import load_task_config

    out = Path(out)
    extra = split_overrides(overrides)
    weights = out / "classification" / "model.safetensors"
    unknown = [s for s in stages if s not in STAGES]
    if unknown or (stages and "classification" not in stages and not weights.is_file()):
        raise ConfigError(f"demo stages {list(stages)}: choose from {list(STAGES)}; the transfer stages need the "
                          f"classification stage (or its {weights})")
    for name in stages:
        try:
            load_task_config(str(REPO / STAGES[name].config), [*STAGES[name].overrides, *extra[name]])
        except ConfigError as e:
            raise ConfigError(f"demo stage {name}: {e}") from None
    return extra


def run_demo(out: Path | str = "runs/demo", overrides: Sequence[str] = (), stages: Sequence[str] = tuple(STAGES),
             scenes: tuple[int, int] = (2000, 500), run: Callable | None = None) -> dict[str, Any]:
    """Run the demo's ``stages`` (classification first: the others fine-tune its weights) under ``out``;
    returns ``{stage: metrics}`` and writes ``out/REPORT.md``. ``scenes``: (train, test) scenes per set."""
    from tricks.cli import load_task_config, run_config

    run = run or run_config
    out = Path(out)
    extra = check_demo(out, overrides, stages)
    weights = out / "classification" / "model.safetensors"
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    commands: dict[str, str] = {}
    configs: dict[str, Any] = {}
    cls_cfg = load_task_config(str(REPO / STAGES["classification"].config),
                               [*STAGES["classification"].overrides, f"output_dir={out / 'classification'}",
                                *extra["classification"]])
    for name in stages:
        stage = STAGES[name]
        args = [*stage.overrides, f"output_dir={out / name}"]
        start = time.perf_counter()
        if name == "segmentation":
            from segmentation.scenes import write_fashion_scenes

            root = write_fashion_scenes(out / "data" / "fashion_scenes" / "ADEChallengeData2016", *scenes, seed=0)
            args += [f"data.root={root}", *_pretrained_overrides(weights, cls_cfg)]
        elif name == "detection":
            from detection.scenes import write_fashion_voc

            devkit = write_fashion_voc(out / "data" / "fashion_voc", *scenes, seed=0)
            args += [f"data.root={devkit}", f"data.classes={devkit / 'classes.txt'}",
                     *_pretrained_overrides(weights, cls_cfg)]
        args += extra[name]
        print(f"\n== {name}: {stage.summary} ==\n   tricks train {stage.config} {' '.join(args)}", flush=True)
        cfg = cls_cfg if name == "classification" else load_task_config(str(REPO / stage.config), args)
        results[name] = run(cfg)
        timings[name] = time.perf_counter() - start
        commands[name] = f"tricks train {stage.config} {' '.join(args)}"
        configs[name] = cfg
    report = write_report(out, results, timings, commands, configs)
    print(f"\n-> {report}")
    return results


def _relative(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path, start)


def write_report(out: Path, results: dict[str, Any], timings: dict[str, float], commands: dict[str, str],
                 configs: dict[str, Any]) -> Path:
    """``out/REPORT.md``: per stage its command, wall time, result, curves and pictures."""
    import math
    import platform

    import torch

    from runtime.logger import format_duration

    lines = ["# tricks demo: pretrain on Fashion-MNIST, then fine-tune for segmentation and detection", "",
             f"- machine: {platform.machine()}, {torch.get_num_threads()} threads, "
             f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}; torch {torch.__version__}",
             f"- finished: {time.strftime('%Y-%m-%d %H:%M %Z')}; total {format_duration(sum(timings.values()))}", "",
             "| stage | result | wall |", "|---|---|---:|"]
    for name, metrics in results.items():
        if name == "classification":
            result = f"top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}% ({metrics['images']} test images)"
        elif name == "segmentation":
            result = f"mIoU {metrics['mIoU']:.2f}%, mAcc {metrics['mAcc']:.2f}%, aAcc {metrics['aAcc']:.2f}% ({metrics['images']} images)"
        else:
            result = (f"VOC07 mAP {metrics['mAP']:.2f}%, AP {metrics['ap']:.2f}%, AP75 {metrics['ap75']:.2f}% "
                      f"({metrics['images']} test images)")
        lines.append(f"| {name} | {result} | {format_duration(timings[name])} |")
    for name, metrics in results.items():
        run_dir = Path(configs[name].output_dir)
        lines += ["", f"## {name}", "", f"`{commands[name]}`", ""]
        for plot in ("accuracy.png", "loss.png"):
            if (run_dir / plot).is_file():
                lines.append(f"![{name} {plot[:-4]}]({_relative(run_dir / plot, out)})")
        if name == "segmentation":
            lines += ["", "| class | IoU % |", "|---|---:|"]
            lines += [f"| {c} | {'-' if math.isnan(v) else f'{v:.2f}'} |" for c, v in metrics["IoU"].items()]
            lines += ["", "Validation scenes: the prediction blended over the image | the ground truth, blended the same way:", ""]
            lines += [f"![overlay]({_relative(p, out)})" for p in sorted((run_dir / "overlays").glob("*.png"))[:4]]
        elif name == "detection":
            lines += ["", "| class | AP % |", "|---|---:|"]
            lines += [f"| {c} | {v:.2f} |" for c, v in metrics["AP"].items()]
            lines += ["", f"Detections with score >= {configs[name].train.visualize_thresh} on test scenes "
                      "(ground truth in thin white):", ""]
            lines += [f"![detections]({_relative(p, out)})" for p in sorted((run_dir / "detections").glob("*.png"))[:8]]
    report = out / "REPORT.md"
    report.write_text("\n".join(lines) + "\n")
    return report
