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

The devkit's results format is here too: ``write_voc_results`` writes ``comp4_det_<split>_<class>.txt``
(one line per detection, ``image_id score xmin ymin xmax ymax`` in VOC's 1-based inclusive corners),
``read_voc_results`` reads it back, and ``score_voc_results`` scores such a folder against a VOCdevkit
(``tricks voc-eval``), so detections from any tool that writes the devkit format can be compared.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .voc import ClassesArg, VOCDetection, VOCFormatError, resolve_classes

log = logging.getLogger(__name__)


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


# ----------------------------------------------------------------------------------------------------------
# The devkit's results files


def results_path(results_dir: Path | str, class_name: str, split: str = "test", prefix: str = "comp4_det") -> Path:
    """``<results_dir>/<prefix>_<split>_<class>.txt``, the devkit's name (``comp4``: trained on outside data)."""
    return Path(results_dir) / f"{prefix}_{split}_{class_name}.txt"


def _array(detection: Any, field: str) -> Optional[np.ndarray]:
    value = detection.get(field) if isinstance(detection, Mapping) else getattr(detection, field, None)
    if value is not None and hasattr(value, "detach"):  # torch tensors (a torchvision model's output dict)
        value = value.detach().cpu().numpy()
    return None if value is None else np.asarray(value)


def write_voc_results(results_dir: Path | str, detections: Mapping[str, Any], classes: Sequence[str],
                      split: str = "test", prefix: str = "comp4_det") -> list[Path]:
    """Write detections in the devkit's results format: one file per class (every class, empty or not),
    one line per detection, ``image_id score xmin ymin xmax ymax``.

    ``detections`` maps an image id to its boxes: a ``VOCBoxes`` or anything with ``boxes`` [N, 4]
    (continuous XYXY, as ``detection.voc`` loads them), ``labels`` [N] (index into ``classes``) and
    ``scores`` [N] (attributes or dict keys; numpy or torch). Corners are written as the devkit's 1-based
    inclusive pixels, ``(x1 + 1, y1 + 1, x2, y2)``, numbers in Python's shortest round-trip form, so
    ``read_voc_results`` gives back the same boxes and scores bit for bit (boxes held in float32, as the
    loader and detectors hold them: ``c + 1 - 1 == c`` in float64 for every float32 ``c`` with
    ``|c| >= 2**-29`` or 0). Returns the files written.
    """
    classes = tuple(classes)
    results_dir = Path(results_dir)
    lines: list[list[str]] = [[] for _ in classes]
    for image_id, detection in detections.items():
        if not isinstance(image_id, str) or not image_id or image_id.split() != [image_id]:
            raise ValueError(f"image id {image_id!r}: the results format needs a non-empty id without whitespace")
        boxes, labels, scores = (_array(detection, f) for f in ("boxes", "labels", "scores"))
        if boxes is None or labels is None or scores is None:
            raise ValueError(f"detections[{image_id!r}] needs boxes, labels and scores")
        boxes, labels, scores = boxes.astype(np.float64).reshape(-1, 4), labels.reshape(-1), scores.reshape(-1)
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"detections[{image_id!r}]: labels must be integers (class indices), got {labels.dtype}")
        if not (len(boxes) == len(labels) == len(scores)):
            raise ValueError(f"detections[{image_id!r}]: {len(boxes)} boxes, {len(labels)} labels and {len(scores)} "
                             "scores: one of each per detection")
        bad = labels[(labels < 0) | (labels >= len(classes))]
        if bad.size:
            raise ValueError(f"detections[{image_id!r}] has label {int(bad[0])}, outside 0..{len(classes) - 1} "
                             f"({len(classes)} classes; a torchvision model's labels count background as 0: "
                             "subtract 1)")
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise ValueError(f"detections[{image_id!r}] has a box or score that is not a finite number")
        corners = boxes + np.array([1.0, 1.0, 0.0, 0.0])  # continuous -> the devkit's 1-based corners
        scores = scores.astype(np.float64)
        for (x1, y1, x2, y2), label, score in zip(corners.tolist(), labels.tolist(), scores.tolist()):
            lines[label].append(f"{image_id} {score!r} {x1!r} {y1!r} {x2!r} {y2!r}\n")
    results_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, class_lines in zip(classes, lines):
        path = results_path(results_dir, name, split, prefix)
        path.write_text("".join(class_lines))
        written.append(path)
    return written


