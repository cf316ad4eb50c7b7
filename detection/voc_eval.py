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

Class names go into file names through one mapping, ``class_file_name``, used by the writer and the reader
alike: a character that cannot be part of a file name on Linux, macOS or Windows (``/``, backslash, ``< > : " | ? *``,
whitespace, control characters) becomes ``_``, so labelme's ``tv/monitor`` is ``comp4_det_test_tv_monitor.txt``
and ``traffic light`` is ``comp4_det_test_traffic_light.txt``; the names of the 20 VOC classes are
unchanged. Two classes that map to one file name are an error before anything is written.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from runtime.errors import DataError, UserPathError

from .voc import ClassesArg, VOCDetection, VOCFormatError, resolve_classes

log = logging.getLogger(__name__)


@dataclass
class VOCBoxes:
    """The boxes of one image: ground truth (with ``difficult``) or predictions (with ``scores``)."""
    boxes: np.ndarray                        # [N, 4] float, (x1, y1, x2, y2) continuous pixel coordinates
    labels: np.ndarray                       # [N] int, class index in 0 .. num_classes - 1
    scores: Optional[np.ndarray] = None      # [N] predictions only
    difficult: Optional[np.ndarray] = None   # [N] bool, ground truth only (None = none difficult)
    order: Optional[np.ndarray] = None       # [N] predictions only: their position in the results file, which
                                             # ranks equal scores as the devkit does (None: the input order)


def average_precision(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """AP from the cumulative recall/precision of the ranked detections (the devkit's ``VOCap``)."""
    if use_07_metric:
        # Thresholds k * 0.1 in floating point (0.30000000000000004, 0.6000000000000001, 0.7000000000000001), as
        # np.arange(0, 1.1, 0.1) in detectron2 and in GluonCV's VOC07MApMetric (the paper's numbers). The devkit's
        # MATLAB 0:0.1:1 computes its upper half down from 1 (MathWorks' colon algorithm: exactly 0.6 and 0.7), so
        # a recall of exactly 0.6 or 0.7 earns that point there and not in the Python references or here.
        points = [precision[recall >= k * 0.1].max(initial=0.0) for k in range(11)]
        return float(np.sum(points) / 11)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope: best precision at any higher recall
    changes = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


def _stack(entries: Sequence[VOCBoxes], what: str, field: str) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                         np.ndarray]:
    """All images' boxes [N, 4] (float64), labels [N], image index [N] and ``field`` [N] (scores or difficult)
    as one set of arrays: image by image in the given order, each image's boxes in their own order."""
    labels = [entry.labels for entry in entries]
    boxes = [np.reshape(entry.boxes, (-1, 4)) for entry in entries]
    values = [getattr(entry, field) for entry in entries]
    if field == "difficult":
        values = [np.zeros(len(n), bool) if v is None else v for v, n in zip(values, labels)]
    sizes = np.array([(len(b), len(n), len(v)) for b, n, v in zip(boxes, labels, values)], np.int64).reshape(-1, 3)
    mismatched = np.flatnonzero((sizes != sizes[:, 1:2]).any(1))
    if mismatched.size:
        i = mismatched[0]
        raise ValueError(f"{what}[{i}]: {sizes[i, 0]} boxes, {sizes[i, 1]} labels and {sizes[i, 2]} {field}: "
                         "one of each per box")
    # The empty leading arrays give the dtypes when there are no images (and float64 boxes always).
    return (np.concatenate([np.zeros((0, 4)), *boxes]),
            np.concatenate([np.zeros(0, np.int64), *labels]).astype(np.int64),
            np.repeat(np.arange(len(entries)), sizes[:, 1]), np.concatenate([np.zeros(0), *values]))


