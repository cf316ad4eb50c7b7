"""Training throughput: the whole trainer vs the bare train step on the same model and batch (the trainer's
overhead: data, logging, schedule). The suite vs timm and torchvision is a row of ``tricks bench``.

Measured in one process, round by round, so machine noise hits both sides alike; the ratio is the result.
Run: ``python benchmarks/train_speed.py``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import RESULTS, header, table, train_step  # noqa: E402

from backbones import create_backbone  # noqa: E402
from classification.config import Config  # noqa: E402
from classification.train import model_kwargs  # noqa: E402
from runtime.config import load_config  # noqa: E402

FASHION = "configs/classification/fashion_mnist/resnet18d_1xb128_efficient-cosine-ls_fashion-mnist.yaml"


def bare_step_rate(model, batch: int, size: int, in_chans: int, num_classes: int, dtype, steps: int) -> float:
    """img/s of the bare train step."""
    step = train_step(model, batch, size, in_chans, num_classes, dtype)
    for _ in range(2):
        step()
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - tic)


def trainer_rate(steps: int, out: Path) -> float:
    """img/s of `tricks train` on Fashion-MNIST as logged (last log window: warm-up excluded)."""
    from runtime.logger import read_records
    from classification.train import train

    cfg = load_config(FASHION, Config, [f"train.max_steps={steps}", f"train.log_every={steps // 2}",
                                        f"output_dir={out}"])
    train(cfg)
    return read_records(out / "metrics.jsonl", "train")[-1]["img_per_s"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    bf16 = torch.bfloat16
    cfg = load_config(FASHION, Config)

    trainer, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            trainer.append(trainer_rate(120, Path(tmp) / f"run{r}"))
            model = create_backbone(cfg.model.name, in_chans=cfg.model.in_chans, num_classes=10,
                                    zero_init_last=True, **model_kwargs(cfg))
            bare.append(bare_step_rate(model, cfg.train.batch_size, cfg.data.img_size, cfg.model.in_chans, 10,
                                       bf16, 30))
            print(f"round {r}: trainer {trainer[-1]:.0f}, bare {bare[-1]:.0f} img/s", flush=True)

    report(cfg, args, trainer, bare)


def report(cfg, args, trainer, bare, note: str = "") -> None:
    """Write results/train_speed.md and .png. The ratio is the median of the per-round ratios: the two
    sides of a round run minutes apart at most, while the machine's speed drifts between rounds."""
    med = statistics.median
    r_trainer = med(a / b for a, b in zip(trainer, bare))
    rows = [
        [f"Fashion-MNIST ResNet-18-D (width {cfg.model.width_mult}, 1x{cfg.data.img_size}x{cfg.data.img_size}, "
         f"batch {cfg.train.batch_size}, bf16, channels_last)", "whole trainer (`tricks train`)",
         f"{med(trainer):.0f}", "bare train step", f"{med(bare):.0f}", f"{r_trainer:.2f}", ">= 0.90"],
    ]
    md = header("Training throughput") + (
        f"\n{args.rounds} rounds; each round measures both sides once. img/s columns are medians over rounds; the "
        "ratio is the median of the per-round ratios, because the shared machine's speed drifts by up to 30% "
        "between rounds. The suite vs timm and torchvision: `tricks bench`.\n\n"
        + table(rows, ["what", "ours", "img/s", "reference", "img/s", "ratio", "target"])
        + "\nPer round (trainer / bare): "
        + "; ".join(f"{a:.0f} / {b:.0f}" for a, b in zip(trainer, bare))
        + "\n\n![throughput](train_speed.png)\n" + note)
    _plot(trainer, bare)
    (RESULTS / "train_speed.md").write_text(md)
    print(md)


def _plot(trainer, bare) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.bar(["whole trainer", "bare step"], [statistics.median(trainer), statistics.median(bare)],
           color=["tab:blue", "tab:gray"])
    for i, vals in enumerate((trainer, bare)):
        ax.scatter([i] * len(vals), vals, color="k", s=10, zorder=3)
    ax.set_title("Fashion-MNIST ResNet-18-D")
    ax.set_ylabel("img/s")
    fig.tight_layout()
    fig.savefig(RESULTS / "train_speed.png", dpi=100)


if __name__ == "__main__":
    main()