def read_voc_results(results_dir: Path | str, classes: Sequence[str], split: str = "test",
                     prefix: str = "comp4_det", image_ids: Optional[Sequence[str]] = None) -> dict[str, VOCBoxes]:
    """Read the devkit's results files back: ``{image_id: VOCBoxes(boxes, labels, scores)}`` with boxes in
    continuous coordinates (``xmin - 1, ymin - 1, xmax, ymax``) and labels indexing ``classes``; an image's
    detections are grouped by class, in file order.

    A missing class file means no detections of that class (logged as a warning naming the file). A line
    that is not ``image_id score xmin ymin xmax ymax`` is an error naming the file and line; so is an id
    outside ``image_ids`` (when given: the split's ids).
    """
    known = None if image_ids is None else set(image_ids)
    found: dict[str, list[tuple[int, list[float]]]] = {}
    for label, name in enumerate(classes):
        path = results_path(results_dir, name, split, prefix)
        if not path.is_file():
            log.warning("%s not found: scored as no %s detections", path, name)
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            where = f"{path}, line {number}"
            if len(fields) != 6:
                raise VOCFormatError(f"{where}: {len(fields)} fields, expected 6: image_id score xmin ymin xmax "
                                     f"ymax ({line.strip()!r})")
            try:
                values = [float(v) for v in fields[1:]]
            except ValueError:
                raise VOCFormatError(f"{where}: score and corners must be numbers ({line.strip()!r})") from None
            if not all(math.isfinite(v) for v in values):
                raise VOCFormatError(f"{where}: score or corner is not a finite number ({line.strip()!r})")
            image_id = fields[0]
            if known is not None and image_id not in known:
                raise VOCFormatError(f"{where}: image {image_id!r} is not in the {split} split (results for another "
                                     "split, or the wrong --split/--year?)")
            found.setdefault(image_id, []).append((label, values))
    results = {}
    for image_id, rows in found.items():
        values = np.array([v for _, v in rows], np.float64)
        results[image_id] = VOCBoxes(values[:, 1:] - np.array([1.0, 1.0, 0.0, 0.0]),
                                     np.array([label for label, _ in rows], np.int64), scores=values[:, 0])
    return results


def score_voc_results(devkit_root: Path | str, year: str | int, split: str, results_dir: Path | str,
                      classes: ClassesArg = None, use_07_metric: bool = True, prefix: str = "comp4_det",
                      iou_threshold: float = 0.5, skip_invalid: bool = False) -> dict:
    """Score a folder of devkit results files against ``VOC<year>/ImageSets/Main/<split>.txt``.

    Ground truth is read with ``detection.voc`` (difficult boxes kept, every image kept). Returns
    ``{"map_voc07", "map_area", "ap_per_class": {name: AP}, "metric", "num_gt": {name: n}}``: both mAPs
    (11-point VOC07 and area under the curve), the per-class AP under the metric ``use_07_metric``
    picks (``metric`` says which); all in 0-1. A class without non-difficult ground truth has AP NaN and
    is left out of the means.
    """
    names = resolve_classes(classes)
    dataset = VOCDetection(devkit_root, str(year), split, keep_difficult=True, classes=names,
                           skip_invalid=skip_invalid, drop_empty=False)
    found = read_voc_results(results_dir, names, split, prefix, image_ids=dataset.ids)
    nothing = VOCBoxes(np.zeros((0, 4)), np.zeros(0, np.int64), scores=np.zeros(0))
    predictions = [found.get(image_id, nothing) for image_id in dataset.ids]
    truth = [VOCBoxes(ann.boxes, ann.labels, difficult=ann.difficult)
             for ann in (dataset.annotation(i) for i in range(len(dataset)))]
    voc07 = evaluate_voc(predictions, truth, len(names), iou_threshold, use_07_metric=True)
    area = evaluate_voc(predictions, truth, len(names), iou_threshold, use_07_metric=False)
    chosen = voc07 if use_07_metric else area
    return {"map_voc07": voc07["mAP"], "map_area": area["mAP"],
            "ap_per_class": {name: float(ap) for name, ap in zip(names, chosen["ap"])},
            "metric": "voc07" if use_07_metric else "area",
            "num_gt": {name: int(n) for name, n in zip(names, chosen["num_gt"])}}
