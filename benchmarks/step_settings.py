"""The segmentation demo's train step (half-width ResNet-18-D FCN-D8, batch 8, 96x96 crops, forward + both
losses + backward + SGD) in each precision, memory format and ``torch.compile`` setting: which setting is
fastest on this machine, and what compiling costs. ``--task detection``: the detection demo's Faster R-CNN
train step (torchvision engine, batch 8 of 128x128 scenes at the config's sizes; precision and memory format,
no compile: multi-scale inputs recompile per size). ``--task classification`` / ``speedrun``: the Fashion-MNIST
paper recipe's / speedrun recipe's train step (the config's network, batch and input size). ``tricks bench``
compares the suite with the reference libraries at one setting; this compares the settings, by the same method
(alternated rounds, medians of per-round ratios to the first setting).

Run: ``python benchmarks/step_settings.py [--task segmentation|detection|classification|speedrun] [--rounds 3]
[--threads 1] [--no-compile] [--warm-cache] [--out DIR]``

The compilation is timed cold (inductor's on-disk caches off) unless ``--warm-cache``: a first run's cost.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import RESULTS, commit, header, table  # noqa: E402
from benchmarks.bench import DET_CONFIG, SEG_CONFIG, Spread, ratios, round_values, run_rounds  # noqa: E402

# (label, autocast dtype or None, channels_last, compiled); the first is the reference of the ratios
SETTINGS = (("bf16 autocast, channels_last", torch.bfloat16, True, False),
            ("bf16 autocast, contiguous", torch.bfloat16, False, False),
            ("fp32, channels_last", None, True, False),
            ("fp32, contiguous", None, False, False),
            ("fp32, channels_last, torch.compile", None, True, True),
            ("bf16 autocast, channels_last, torch.compile", torch.bfloat16, True, True))


def seg_step(dtype, channels_last: bool, compiled: bool, batch: int = 8, size: int = 96):
    """A closure of one train step of the demo's FCN in the given setting (as ``segmentation.train`` runs it)."""
    from segmentation.train import build_model
    from tricks.cli import load_task_config

    cfg = load_task_config(str(Path(__file__).resolve().parents[1] / SEG_CONFIG), [])
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(cfg, pretrained=False).to(memory_format=fmt).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    forward = torch.compile(model) if compiled else model
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, cfg.data.num_classes, (batch, size, size))
    aux_weight = cfg.model.aux_weight

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = forward(x)
        loss = F.cross_entropy(out["out"].float(), y) + aux_weight * F.cross_entropy(out["aux"].float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def det_step(dtype, channels_last: bool, compiled: bool, batch: int = 8, size: int = 128):
    """A closure of one train step of the detection demo's Faster R-CNN (as ``detection.train`` runs it: the
    model resizes each 128x128 scene to a shorter side drawn from ``model.min_size_train``)."""
    from detection.train import build_model
    from tricks.cli import load_task_config

    assert not compiled
    cfg = load_task_config(str(Path(__file__).resolve().parents[1] / DET_CONFIG),
                           [f"model.channels_last={str(channels_last).lower()}"])
    torch.manual_seed(0)
    model = build_model(cfg, 10).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        xy = torch.rand(3, 2, generator=g) * (size - 56)
        wh = 28 + torch.rand(3, 2, generator=g) * 28
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 11, (3,), generator=g)})
    steps = [0]

    def step() -> None:
        torch.manual_seed(steps[0] % 4)  # the same 4 multi-scale draws in every setting and round
        steps[0] += 1
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            losses = model(images, targets)
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


FASHION_CONFIGS = Path(__file__).resolve().parents[1] / "configs/classification/fashion_mnist"


def cls_step(dtype, channels_last: bool, compiled: bool,
             config: str = "resnet18d_1xb128_efficient-cosine-ls_fashion-mnist"):
    """A closure of one train step of a Fashion-MNIST recipe (the config's network, batch and input size; forward,
    label-smoothed cross-entropy, backward, SGD), as ``classification.train`` runs it."""
    from classification.config import Config
    from classification.train import build_model
    from runtime.config import load_config

    cfg = load_config(str(FASHION_CONFIGS / f"{config}.yaml"), Config, [])
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(cfg, 10).to(memory_format=fmt).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                nesterov=True, weight_decay=5e-4)
    forward = torch.compile(model) if compiled else model
    size = cfg.data.img_size
    x = torch.randn(cfg.train.batch_size, cfg.model.in_chans, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (cfg.train.batch_size,))

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = forward(x)
        F.cross_entropy(out.float(), y, label_smoothing=cfg.train.label_smoothing).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def speedrun_step(dtype, channels_last: bool, compiled: bool):
    return cls_step(dtype, channels_last, compiled, "airbench_1xb512_speedrun-cosine_fashion-mnist")


