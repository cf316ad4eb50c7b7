"""``tricks seg-eval``: score PNG label maps against ground truth (pixel accuracy, mIoU as mmseg).

``add_subcommands(subparsers)`` registers (the parser's ``func(args) -> int`` is set as a default)::

    tricks seg-eval --gt DIR --pred DIR --num-classes N [--reduce-zero-label] [--ignore-index 255] [--json]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

IGNORE_INDEX = 255  # = segmentation.ade20k.IGNORE_INDEX; the parser is built without importing torch


def _read_png_map(path: Path) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I;16", "I"):
                raise ValueError(f"{path}: expected a single-channel class-index PNG, got mode {im.mode}")
            return np.array(im).astype(np.int64)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the PNG ({e})") from None


def _stems(directory: Path, role: str) -> dict[str, Path]:
    if not directory.is_dir():
        raise FileNotFoundError(f"{role} folder {directory} not found")
    files = {p.stem: p for p in sorted(directory.glob("*.png"))}
    if not files:
        raise FileNotFoundError(f"{role} folder {directory} holds no .png label maps")
    return files


def seg_eval(gt_dir: Path | str, pred_dir: Path | str, num_classes: int, reduce_zero_label: bool = False,
             ignore_index: int = IGNORE_INDEX) -> dict:
    """Score predicted PNG label maps (class ids 0..N-1) against ground-truth PNGs of the same stem.

    ``reduce_zero_label`` applies to the ground truth only (0 -> ignored, k -> k-1), as mmseg. Returns
    ``{"pixel_acc", "miou", "iou_per_class"}`` as fractions; classes neither labelled nor predicted have
    IoU ``None`` and are left out of the mean (mmseg's ``nanmean``).
    """
    import torch

    from segmentation.metrics import SegmentationMetric

    gt, pred = _stems(Path(gt_dir), "ground-truth"), _stems(Path(pred_dir), "prediction")
    missing, extra = sorted(gt.keys() - pred.keys()), sorted(pred.keys() - gt.keys())
    if missing:
        raise ValueError(f"{len(missing)} ground-truth map(s) have no prediction in {pred_dir}, e.g. "
                         f"{gt[missing[0]].name}")
    if extra:
        raise ValueError(f"{len(extra)} prediction(s) have no ground truth in {gt_dir}, e.g. {pred[extra[0]].name}")
    metric = SegmentationMetric(num_classes, ignore_index)
    for stem in sorted(gt):
        label, prediction = _read_png_map(gt[stem]), _read_png_map(pred[stem])
        if label.shape != prediction.shape:
            raise ValueError(f"{pred[stem]}: prediction is {prediction.shape[1]}x{prediction.shape[0]}, its ground "
                             f"truth {gt[stem]} {label.shape[1]}x{label.shape[0]}")
        if reduce_zero_label:
            label = np.where(label == ignore_index, ignore_index, reduce_zero_label_map(label, ignore_index))
        try:
            metric.update(torch.from_numpy(prediction), torch.from_numpy(label))
        except ValueError as e:
            raise ValueError(f"{gt[stem]} / {pred[stem]}: {e}") from None
    result = metric.compute()
    iou = [None if math.isnan(v) else v / 100 for v in result["IoU"]]
    return {"pixel_acc": result["aAcc"] / 100, "miou": result["mIoU"] / 100, "iou_per_class": iou}


def reduce_zero_label_map(label: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """0 -> ``ignore_index``, k -> k - 1."""
    from segmentation.ade20k import reduce_zero_label

    reduced = reduce_zero_label(label.astype(np.int64, copy=False))
    return np.where(label == 0, ignore_index, reduced)


def _run_seg_eval(args: argparse.Namespace) -> int:
    import sys

    if args.num_classes < 1:
        print(f"seg-eval: error: --num-classes {args.num_classes}: give the number of classes (>= 1)", file=sys.stderr)
        return 2
    try:
        result = seg_eval(args.gt, args.pred, args.num_classes, args.reduce_zero_label, args.ignore_index)
    except (ValueError, OSError) as e:  # the messages name the file and what is wrong with it
        print(f"seg-eval: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"pixel accuracy {100 * result['pixel_acc']:.2f}%   mIoU {100 * result['miou']:.2f}%")
    for c, v in enumerate(result["iou_per_class"]):
        print(f"  class {c:3d}  IoU " + ("   absent" if v is None else f"{100 * v:7.2f}%"))
    return 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``seg-eval`` (sets ``func(args) -> int``)."""
    p = subparsers.add_parser("seg-eval", help="score PNG label maps against ground truth (pixel acc, mIoU)")
    p.add_argument("--gt", required=True, type=Path, help="folder of ground-truth PNGs")
    p.add_argument("--pred", required=True, type=Path, help="folder of predicted PNGs (class ids 0..N-1), same stems")
    p.add_argument("--num-classes", required=True, type=int)
    p.add_argument("--reduce-zero-label", action="store_true", help="ground truth 0 = ignored, k -> k-1 (ADE20K)")
    p.add_argument("--ignore-index", type=int, default=IGNORE_INDEX)
    p.add_argument("--json", action="store_true", help="print the result as JSON (fractions)")
    p.set_defaults(func=_run_seg_eval)
