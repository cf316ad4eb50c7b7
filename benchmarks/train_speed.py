"""Training throughput: (1) the whole trainer vs the bare train step on the same model and batch;
(2) our ResNet-50-D vs timm's resnet50d, same precision and memory format.

Both comparisons are measured in one process, interleaved round by round, so machine noise hits
both sides alike; the ratios are the result. Run: ``python benchmarks/train_speed.py``.
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
from benchmarks._common import RESULTS, header, paired_seconds, table, train_step  # noqa: E402

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


def paired_step_rates(model_a, model_b, batch: int, size: int, dtype, steps: int) -> tuple[float, float]:
    """img/s of two models' train steps, alternated step by step (``paired_seconds``)."""
    seconds = paired_seconds([train_step(m, batch, size, 3, 1000, dtype) for m in (model_a, model_b)], steps)
    return batch / seconds[0], batch / seconds[1]


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
    p.add_argument("--r50-batch", type=int, default=16)
    p.add_argument("--r50-steps", type=int, default=6)
    args = p.parse_args()
    bf16 = torch.bfloat16
    cfg = load_config(FASHION, Config)

    trainer, bare, ours, timm_rates = [], [], [], []
    import timm

    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            trainer.append(trainer_rate(120, Path(tmp) / f"run{r}"))
            model = create_backbone(cfg.model.name, in_chans=cfg.model.in_chans, num_classes=10,
                                    zero_init_last=True, **model_kwargs(cfg))
            bare.append(bare_step_rate(model, cfg.train.batch_size, cfg.data.img_size, cfg.model.in_chans, 10,
                                       bf16, 30))
            a, b = paired_step_rates(create_backbone("resnet50d"), timm.create_model("resnet50d"), args.r50_batch,
                                     224, bf16, args.r50_steps)
            ours.append(a)
            timm_rates.append(b)
            print(f"round {r}: trainer {trainer[-1]:.0f}, bare {bare[-1]:.0f}, ours r50d {ours[-1]:.1f}, "
                  f"timm r50d {timm_rates[-1]:.1f} img/s", flush=True)

    report(cfg, args, trainer, bare, ours, timm_rates)


def report(cfg, args, trainer, bare, ours, timm_rates, note: str = "") -> None:
    """Write results/train_speed.md and .png. The ratio is the median of the per-round ratios: the two
    sides of a round run minutes apart at most, while the machine's speed drifts between rounds."""
    med = statistics.median
    r_trainer = med(a / b for a, b in zip(trainer, bare))
    r_r50 = med(a / b for a, b in zip(ours, timm_rates))
    rows = [
        [f"Fashion-MNIST ResNet-18-D (width {cfg.model.width_mult}, 1x{cfg.data.img_size}x{cfg.data.img_size}, "
         f"batch {cfg.train.batch_size}, bf16, channels_last)", "whole trainer (`tricks train`)",
         f"{med(trainer):.0f}", "bare train step", f"{med(bare):.0f}", f"{r_trainer:.2f}", ">= 0.90"],
        [f"ResNet-50-D train step (3x224x224, batch {args.r50_batch}, bf16, channels_last)", "suite `resnet50d`",
         f"{med(ours):.1f}", "timm `resnet50d`", f"{med(timm_rates):.1f}", f"{r_r50:.2f}", ">= 1.00"],
    ]
    md = header("Training throughput") + (
        f"\n{args.rounds} rounds; each round measures every side once, and the two ResNet-50-D models alternate "
        f"step by step within a round ({args.r50_steps} steps each). img/s columns are medians over rounds; the "
        "ratio is the median of the per-round ratios, because the shared machine's speed drifts by up to 30% "
        "between rounds.\n\n"
        + table(rows, ["what", "ours", "img/s", "reference", "img/s", "ratio", "target"])
        + "\nPer round (trainer / bare / ours r50d / timm r50d): "
        + "; ".join(f"{a:.0f} / {b:.0f} / {c:.1f} / {d:.1f}" for a, b, c, d in zip(trainer, bare, ours, timm_rates))
        + "\n\n![throughput](train_speed.png)\n" + note)
    _plot(trainer, bare, ours, timm_rates)
    (RESULTS / "train_speed.md").write_text(md)
    print(md)


def _plot(trainer, bare, ours, timm_rates) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, (title, a, b, la, lb) in zip(axes, [
        ("Fashion-MNIST ResNet-18-D", trainer, bare, "whole trainer", "bare step"),
        ("ResNet-50-D train step", ours, timm_rates, "suite", "timm")]):
        ax.bar([la, lb], [statistics.median(a), statistics.median(b)], color=["tab:blue", "tab:gray"])
        for i, vals in enumerate((a, b)):
            ax.scatter([i] * len(vals), vals, color="k", s=10, zorder=3)
        ax.set_title(title)
        ax.set_ylabel("img/s")
    fig.tight_layout()
    fig.savefig(RESULTS / "train_speed.png", dpi=100)


if __name__ == "__main__":
    main()