TASKS = {"segmentation": (seg_step, "step_settings", "Segmentation train step",
                          "The demo's FCN (half-width ResNet-18-D, output stride 8, batch 8, 96x96, 11 classes)."),
         "detection": (det_step, "step_settings_detection", "Detection train step",
                       "The detection demo's Faster R-CNN + FPN (torchvision engine; half-width ResNet-18-D, FPN 64 "
                       "channels, batch 8 scenes of 128x128 resized to a shorter side of 112-160, 10 classes)."),
         "classification": (cls_step, "step_settings_classification",
                            "Classification train step (Fashion-MNIST paper recipe)",
                            "The paper recipe's network on Fashion-MNIST "
                            "(`resnet18d_1xb128_efficient-cosine-ls_fashion-mnist.yaml`: "
                            "half-width ResNet-18-D, batch 128, 1x42x42, label smoothing 0.1)."),
         "speedrun": (speedrun_step, "step_settings_speedrun",
                      "Classification train step (Fashion-MNIST speedrun recipe)",
                      "The speedrun recipe's network (`airbench_1xb512_speedrun-cosine_fashion-mnist.yaml`: airbench "
                      "widths 32/128/128, batch 512, 1x28x28, label smoothing 0.2).")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), default="segmentation")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting and round")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile settings")
    p.add_argument("--warm-cache", action="store_true", help="let torch.compile use its on-disk caches")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory of the Markdown + PNG (default: %(default)s)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.warm_cache:
        torch.compiler.config.force_disable_caches = True
    if args.threads:
        torch.set_num_threads(args.threads)
    measured_commit = commit()
    build, stem, title, what = TASKS[args.task]
    settings = [s for s in SETTINGS if not ((args.no_compile or args.task == "detection") and s[3])]
    steps, first_call = [], []
    for label, dtype, channels_last, compiled in settings:
        step = build(dtype, channels_last, compiled)
        tic = time.perf_counter()
        step()  # eager: warm-up; compiled: compilation (forward and backward graphs)
        first_call.append(time.perf_counter() - tic)
        step()
        steps.append(step)
        print(f"{label}: first call {first_call[-1]:.1f} s", flush=True)

    def measure(step):
        def timed() -> list[float]:
            out = []
            for _ in range(args.steps):
                tic = time.perf_counter()
                step()
                out.append(time.perf_counter() - tic)
            return out
        return timed

    times = run_rounds([measure(s) for s in steps], args.rounds, warmup_calls=0)
    per_round = round_values(times)
    rows = []
    for j, (label, *_rest) in enumerate(settings):
        r = Spread.of(ratios(times, ours=j, reference=0))
        rows.append([label, f"{Spread.of([v[j] for v in per_round]).median:.3f}", f"**{r.median:.2f}**",
                     f"{r.low:.2f}-{r.high:.2f}", " ".join(f"{x:.2f}" for x in ratios(times, ours=j, reference=0)),
                     f"{first_call[j]:.1f}"])
    command = "python benchmarks/step_settings.py " + " ".join(sys.argv[1:])
    text = header(f"{title}: precision, memory format, torch.compile", command, measured_commit)
    text += (f"- torch threads: {torch.get_num_threads()}; {args.rounds} alternated rounds x {args.steps} steps\n\n"
             f"{what} ratio = this "
             "setting's time per step / the first setting's, median of per-round ratios (< 1: faster), min-max "
             "over rounds. First call: the warm-up step, which for torch.compile is the compilation "
             f"({'inductor caches on' if args.warm_cache else 'cold: inductor caches off'}).\n\n")
    text += table(rows, ["setting", "s per step", "ratio", "min-max", "per round", "first call s"])
    text += f"\n![settings]({stem}.png)\n"
    (args.out / f"{stem}.md").write_text(text)
    _plot([r[0] for r in rows], [Spread.of(ratios(times, ours=j, reference=0)) for j in range(len(settings))],
          args.out / stem)
    print(text)


def _plot(labels, spreads, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.5 * len(labels) + 1))
    y = list(range(len(labels)))[::-1]
    ax.barh(y, [s.median for s in spreads], xerr=[[s.median - s.low for s in spreads],
                                                   [s.high - s.median for s in spreads]], capsize=2, color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlabel("time per step / bf16 channels_last (median of per-round ratios, whiskers min-max)")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
