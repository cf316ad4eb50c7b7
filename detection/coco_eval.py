"""COCO box metrics by pycocotools' ``COCOeval`` (the reference implementation: called, not rewritten),
and the COCO results format.

``COCOeval(gt, dt, "bbox")`` then ``evaluate() / accumulate() / summarize()`` gives the twelve numbers of
its summary; we report the box ones by their usual names (``stats[0..8]``): AP (IoU 0.50:0.95 in steps of
0.05, 101-point interpolated precision, areas all, 100 detections per image), AP50, AP75, APs/APm/APl
(area < 32², 32²..96², > 96², from each ground truth's ``area``), AR1/AR10/AR100 (recall with at most 1, 10,
100 detections per image, averaged over the IoUs). Per-class AP is the mean of ``eval["precision"]``
over IoUs and recall points of that category (area all, 100 detections), as detectron2's ``COCOEvaluator``
derives it. Crowd boxes (``iscrowd: 1``) are matched as COCO does: a detection on one is ignored, never a
false positive. All values are fractions in [0, 1]; a value COCOeval marks -1 (no ground truth in that
category or area range) is NaN.

The results format (``write_coco_results``): a JSON list of ``{"image_id", "category_id", "bbox": [x, y,
w, h], "score"}`` in the ground truth's ids, ``bbox`` in the same continuous pixel coordinates as the
annotations' (``x = x1``, ``w = x2 - x1`` of an XYXY box: no shift).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .coco import COCOFormatError, categories_of, load_instances, read_json

log = logging.getLogger(__name__)

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")  # COCOeval.stats[0:9], bbox


def _pycocotools():
    """pycocotools' ``COCO`` and ``COCOeval`` (imported on use: only COCO-format runs need them)."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise ImportError(f"COCO evaluation needs pycocotools: pip install 'pycocotools>=2.0.7' (or the suite's "
                          f"detection extra, pip install -e '.[detection]') ({e})") from e
    return COCO, COCOeval


def _quiet():
    """pycocotools prints its progress; keep stdout clean (``--json``) and send it to the debug log."""
    return contextlib.redirect_stdout(io.StringIO())


def coco_from_dict(doc: dict):
    """A pycocotools ``COCO`` object over an instances document already in memory."""
    COCO, _ = _pycocotools()
    with _quiet():
        gt = COCO()
        gt.dataset = doc
        gt.createIndex()
    return gt


def _array(detection: Any, field: str) -> Optional[np.ndarray]:
    value = detection.get(field) if isinstance(detection, Mapping) else getattr(detection, field, None)
    if value is not None and hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return None if value is None else np.asarray(value)


