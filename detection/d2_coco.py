"""The detectron2 engine on COCO-format data (``data.format: coco``): the sets of ``detection.coco``
registered in detectron2's ``DatasetCatalog``, and an evaluator scoring with pycocotools' COCOeval through
``detection.coco_eval`` (the same numbers as the torch engine). Part of the detectron2 adapter: detectron2
is imported inside functions only, after ``d2_engine.import_detectron2``.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from .coco import COCODetection, build_detection_set, dataset_classes
from .config import DetectionConfig
from .voc_eval import VOCBoxes

# dataset name -> its COCODetection (built on first use; the evaluator reads its ground truth)
_SETS: dict[str, Any] = {}
_BUILDERS: dict[str, Any] = {}


def coco_set(name: str) -> COCODetection:
    if name not in _SETS:
        _SETS[name] = _BUILDERS[name]()
    return _SETS[name]


def coco_dataset_dicts(dataset: COCODetection) -> list[dict]:
    """A COCO set as detectron2 dataset dicts: ``file_name``, ``image_id`` (the JSON's id), ``height``,
    ``width``, ``annotations`` (``bbox`` XYXY_ABS, clipped to the image; ``category_id`` 0-based label;
    ``iscrowd``). The training set has no crowd boxes (``COCODetection(keep_crowd=False)``)."""
    from detectron2.structures import BoxMode

    dicts = []
    for i, image_id in enumerate(dataset.ids):
        ann = dataset.annotation(i)
        dicts.append({
            "file_name": str(dataset.image_path(i)), "image_id": image_id, "height": ann.height, "width": ann.width,
            "annotations": [{"bbox": [float(v) for v in box], "bbox_mode": BoxMode.XYXY_ABS, "category_id": int(label),
                             "iscrowd": int(crowd)} for box, label, crowd in zip(ann.boxes, ann.labels, ann.difficult)],
        })
    return dicts


def register_coco(cfg: DetectionConfig, train: bool) -> str:
    """Register the training (``train``) or test set of ``data.train_json``/``test_json`` in detectron2's
    catalogs; the name is unique per (file, images, classes, skip_invalid, train). The files are validated
    here, before training (as the VOC path)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    classes = dataset_classes(cfg.data)
    files = (cfg.data.train_json, cfg.data.train_images) if train else (cfg.data.test_json, cfg.data.test_images)
    key = repr((tuple(str(Path(f).resolve()) if f else "" for f in files), classes, cfg.data.skip_invalid, train))
    name = f"tricks_coco_{'train' if train else 'test'}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    data = cfg.data
    _BUILDERS[name] = lambda: build_detection_set(data, train=train, classes=classes)
    dataset = coco_set(name)  # validate now
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: coco_dataset_dicts(coco_set(name)))
        MetadataCatalog.get(name).set(thing_classes=list(classes), evaluator_type="tricks_coco",
                                      json_file=str(dataset.annotation_file))
    return name


def coco_evaluator_class():
    from detectron2.evaluation import DatasetEvaluator
    from detectron2.utils import comm

    class COCOEvaluator(DatasetEvaluator):
        """Collects detections (all ranks) and scores them on the main rank with ``detection.coco_eval``
        (pycocotools' COCOeval). ``evaluate()`` returns detectron2's ``{"bbox": {"AP", "AP50", "AP75", "APs",
        "APm", "APl", "AP-<class>"...}}`` in percent plus ``{"coco": {"AR1", "AR10", "AR100", "images"}}``;
        ``results`` keeps the COCO results list (``tricks eval --write-results``)."""

        def __init__(self, dataset_name: str):
            self.dataset_name = dataset_name
            self.results: list[dict] = []
            self.reset()

        def reset(self) -> None:
            self._predictions: dict[Any, VOCBoxes] = {}

        def process(self, inputs, outputs) -> None:
            for inp, out in zip(inputs, outputs):
                instances = out["instances"].to("cpu")
                self._predictions[inp["image_id"]] = VOCBoxes(
                    instances.pred_boxes.tensor.numpy().astype(np.float64), instances.pred_classes.numpy(),
                    scores=instances.scores.numpy().astype(np.float64))

        def evaluate(self):
            from .coco_eval import evaluate_dataset

            gathered = comm.gather(self._predictions, dst=0)
            if not comm.is_main_process():
                return None
            predictions = {k: v for part in gathered for k, v in part.items()}
            dataset = coco_set(self.dataset_name)
            result = evaluate_dataset(dataset, predictions)
            self.results = result["results"]
            bbox = {name: 100 * result[name] for name in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
            bbox.update({f"AP-{name}": 100 * ap for name, ap in result["ap_per_class"].items()})
            extra = {name: 100 * result[name] for name in ("AR1", "AR10", "AR100")}
            extra["images"] = float(len(dataset))
            return OrderedDict(bbox=bbox, coco=extra)

    return COCOEvaluator


def metrics_from_coco_results(results: dict, class_names) -> dict[str, Any]:
    """``COCOEvaluator`` results -> the engines' COCO metrics (``detection.coco_eval.engine_metrics``)."""
    bbox, extra = results["bbox"], results.get("coco", {})
    metrics: dict[str, Any] = {k.lower(): float(v) for k, v in bbox.items() if not k.startswith("AP-")}
    metrics.update({k.lower(): float(v) for k, v in extra.items() if k != "images"})
    metrics.update({"mAP": metrics["ap"], "AP": {name: float(bbox[f"AP-{name}"]) for name in class_names},
                    "images": int(extra.get("images", 0)), "format": "coco"})
    return metrics