def _best_match(det_boxes: np.ndarray, det_group: np.ndarray, gt_boxes: np.ndarray,
                gt_group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per detection: the highest IoU with a ground-truth box of its group (image and class) and that box's
    index, the first one on ties as the devkit's ``argmax``; ``-inf`` and -1 where the group has no box.
    ``gt_group`` is sorted.

    Every (detection, box of its group) pair is laid out flat, the detection's pairs next to each other, so
    the IoUs of all images come from one set of array operations.
    """
    first = np.searchsorted(gt_group, det_group, "left")
    count = np.searchsorted(gt_group, det_group, "right") - first
    pair_start = np.cumsum(count) - count
    det_of_pair = np.repeat(np.arange(len(det_group)), count)
    gt_of_pair = np.arange(int(count.sum())) + np.repeat(first - pair_start, count)
    d, g = det_boxes[det_of_pair], gt_boxes[gt_of_pair]
    # Continuous corners: the plain area is the devkit's inclusive pixel count (module docstring).
    inter = (np.clip(np.minimum(d[:, 2], g[:, 2]) - np.maximum(d[:, 0], g[:, 0]), 0, None)
             * np.clip(np.minimum(d[:, 3], g[:, 3]) - np.maximum(d[:, 1], g[:, 1]), 0, None))
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    iou = inter / (area(d) + area(g) - inter)

    best_iou, best_gt = np.full(len(det_group), -np.inf), np.full(len(det_group), -1)
    has_box = count > 0
    if has_box.any():
        # NaN (a zero-area box against a zero-area box) wins the maximum, as in the devkit: never a hit.
        best_iou[has_box] = np.maximum.reduceat(iou, pair_start[has_box])
        at_best = np.flatnonzero(iou == best_iou[det_of_pair])
        owner = det_of_pair[at_best]
        first_of_owner = np.r_[True, owner[1:] != owner[:-1]]
        best_gt[owner[first_of_owner]] = gt_of_pair[at_best[first_of_owner]]
    return best_iou, best_gt


def _match(predictions: Sequence[VOCBoxes], ground_truth: Sequence[VOCBoxes], num_classes: int,
           iou_threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The devkit's verdict on every detection of every class at once.

    Returns the detections' classes, ranked (by class, then by descending score; equal scores in their results-file
    order when the predictions carry ``order``, else in the input order, image by image: a stable sort, as the
    devkit's MATLAB ``sort`` of the file's lines), whether each is a true or
    a false positive (a hit on a difficult box is neither), and the number of non-difficult boxes per class.
    """
    det_boxes, det_labels, det_image, scores = _stack(predictions, "predictions", "scores")
    gt_boxes, gt_labels, gt_image, difficult = _stack(ground_truth, "ground_truth", "difficult")
    bad = np.flatnonzero((det_labels < 0) | (det_labels >= num_classes))
    if bad.size:
        raise ValueError(f"predictions[{det_image[bad[0]]}] has label {det_labels[bad[0]]}, outside "
                         f"0..{num_classes - 1} (num_classes={num_classes})")
    known = (gt_labels >= 0) & (gt_labels < num_classes)  # boxes of other classes are never matched
    difficult = difficult[known].astype(bool)
    num_gt = np.bincount(gt_labels[known][~difficult], minlength=num_classes)
    # A detection may only take a box of its own image and class: both in one group number.
    gt_group = gt_image[known] * num_classes + gt_labels[known]
    gt_order = np.argsort(gt_group, kind="stable")  # an image's boxes of a class in their own order (argmax ties)

    best_iou, best_gt = _best_match(det_boxes, det_image * num_classes + det_labels, gt_boxes[known][gt_order],
                                    gt_group[gt_order])

    # Rank by class, then by descending score, ties in the input order: stable sorts, the second on small
    # integers (numpy radix-sorts those).
    orders = [p.order is not None for p in predictions]
    if any(orders) and not all(orders):
        raise ValueError("predictions: give every image's order (results-file positions) or none")
    tie = _stack(predictions, "predictions", "order")[3] if orders and all(orders) else np.arange(len(scores))
    rank = np.lexsort((tie, -scores))  # descending score, ties by file position (or input order)
    rank = rank[np.argsort(det_labels[rank].astype(np.min_scalar_type(num_classes)), kind="stable")]
    labels, best_iou, best_gt = det_labels[rank], best_iou[rank], best_gt[rank]
    hit = best_iou > iou_threshold
    counted = hit.copy()
    counted[hit] = ~difficult[gt_order][best_gt[hit]]  # hits on difficult boxes are ignored
    # The first (highest-ranked) detection to take a box is the true positive; later ones are duplicates.
    # A box belongs to one class, so its first taker overall is the first within the class's ranking.
    taken = np.flatnonzero(counted)
    _, first_taker = np.unique(best_gt[taken], return_index=True)
    tp = np.zeros(len(rank), bool)
    tp[taken[first_taker]] = True
    fp = ~hit | (counted & ~tp)
    return labels, tp, fp, num_gt


def _class_ap(tp: np.ndarray, fp: np.ndarray, num_gt: int, use_07_metric: bool) -> float:
    """AP of one class from the true/false-positive flags of its ranked detections."""
    if num_gt == 0:
        return float("nan")
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / num_gt
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return average_precision(recall, precision, use_07_metric)


def evaluate_voc(predictions: Sequence[VOCBoxes], ground_truth: Sequence[VOCBoxes], num_classes: int,
                 iou_threshold: float = 0.5, use_07_metric: bool = True) -> dict:
    """Per-class AP and their mean over a dataset; ``predictions[i]`` and ``ground_truth[i]`` are one image.

    Returns ``{"mAP", "ap" [num_classes], "num_gt" [num_classes]}`` (AP in 0-1). A class without any
    non-difficult ground-truth box has AP NaN and is left out of the mean (detectron2's ``voc_eval`` gives it 0
    under the 11-point metric, and 0 or NaN under the area one, without or with detections, and averages it in).
    IoUs are computed in float64, as the devkit does, whatever the boxes' dtype.
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} prediction entries but {len(ground_truth)} ground-truth entries: "
                         "give one of each per image, in the same order (an image without detections gets "
                         "empty arrays)")
    for i, p in enumerate(predictions):
        if p.scores is None:
            raise ValueError(f"predictions[{i}] has no scores: detections need a score each")
    labels, tp, fp, num_gt = _match(predictions, ground_truth, num_classes, iou_threshold)
    bounds = np.searchsorted(labels, np.arange(num_classes + 1))  # each class's ranked detections
    ap = np.array([_class_ap(tp[bounds[c]:bounds[c + 1]], fp[bounds[c]:bounds[c + 1]], int(num_gt[c]),
                             use_07_metric) for c in range(num_classes)])
    return {"mAP": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"), "ap": ap, "num_gt": num_gt}


# detectron2's thresholds: ``thresh / 100.0`` for thresh in range(50, 100, 5) (0.5, 0.55, ..., 0.95).
D2_IOU_THRESHOLDS = tuple(t / 100.0 for t in range(50, 100, 5))


def evaluate_voc_iou_range(predictions: Sequence[VOCBoxes], ground_truth: Sequence[VOCBoxes], num_classes: int,
                           use_07_metric: bool = True) -> dict:
    """detectron2's VOC ``AP``, ``AP50`` and ``AP75`` (``PascalVOCDetectionEvaluator``): the devkit's matching
    and per-class AP at each IoU threshold 0.50, 0.55, ..., 0.95; at each threshold the mean over classes;
    ``AP`` is the mean of those ten means, ``AP50`` and ``AP75`` two of them. ``use_07_metric`` as in
    ``evaluate_voc`` (detectron2: year 2007).

    Returns ``{"AP", "AP50", "AP75", "per_threshold": {0.5: mAP, ...}}`` in 0-1 (detectron2 prints
    percent). A class without non-difficult ground truth is left out of every mean, as in
    ``evaluate_voc`` (detectron2 counts it 0 under the 11-point metric, and 0 or NaN under the area one, without or
    with detections).
    """
    per_threshold = {t: evaluate_voc(predictions, ground_truth, num_classes, t, use_07_metric)["mAP"]
                     for t in D2_IOU_THRESHOLDS}
    return {"AP": float(np.mean(list(per_threshold.values()))), "AP50": per_threshold[0.5],
            "AP75": per_threshold[0.75], "per_threshold": per_threshold}


# ----------------------------------------------------------------------------------------------------------
# The devkit's results files


_NOT_IN_FILE_NAMES = re.compile(r'[/\\<>:"|?*\s\x00-\x1f]')


def class_file_name(class_name: str) -> str:
    """The class's part of a results file name: characters that cannot be in a file name (``/``, backslash,
    ``< > : " | ? *``, whitespace, control characters) become ``_`` ("tv/monitor" -> "tv_monitor"); "." and ".." too."""
    name = _NOT_IN_FILE_NAMES.sub("_", class_name)
    return "_" * len(name) if name.strip(".") == "" else name


def results_path(results_dir: Path | str, class_name: str, split: str = "test", prefix: str = "comp4_det") -> Path:
    """``<results_dir>/<prefix>_<split>_<class>.txt``, the devkit's name (``comp4``: trained on outside data),
    the class through ``class_file_name``."""
    return Path(results_dir) / f"{prefix}_{split}_{class_file_name(class_name)}.txt"


def results_paths(results_dir: Path | str, classes: Sequence[str], split: str = "test",
                  prefix: str = "comp4_det") -> list[Path]:
    """``results_path`` of every class; two classes sharing a file name are an error naming both."""
    paths = [results_path(results_dir, name, split, prefix) for name in classes]
    first: dict[Path, str] = {}
    for name, path in zip(classes, paths):
        if path in first:
            raise DataError(f"classes {first[path]!r} and {name!r} both map to the results file {path.name} "
                            "(characters that cannot be in a file name become '_'): rename one of them")
        first[path] = name
    return paths


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
    ``|c| >= 2**-29`` or 0). Class names go through ``class_file_name``. Everything is checked before the
    first file is written. Returns the files written.
    """
    classes = tuple(classes)
    results_dir = Path(results_dir)
    paths = results_paths(results_dir, classes, split, prefix)
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
    for path, class_lines in zip(paths, lines):
        path.write_text("".join(class_lines))
    return paths


def read_voc_results(results_dir: Path | str, classes: Sequence[str], split: str = "test",
                     prefix: str = "comp4_det", image_ids: Optional[Sequence[str]] = None) -> dict[str, VOCBoxes]:
    """Read the devkit's results files back: ``{image_id: VOCBoxes(boxes, labels, scores)}`` with boxes in
    continuous coordinates (``xmin - 1, ymin - 1, xmax, ymax``) and labels indexing ``classes``; an image's
    detections are grouped by class, in file order, and ``order`` keeps each line's position in its class file
    (the devkit ranks equal scores in file order, whatever the image).

    A missing class file means no detections of that class (logged as a warning naming the file), but a
    folder that does not exist, or holds no ``<prefix>_<split>_*.txt`` file at all, is an error (scoring it
    would print an mAP of 0). A line that is not ``image_id score xmin ymin xmax ymax`` is an error naming
    the file and line; so is an id outside ``image_ids`` (when given: the split's ids).
    """
    known = None if image_ids is None else set(image_ids)
    found: dict[str, list[tuple[int, list[float], int]]] = {}
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise UserPathError(f"results folder {results_dir} not found (--results: the folder of "
                            f"{prefix}_{split}_<class>.txt files)")
    paths = results_paths(results_dir, classes, split, prefix)
    if not any(path.is_file() for path in paths):
        present = sorted(p.name for p in results_dir.glob(f"{prefix}_*.txt"))[:3]
        raise DataError(f"{results_dir}: no results file of these classes ({paths[0].name}, ...)"
                        + (f"; found {', '.join(present)}: another --split or --prefix?" if present else
                           f"; the folder holds no {prefix}_*.txt file"))
    for label, (name, path) in enumerate(zip(classes, paths)):
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
            found.setdefault(image_id, []).append((label, values, number))
    results = {}
    for image_id, rows in found.items():
        values = np.array([v for _, v, _ in rows], np.float64)
        results[image_id] = VOCBoxes(values[:, 1:] - np.array([1.0, 1.0, 0.0, 0.0]),
                                     np.array([label for label, _, _ in rows], np.int64), scores=values[:, 0],
                                     order=np.array([n for _, _, n in rows], np.int64))
    return results


def score_voc_results(devkit_root: Path | str, year: str | int, split: str, results_dir: Path | str,
                      classes: ClassesArg = None, use_07_metric: bool = True, prefix: str = "comp4_det",
                      iou_threshold: float = 0.5, skip_invalid: bool = False) -> dict:
    """Score a folder of devkit results files against ``VOC<year>/ImageSets/Main/<split>.txt``.

    Ground truth is read with ``detection.voc`` (difficult boxes kept, every image kept). Returns
    ``{"map_voc07", "map_area", "ap", "ap75", "ap_per_class": {name: AP}, "metric", "num_gt": {name: n}}``:
    both mAPs (11-point VOC07 and area under the curve), detectron2's AP (IoU 0.50:0.95) and AP75
    (``evaluate_voc_iou_range``) and the per-class AP under the metric ``use_07_metric`` picks (``metric``
    says which); all in 0-1. A class without non-difficult ground truth has AP NaN and
    is left out of the means.
    """
    names = resolve_classes(classes)
    dataset = VOCDetection(devkit_root, str(year), split, keep_difficult=True, classes=names,
                           skip_invalid=skip_invalid, drop_empty=False)
    found = read_voc_results(results_dir, names, split, prefix, image_ids=dataset.ids)
    nothing = VOCBoxes(np.zeros((0, 4)), np.zeros(0, np.int64), scores=np.zeros(0), order=np.zeros(0, np.int64))
    predictions = [found.get(image_id, nothing) for image_id in dataset.ids]
    truth = [VOCBoxes(ann.boxes, ann.labels, difficult=ann.difficult)
             for ann in (dataset.annotation(i) for i in range(len(dataset)))]
    voc07 = evaluate_voc(predictions, truth, len(names), iou_threshold, use_07_metric=True)
    area = evaluate_voc(predictions, truth, len(names), iou_threshold, use_07_metric=False)
    chosen = voc07 if use_07_metric else area
    iou_range = evaluate_voc_iou_range(predictions, truth, len(names), use_07_metric)
    return {"map_voc07": voc07["mAP"], "map_area": area["mAP"], "ap": iou_range["AP"], "ap75": iou_range["AP75"],
            "ap_per_class": {name: float(ap) for name, ap in zip(names, chosen["ap"])},
            "metric": "voc07" if use_07_metric else "area",
            "num_gt": {name: int(n) for name, n in zip(names, chosen["num_gt"])}}
