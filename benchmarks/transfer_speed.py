"""Fine-tuning models on the suite's backbones vs torchvision's own, train step time in the same run.

* Faster R-CNN + FPN: ``detection.model.build_faster_rcnn("resnet50b")`` vs torchvision's
  ``fasterrcnn_resnet50_fpn`` (the same network; identical weights are loaded), and our ``resnet50d``.
* Dilated FCN: ``segmentation.model.build_fcn("resnet50b")`` vs torchvision's ``fcn_resnet50``.

The models of a row alternate step by step (A B B A ...) so the shared machine's speed drifts hit all
alike; the result is the ratio of the summed step times. Run: ``python benchmarks/transfer_speed.py``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import RESULTS, header, paired_seconds, table  # noqa: E402

from runtime.optim import build_optimizer  # noqa: E402
from detection.model import build_faster_rcnn  # noqa: E402
from segmentation.model import build_fcn  # noqa: E402

TV_NORM = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def detection_step(model, size: int, batch: int):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, int(size * 1.33), generator=g) for _ in range(batch)]
    targets = [{"boxes": torch.tensor([[20.0, 30.0, 200.0, 220.0], [100.0, 50.0, 300.0, 250.0]]),
                "labels": torch.tensor([3, 7])} for _ in range(batch)]
    model.train()
    opt = build_optimizer(model, lr=0.001, nesterov=False)

    def step():
        loss = sum(model(images, targets).values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def segmentation_step(model, size: int, batch: int, num_classes: int):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (batch, size, size), generator=g)
    model.train()
    opt = build_optimizer(model, lr=0.001, nesterov=False)

    def step():
        out = model(x)
        loss = F.cross_entropy(out["out"], y, ignore_index=255) + 0.4 * F.cross_entropy(out["aux"], y, ignore_index=255)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6, help="timed steps per model")
    p.add_argument("--det-size", type=int, default=480, help="shorter side of the detection images (px)")
    p.add_argument("--seg-size", type=int, default=256, help="segmentation crop (px)")
    args = p.parse_args()
    from torchvision.models.detection import fasterrcnn_resnet50_fpn
    from torchvision.models.segmentation import fcn_resnet50

    torch.manual_seed(0)
    size = dict(min_size=args.det_size, max_size=int(args.det_size * 1.34))
    # Trainable BN on both sides (torchvision's choice without pretrained weights), all stages trained.
    theirs_det = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=21, **size, **TV_NORM)
    ours_det = build_faster_rcnn("resnet50b", num_classes=21, frozen_stages=-1, norm_layer=None, **size, **TV_NORM)
    ours_det.load_state_dict(theirs_det.state_dict())
    ours_det_d = build_faster_rcnn("resnet50d", num_classes=21, frozen_stages=-1, norm_layer=None, **size, **TV_NORM)
    det = paired_seconds([detection_step(m, args.det_size, 2) for m in (ours_det, theirs_det, ours_det_d)],
                         args.steps)
    del theirs_det, ours_det, ours_det_d

    theirs_seg = fcn_resnet50(weights=None, weights_backbone=None, num_classes=150, aux_loss=True)
    ours_seg = build_fcn("resnet50b", num_classes=150, head="torchvision")  # torchvision's single-conv head
    ours_seg.load_state_dict(theirs_seg.state_dict())
    ours_seg_d = build_fcn("resnet50d", num_classes=150, head="torchvision")
    seg = paired_seconds([segmentation_step(m, args.seg_size, 2, 150) for m in (ours_seg, theirs_seg, ours_seg_d)],
                         args.steps)

    rows = [
        [f"Faster R-CNN + FPN train step, 2 images {args.det_size}x{int(args.det_size * 1.33)}, fp32",
         f"{det[0]:.2f}", f"{det[1]:.2f}", f"{det[1] / det[0]:.2f}", f"{det[2]:.2f}"],
        [f"dilated FCN (output stride 8) + aux head train step, 2 crops {args.seg_size}x{args.seg_size}, 150 classes, fp32",
         f"{seg[0]:.2f}", f"{seg[1]:.2f}", f"{seg[1] / seg[0]:.2f}", f"{seg[2]:.2f}"],
    ]
    md = header("Detection and segmentation models on the suite's backbones vs torchvision") + (
        f"\n{args.steps} timed steps per model after one warm-up step; the three models of a row alternate step by "
        "step. Ours with `resnet50b` is torchvision's network (its weights are loaded into ours), so the speed "
        "ratio isolates the cost of building it from the registry. s/step, lower is better; ratio = torchvision / "
        "ours (>= 1: ours is as fast).\n\n"
        + table(rows, ["model", "ours, resnet50b (s/step)", "torchvision, resnet50 (s/step)", "ratio",
                       "ours, resnet50d (s/step)"]))
    (RESULTS / "transfer_speed.md").write_text(md)
    _plot(det, seg)
    print(md)


def _plot(det: list[float], seg: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = ["ours r50b", "torchvision r50", "ours r50d"]
    for ax, title, vals in zip(axes, ["Faster R-CNN + FPN", "dilated FCN"], [det, seg]):
        ax.bar(labels, vals, color=["tab:blue", "tab:gray", "tab:green"])
        ax.set_title(title)
        ax.set_ylabel("s / train step (lower is better)")
    fig.tight_layout()
    fig.savefig(RESULTS / "transfer_speed.png", dpi=100)


if __name__ == "__main__":
    main()
