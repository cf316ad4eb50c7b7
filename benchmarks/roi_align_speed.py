"""The box head's RoI pooling: ``detection.roi_align.FastMultiScaleRoIAlign`` vs torchvision's
``MultiScaleRoIAlign``, forward + backward, same features, boxes and output.

Two sizes: the detection demo's (8 images of 160 px, a 64-channel FPN, 128 RoIs per image) and detectron2's
VOC recipe (2 images of 800 x 1067 px, a 256-channel FPN, 512 RoIs per image). Boxes are drawn over the
image with sizes that spread them over the four levels. Rounds alternate the two poolers (A B, B A, ...);
the result is the median of the per-round ratios ours / torchvision's (< 1: ours is faster). Before the
rounds the run checks that both give the same outputs and feature gradients.

Run: ``OMP_NUM_THREADS=1 python benchmarks/roi_align_speed.py [--rounds 7]``
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import RESULTS, header, round_order, table  # noqa: E402

from torchvision.ops import MultiScaleRoIAlign  # noqa: E402

from detection.roi_align import FastMultiScaleRoIAlign  # noqa: E402

SIZES = {  # name -> (images, height, width, FPN channels, RoIs per image)
    "demo (8 x 160 px, 64 ch, 128 RoIs/img)": (8, 160, 160, 64, 128),
    "VOC recipe (2 x 800x1067 px, 256 ch, 512 RoIs/img)": (2, 800, 1067, 256, 512),
}


def inputs(n: int, h: int, w: int, channels: int, rois: int, g: torch.Generator):
    feats = OrderedDict()
    for i in range(4):  # P2..P5, padded to a multiple of 32 as the detectors do
        s = 2 ** (i + 2)
        f = torch.randn(n, channels, -(-h // 32) * 32 // s, -(-w // 32) * 32 // s, generator=g)
        feats[str(i)] = f.contiguous(memory_format=torch.channels_last).requires_grad_()
    boxes = []
    for _ in range(n):
        side = torch.exp(torch.empty(rois, 2).uniform_(3.0, 6.0, generator=g)).clamp(max=min(h, w) - 1)  # 20-400 px
        xy = torch.rand(rois, 2, generator=g) * (torch.tensor([w, h]) - side)
        boxes.append(torch.cat([xy, xy + side], 1))
    return feats, boxes, [(h, w)] * n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    rows, ratios_by_size = [], {}
    for name, (n, h, w, c, k) in SIZES.items():
        feats, boxes, shapes = inputs(n, h, w, c, k, g)
        poolers = [FastMultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2), MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)]
        grad = torch.randn(n * k, c, 7, 7, generator=g)

        def run(pool):
            def step():
                for f in feats.values():
                    f.grad = None
                out = pool(feats, boxes, shapes)
                out.backward(grad)
                return out.detach(), [f.grad.clone() for f in feats.values()]
            return step

        (out_a, grad_a), (out_b, grad_b) = run(poolers[0])(), run(poolers[1])()
        out_diff = (out_a - out_b).abs().max().item()
        grad_diff = max((a - b).abs().max().item() for a, b in zip(grad_a, grad_b))
        assert out_diff < 1e-4 and grad_diff < 1e-3, (out_diff, grad_diff)
        steps = [run(poolers[0]), run(poolers[1])]  # both were called once above: the warm-up
        per_round = []
        for r in range(args.rounds):  # A B, B A, ...
            seconds = [0.0, 0.0]
            for j in round_order(2, r):
                tic = time.perf_counter()
                steps[j]()
                seconds[j] = time.perf_counter() - tic
            per_round.append(seconds)
        ratios = [a / b for a, b in per_round]
        ratios_by_size[name] = ratios
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        rows.append([name, f"{statistics.median(a for a, _ in per_round) * 1e3:.0f} ms",
                     f"{statistics.median(b for _, b in per_round) * 1e3:.0f} ms",
                     f"**{statistics.median(ratios):.2f}** ({q[0]:.2f}-{q[2]:.2f}; {min(ratios):.2f}-{max(ratios):.2f})",
                     f"{out_diff:.1e} / {grad_diff:.1e}"])
        print(rows[-1], flush=True)
    md = header("RoI pooling of the box head: ours vs torchvision's MultiScaleRoIAlign (forward + backward)")
    md += ("\nSame FPN features (channels_last, fp32), boxes and output gradient; sampling ratio 2, 7x7 bins, "
           "torchvision's level mapping. Times per forward + backward, medians over rounds that alternate the "
           "two; ratio: median of the per-round ratios ours / torchvision (IQR; min-max).\n\n")
    md += table(rows, ["size", "ours", "torchvision", "ours / torchvision", "max abs difference: output / feature gradient"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "roi_align_speed.md").write_text(md + "\n![per-round ratios](roi_align_speed.png)\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.boxplot(list(ratios_by_size.values()), vert=False)
    ax.set_yticks(range(1, len(ratios_by_size) + 1), [s.split(" (")[0] for s in ratios_by_size])
    ax.axvline(1.0, color="grey", ls="--")
    ax.set_xlabel("time ratio ours / torchvision (per round)")
    fig.tight_layout()
    fig.savefig(args.out / "roi_align_speed.png", dpi=120)
    print((args.out / "roi_align_speed.md").read_text())


if __name__ == "__main__":
    main()