def detections_to_results(detections: Mapping[Any, Any], category_ids: Sequence[int]) -> list[dict]:
    """``{image_id: boxes (XYXY continuous), labels (index into the classes), scores}`` (``VOCBoxes``, a
    torchvision output dict, ...) -> COCO results: one dict per detection, ``category_id`` =
    ``category_ids[label]``, ``bbox`` ``[x1, y1, x2 - x1, y2 - y1]``."""
    results = []
    for image_id, detection in detections.items():
        boxes, labels, scores = (_array(detection, f) for f in ("boxes", "labels", "scores"))
        if boxes is None or labels is None or scores is None:
            raise ValueError(f"detections[{image_id!r}] needs boxes, labels and scores")
        boxes = boxes.astype(np.float64).reshape(-1, 4)
        for (x1, y1, x2, y2), label, score in zip(boxes.tolist(), labels.reshape(-1).tolist(),
                                                  scores.astype(np.float64).reshape(-1).tolist()):
            if not 0 <= label < len(category_ids):
                raise ValueError(f"detections[{image_id!r}] has label {label}, outside 0..{len(category_ids) - 1}")
            results.append({"image_id": image_id, "category_id": int(category_ids[label]),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    return results


def write_coco_results(path: Path | str, results: list[dict]) -> Path:
    """Write COCO results (``detections_to_results``) as JSON; numbers in Python's round-trip form."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))
    return path


def check_results(results: Any, gt, where: str) -> list[dict]:
    """Results as pycocotools' ``loadRes`` needs them, checked record by record (its own checks are bare
    asserts): a list of objects with a known ``image_id`` and ``category_id``, a ``bbox`` of 4 finite
    numbers and a finite ``score``."""
    if not isinstance(results, list):
        raise COCOFormatError(f"{where}: expected a JSON list of detections [{{image_id, category_id, bbox, "
                              f"score}}, ...], got a {type(results).__name__} (an instances file? give it as --gt)")
    images, categories = set(gt.getImgIds()), set(gt.getCatIds())
    for k, r in enumerate(results):
        record = f"{where}: [{k}]"
        if not isinstance(r, dict):
            raise COCOFormatError(f"{record}: expected an object, got {r!r}")
        if r.get("image_id") not in images:
            raise COCOFormatError(f"{record}: image_id {r.get('image_id')!r} is not an image of the ground truth")
        if r.get("category_id") not in categories:
            raise COCOFormatError(f"{record}: category_id {r.get('category_id')!r} is not a category of the "
                                  "ground truth")
        bbox = r.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) and
                                                                   math.isfinite(v) for v in bbox)):
            raise COCOFormatError(f"{record}: 'bbox' is {bbox!r}, expected [x, y, width, height]")
        score = r.get("score")
        if not (isinstance(score, (int, float)) and math.isfinite(score)):
            raise COCOFormatError(f"{record}: 'score' is {score!r}, expected a finite number")
    return results


def evaluate_coco(gt, results: list[dict], class_names: Optional[Mapping[int, str]] = None) -> dict:
    """COCOeval (bbox) of ``results`` (a checked list of COCO results) against ``gt`` (a pycocotools
    ``COCO``). Returns ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ap_per_class":
    {name: AP}}`` in [0, 1] (NaN where COCOeval has no ground truth); ``class_names``: category id -> name
    (default: the ground truth's category names).

    No detections at all: pycocotools' ``loadRes`` cannot take an empty list, so the detections are an empty
    ``COCO`` of the same images, scored by COCOeval like any other: 0 where there is ground truth (nothing found),
    NaN where an area range or category has none (as with detections).
    """
    _, COCOeval = _pycocotools()
    cat_ids = sorted(gt.getCatIds())
    names = class_names or {c["id"]: c["name"] for c in gt.loadCats(cat_ids)}
    with _quiet() as printed:
        if results:
            dt = gt.loadRes(copy.deepcopy(results))  # loadRes writes area/id/segmentation into the records
        else:
            dt = coco_from_dict({"images": list(gt.dataset["images"]), "annotations": [],
                                 "categories": copy.deepcopy(gt.dataset["categories"])})
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    log.debug("COCOeval:\n%s", printed.getvalue())
    clean = lambda v: math.nan if v < 0 else float(v)
    out: dict[str, Any] = {name: clean(v) for name, v in zip(STAT_NAMES, evaluator.stats[:9])}
    # precision: [IoU T, recall R, category K, area A, max detections M]; area "all", 100 detections.
    precision = evaluator.eval["precision"]
    per_class = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[names[cat_id]] = float(np.mean(p)) if p.size else math.nan
    out["ap_per_class"] = per_class
    return out


def score_coco_files(gt_path: Path | str, results_path: Path | str) -> dict:
    """``tricks coco-eval``: score a COCO results file against an instances file with COCOeval; see
    ``evaluate_coco``. Errors name the file and the record."""
    doc = load_instances(gt_path)
    categories_of(doc, gt_path)
    for k, ann in enumerate(doc["annotations"]):
        missing = [key for key in ("id", "image_id", "category_id", "bbox", "area", "iscrowd") if key not in ann]
        if missing:  # COCOeval reads all of them
            raise COCOFormatError(f"{gt_path}: annotations[{k}] has no {missing[0]!r} (COCOeval needs id, image_id, "
                                  "category_id, bbox, area, iscrowd)")
    gt = coco_from_dict(doc)
    results = read_json(results_path, "results file")
    return evaluate_coco(gt, check_results(results, gt, str(results_path)))


def evaluate_dataset(dataset, detections: Mapping[Any, Any]) -> dict:
    """COCOeval of ``detections`` (``{image_id: boxes, labels, scores}``, labels indexing
    ``dataset.classes``) on a ``detection.coco.COCODetection``'s own ground truth; ``evaluate_coco``'s
    result plus ``results`` (the COCO results list, for ``--write-results``)."""
    gt = coco_from_dict(dataset.evaluation_ground_truth())
    results = detections_to_results(detections, dataset.category_ids)
    names = dict(zip(dataset.category_ids, dataset.classes))
    return {**evaluate_coco(gt, results, names), "results": results}


def engine_metrics(result: dict, images: int) -> dict[str, Any]:
    """``evaluate_dataset``'s fractions as the engines report them: percent, ``mAP`` = ``ap`` = COCO AP (the
    headline the loops log and plot), ``ap50`` ... ``ar100``, per-class ``AP`` {name: percent},
    ``format: coco``."""
    metrics: dict[str, Any] = {name.lower(): 100 * result[name] for name in STAT_NAMES}
    metrics.update({"mAP": metrics["ap"], "AP": {k: 100 * v for k, v in result["ap_per_class"].items()},
                    "images": images, "format": "coco"})
    return metrics


def format_summary(metrics: Mapping[str, float], percent: bool = True) -> str:
    """One line: ``COCO AP 41.20%  AP50 ...  AR100 ...`` from lower-case keys (engine metrics, percent)."""
    return "  ".join(f"{'COCO ' if name == 'AP' else ''}{name} {metrics[name.lower()]:.2f}{'%' if percent else ''}"
                     for name in STAT_NAMES)


def describe_metrics(metrics: Mapping[str, Any]) -> str:
    """The headline of an engine's evaluation (percent), one line: COCO's nine numbers, or for VOC the VOC07
    mAP with detectron2's AP (IoU 0.50:0.95) and AP75."""
    if metrics.get("format") == "coco":
        return format_summary(metrics)
    return f"VOC07 mAP {metrics['mAP']:.2f}%  AP {metrics['ap']:.2f}%  AP75 {metrics['ap75']:.2f}%"
