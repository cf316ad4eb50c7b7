"""PASCAL VOC detection average precision, as the VOC devkit computes it.

The rules (VOC devkit ``VOCevaldet``, and the Python port in py-faster-rcnn / detectron2):

* per class, detections of every image are ranked by score; each takes the ground-truth box of its
  class in its image with the highest IoU;
* IoU above the threshold (strictly; 0.5 for VOC) with a box not yet taken: true positive; with a
  taken box: false positive (duplicate); below: false positive;
* a detection whose best box is marked ``difficult`` counts neither way, and difficult boxes are not
  counted in the recall denominator;
* AP is the area under the interpolated precision/recall curve (VOC 2010+), or for VOC 2007 test the
  mean of the interpolated precision at recall 0, 0.1, ..., 1 (``use_07_metric``, the number papers
  report on VOC 07 test, as in the paper's Table 8).

Boxes are ``(x1, y1, x2, y2)`` in continuous pixel coordinates: a VOC box with (1-based, inclusive)
corners ``xmin..xmax`` is ``(xmin - 1, ymin - 1, xmax, ymax)``, as ``detection.voc`` loads it (and as
detectron2 does). Then the plain area is the devkit's inclusive pixel count, ``xmax - xmin + 1``, and
the IoUs equal the devkit's.

This is independent of any detection framework, so both engines (detectron2, torchvision) report the
same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass
class VOCBoxes:
    """The boxes of one image: ground truth (with ``difficult``) or predictions (with ``scores``)."""
    boxes: np.ndarray                        # [N, 4] float, (x1, y1, x2, y2) continuous pixel coordinates
    labels: np.ndarray                       # [N] int, class index in 0 .. num_classes - 1
    scores: Optional[np.ndarray] = None      # [N] predictions only
    difficult: Optional[np.ndarray] = None   # [N] bool, ground truth only (None = none difficult)


def average_precision(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """AP from the cumulative recall/precision of the ranked detections (the devkit's ``VOCap``)."""
    if use_07_metric:
        # The devkit's thresholds are 0:0.1:1, i.e. k * 0.1 in floating point (0.30000000000000004, ...).
        points = [precision[recall >= k * 0.1].max(initial=0.0) for k in range(11)]
        return float(np.sum(points) / 11)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope: best precision at any higher recall
    changes = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


def _iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """[N, M] IoU of two sets of continuous-coordinate boxes."""
    lt = np.maximum(boxes[:, None, :2], others[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], others[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area(boxes)[:, None] + area(others)[None, :] - inter)


def _class_ap(predictions: Sequence[VOCBoxes], ground_truth: Sequence[VOCBoxes], cls: int, iou_threshold: float,
              use_07_metric: bool) -> tuple[float, int]:
    images, scores, best_iou, best_gt, best_difficult = [], [], [], [], []
    num_gt = 0
    for i, (pred, truth) in enumerate(zip(predictions, ground_truth)):
        gt_mask = truth.labels == cls
        gt_boxes = truth.boxes[gt_mask]
        gt_difficult = (np.zeros(len(truth.labels), bool) if truth.difficult is None else truth.difficult)[gt_mask]
        num_gt += int((~gt_difficult).sum())
        det_mask = pred.labels == cls
        if not det_mask.any():
            continue
        det_boxes = pred.boxes[det_mask]
        images.append(np.full(len(det_boxes), i))
        scores.append(pred.scores[det_mask])
        if len(gt_boxes):
            iou = _iou(det_boxes, gt_boxes)
            j = iou.argmax(1)  # first maximum on ties, as the devkit
            best_iou.append(iou[np.arange(len(j)), j])
            best_gt.append(j)
            best_difficult.append(gt_difficult[j])
        else:
            best_iou.append(np.full(len(det_boxes), -np.inf))
            best_gt.append(np.zeros(len(det_boxes), np.int64))
            best_difficult.append(np.zeros(len(det_boxes), bool))
    if num_gt == 0:
        return float("nan"), 0
    if not images:
        return 0.0, num_gt
    order = np.argsort(-np.concatenate(scores), kind="stable")
    image, iou = np.concatenate(images)[order], np.concatenate(best_iou)[order]
    gt_index, difficult = np.concatenate(best_gt)[order], np.concatenate(best_difficult)[order]

    hit = iou > iou_threshold
    counted = hit & ~difficult  # hits on difficult boxes are ignored
    # The first (highest-scoring) detection to take a box is the true positive; later ones are duplicates.
    first = np.zeros(len(order), bool)
    taken = np.flatnonzero(counted)
    _, first_of_box = np.unique(np.stack([image[taken], gt_index[taken]], 1), axis=0, return_index=True)
    first[taken[first_of_box]] = True
    tp = np.cumsum(first)
    fp = np.cumsum(~hit | (counted & ~first))
    recall = tp / num_gt
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return average_precision(recall, precision, use_07_metric), num_gt


def evaluate_voc(predictions: Sequence[VOCBoxes], ground_truth: Sequence[VOCBoxes], num_classes: int,
                 iou_threshold: float = 0.5, use_07_metric: bool = True) -> dict:
    """Per-class AP and their mean over a dataset; ``predictions[i]`` and ``ground_truth[i]`` are one image.

    Returns ``{"mAP", "ap" [num_classes], "num_gt" [num_classes]}`` (AP in 0-1). A class without any
    non-difficult ground-truth box has AP NaN and is left out of the mean (the devkit would give NaN).
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} prediction entries but {len(ground_truth)} ground-truth entries: "
                         "give one of each per image, in the same order (an image without detections gets "
                         "empty arrays)")
    for i, p in enumerate(predictions):
        if p.scores is None:
            raise ValueError(f"predictions[{i}] has no scores: detections need a score each")
        bad = p.labels[(p.labels < 0) | (p.labels >= num_classes)]
        if bad.size:
            raise ValueError(f"predictions[{i}] has label {int(bad[0])}, outside 0..{num_classes - 1} "
                             f"(num_classes={num_classes})")
    results = [_class_ap(predictions, ground_truth, c, iou_threshold, use_07_metric) for c in range(num_classes)]
    ap = np.array([r[0] for r in results])
    num_gt = np.array([r[1] for r in results])
    return {"mAP": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"), "ap": ap, "num_gt": num_gt}
