"""The detectron2 detection engine: detectron2's Faster R-CNN and trainer, driven with the suite's backbone,
VOC loader and devkit AP (``cfg.engine: detectron2``).

The adapter hands detectron2 three things and lets its ``DefaultTrainer`` run the loop (no second copy of it):

* the model: a registry backbone wrapped as a detectron2 ``Backbone`` (FPN over res2..res5, or C4: res4 into
  ``Res5ROIHeads`` whose res5 is the backbone's own last stage), everything else detectron2's
  ``GeneralizedRCNN`` as in its VOC recipes (``configs/PascalVOC-Detection/faster_rcnn_R_50_{FPN,C4}.yaml``);
* the data: our VOC splits (``detection.voc``) registered in ``DatasetCatalog`` as detectron2 dicts;
* the evaluator: detections scored with ``detection.voc_eval.evaluate_voc`` (the devkit's AP), so both
  engines report the same numbers.

detectron2 is imported here only, inside functions (``import_detectron2``). It has no PyPI release: the
suite's ``bash scripts/setup.sh`` installs v0.6 without its C++ extension (Faster R-CNN needs none:
torchvision supplies nms / roi_align), and ``import_detectron2`` installs the few shims that v0.6 needs
on numpy>=1.24 / Pillow>=10.

Multi-process: launch with torchrun, e.g. ``torchrun --nproc-per-node 8 -m tricks train CONFIG``
(or a script calling ``train(cfg)``). ``train`` joins the process group torchrun describes (NCCL on CUDA,
gloo on CPU) and creates the per-machine group that detectron2's ``comm.get_local_rank`` needs (v0.6 makes
it only in its own ``launch()``). detectron2 wraps the model in DDP with ``device_ids=[local_rank]``; on
CPU, where DDP refuses device ids, the trainer is built with DDP without them. Evaluation is sharded over
the ranks and gathered on rank 0, once per evaluation.

Non-finite losses follow the suite's policy (``train.max_nonfinite``, ``runtime.step``): a step whose loss
is not finite on any rank is skipped on every rank, and ``max_nonfinite`` in a row stop the run with
``TrainingDiverged`` before that iteration's checkpoint, so the last checkpoint is the last good one
(detectron2 itself raises ``FloatingPointError`` on the first, on the main rank only).
"""
from __future__ import annotations

import copy
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import random
import sys
import types
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

from runtime.config import ConfigError, check_bounds, dump_config
from runtime.data import default_workers, normalization
from runtime.distributed import all_reduce_min, world_size
from runtime.errors import UserPathError
from runtime.images import index_images
from runtime.schedules import scale_lr, schedule_for_batch
from runtime.step import TrainingDiverged
from runtime.strict import check_fits, model_state, read_checkpoint

from . import voc as voc_data
from .coco import check_checkpoint_classes
from .config import REFERENCE_BATCH, DetectionConfig, check_fpn_anchor_sizes, check_sync_bn, rpn_topk
from .voc_eval import VOCBoxes, evaluate_voc, evaluate_voc_iou_range

log = logging.getLogger("detection.d2")

INSTALL_HINT = ("detectron2 is not installed. Install it with `bash scripts/setup.sh` (detectron2 v0.6 from "
                "PyPI's pb1-detectron2 sdist, built without its C++ extension), or from upstream with "
                "`pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2'`.")

FPN_BACKBONE = "build_tricks_fpn_backbone"
C4_BACKBONE = "build_tricks_c4_backbone"
C4_ROI_HEADS = "TricksRes5ROIHeads"


# ------------------------------------------------------------------------------------------------ import
def _install_compat_shims() -> None:
    """Names detectron2 v0.6 uses that numpy>=1.24 and Pillow>=10 removed (only the missing ones)."""
    for name, value in (("bool", bool), ("int", int), ("float", float), ("str", str), ("object", object)):
        if name not in np.__dict__:
            setattr(np, name, value)
    from PIL import Image

    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.Resampling.BILINEAR
    if not hasattr(Image, "ANTIALIAS"):
        Image.ANTIALIAS = Image.Resampling.LANCZOS


def _extension_stub() -> types.ModuleType:
    """A stand-in for ``detectron2._C``: imports succeed; any compiled op (deformable conv, rotated boxes,
    the fast COCO evaluator), if ever called, raises with the install hint. Faster R-CNN calls none."""
    module = types.ModuleType("detectron2._C")
    module.__spec__ = importlib.machinery.ModuleSpec("detectron2._C", None)
    module.TRICKS_STUB = True

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise NotImplementedError(f"detectron2._C.{name} is a compiled op and this detectron2 was installed "
                                      "without its C++ extension; build detectron2 from source to use it")
        return missing

    module.__getattr__ = __getattr__
    return module


def import_detectron2() -> types.ModuleType:
    """Import detectron2 (with the compat shims, and a ``detectron2._C`` stand-in only when the real
    extension is absent) and return the package; ImportError names the install command."""
    _install_compat_shims()
    try:
        import detectron2
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    if "detectron2._C" not in sys.modules:
        try:
            has_extension = importlib.util.find_spec("detectron2._C") is not None
        except (ImportError, ValueError):
            has_extension = False
        if not has_extension:
            sys.modules["detectron2._C"] = detectron2._C = _extension_stub()
    try:
        import detectron2.modeling  # noqa: F401  (fails here, not later, if anything else is missing)
        import detectron2.engine  # noqa: F401
    except ImportError as e:
        raise ImportError(f"detectron2 is installed but does not import: {e}. {INSTALL_HINT}") from e
    return detectron2


# ------------------------------------------------------------------------------------------------ model
def _create_registry_backbone(spec):
    """Our backbone from the ``MODEL.TRICKS`` node of a detectron2 config."""
    from backbones import create_backbone

    return create_backbone(spec.BACKBONE, weights=spec.WEIGHTS or None, num_classes=0, new_head=True, adapt_input=True,
                           frozen_stages=spec.FROZEN_STAGES,
                           norm_layer="frozenbatchnorm" if spec.NORM == "frozenbatchnorm" else None,
                           **dict(spec.KWARGS))


def _last_stage(backbone) -> tuple[str, nn.Module]:
    """The attribute name and module of the backbone's last stage (res5), for the C4 box head."""
    stage = backbone.stages()[-1]
    if len(stage) != 1:
        raise NotImplementedError(f"model.arch=c4 needs a backbone whose last stage is one module; "
                                  f"{type(backbone).__name__} has {len(stage)}: use model.arch=fpn")
    for name, child in backbone.named_children():
        if child is stage[0]:
            return name, child
    raise NotImplementedError(f"the last stage of {type(backbone).__name__} is not a direct child module: "
                              "use model.arch=fpn")


def _backbone_class():
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import Backbone

    class RegistryBackbone(Backbone):
        """A registry backbone (``backbones.create_backbone``) as a detectron2 ``Backbone``: ``forward``
        returns the ``out_features`` of ``forward_features``; shapes come from its declared ``feature_info``.

        ``up_to`` (C4) runs the stem and the stages up to that feature only; the later stages are removed
        from the module (the C4 box head owns res5), so DDP sees no unused parameters. ``channels_last``:
        the body's weights and its input in NHWC (the FPN's convolutions follow their input's format).
        """

        def __init__(self, backbone, out_features: list[str], up_to: Optional[str] = None,
                     channels_last: bool = False):
            super().__init__()
            self.channels_last = channels_last
            self.body = backbone.to(memory_format=torch.channels_last) if channels_last else backbone
            info = {f.name: f for f in backbone.feature_info}
            unknown = [f for f in out_features if f not in info]
            if unknown:
                raise ValueError(f"{backbone.arch} has features {list(info)}, not {unknown}")
            self._out_features = list(out_features)
            self._out_feature_channels = {f: info[f].channels for f in out_features}
            self._out_feature_strides = {f: info[f].stride for f in out_features}
            self._stages: Optional[list[nn.Module]] = None
            if up_to is not None:
                names = [f.name for f in backbone.feature_info]
                stages = backbone.stages()[1:]
                if any(len(s) != 1 for s in stages):
                    raise NotImplementedError(f"model.arch=c4 needs one module per stage; {backbone.arch} "
                                              "has others: use model.arch=fpn")
                self._stages = [s[0] for s in stages[: names.index(up_to) + 1]]
                for name, _ in [_last_stage(backbone)] if names[-1] != up_to else []:
                    setattr(backbone, name, nn.Identity())

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self._stages is None:
                feats = self.body.forward_features(x)
            else:
                feats, x = {}, self.body.forward_stem(x)
                for info, stage in zip(self.body.feature_info, self._stages):
                    x = feats[info.name] = stage(x)
            return {f: feats[f] for f in self._out_features}

        def output_shape(self) -> dict[str, ShapeSpec]:
            return {f: ShapeSpec(channels=self._out_feature_channels[f], stride=self._out_feature_strides[f])
                    for f in self._out_features}

    return RegistryBackbone


def build_registry_backbone(d2_cfg, out_features: list[str], up_to: Optional[str] = None):
    """Our backbone (``d2_cfg.MODEL.TRICKS``) wrapped as a detectron2 ``Backbone`` with ``out_features``."""
    return _backbone_class()(_create_registry_backbone(d2_cfg.MODEL.TRICKS), out_features, up_to,
                             channels_last=bool(d2_cfg.MODEL.TRICKS.get("CHANNELS_LAST", False)))


def register_d2_components() -> None:
    """Register the FPN and C4 backbone builders and the C4 ROI heads in detectron2's registries.

    Explicit (not an import side effect) and idempotent: a second call changes nothing.
    """
    import_detectron2()
    from detectron2.modeling import BACKBONE_REGISTRY, ROI_HEADS_REGISTRY
    from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
    from detectron2.modeling.roi_heads import Res5ROIHeads

    def build_tricks_fpn_backbone(cfg, input_shape):
        """FPN + LastLevelMaxPool (P2-P6) over res2..res5, as detectron2's ``build_resnet_fpn_backbone``."""
        bottom_up = build_registry_backbone(cfg, list(cfg.MODEL.FPN.IN_FEATURES))
        return FPN(bottom_up=bottom_up, in_features=cfg.MODEL.FPN.IN_FEATURES, out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
                   norm=cfg.MODEL.FPN.NORM, top_block=LastLevelMaxPool(), fuse_type=cfg.MODEL.FPN.FUSE_TYPE)

    def build_tricks_c4_backbone(cfg, input_shape):
        """Stem + res2..res4 (the ``res4`` map for the RPN and the C4 box head)."""
        return build_registry_backbone(cfg, ["res4"], up_to="res4")

    class TricksRes5ROIHeads(Res5ROIHeads):
        """detectron2's C4 box head with res5 taken from our backbone (a fresh copy of its last stage,
        with the same weights, norm and freezing) instead of detectron2's own ResNet block."""

        @classmethod
        def _build_res5_block(cls, cfg):
            backbone = _create_registry_backbone(cfg.MODEL.TRICKS)
            _, res5 = _last_stage(backbone)
            return copy.deepcopy(res5), backbone.feature_info[-1].channels

    for registry, name, obj in ((BACKBONE_REGISTRY, FPN_BACKBONE, build_tricks_fpn_backbone),
                                (BACKBONE_REGISTRY, C4_BACKBONE, build_tricks_c4_backbone),
                                (ROI_HEADS_REGISTRY, C4_ROI_HEADS, TricksRes5ROIHeads)):
        if name not in registry:
            registry.register(obj)  # registered under its __name__ (== name)


# ------------------------------------------------------------------------------------------------ data
def _class_names(cfg: DetectionConfig) -> tuple[str, ...]:
    if getattr(cfg.data, "format", "voc") == "coco":
        from .coco import dataset_classes

        return dataset_classes(cfg.data)
    return tuple(voc_data.resolve_classes(cfg.data.classes))


def _parts(dataset) -> list:
    return list(dataset.datasets) if isinstance(dataset, voc_data.VOCConcat) else [dataset]


def voc_dataset_dicts(cfg: DetectionConfig, splits: str, keep_difficult: bool) -> list[dict]:
    """Our VOC splits as detectron2 dataset dicts: ``file_name``, ``image_id``, ``height``, ``width`` and
    ``annotations`` (``bbox`` XYXY_ABS continuous coordinates, ``category_id`` 0-based, ``iscrowd`` 0,
    ``difficult``). ``keep_difficult=False`` drops difficult boxes (training with ``data.train_difficult=false``;
    detectron2's own VOC loader keeps them, as the default does)."""
    from detectron2.structures import BoxMode

    dicts = []
    dataset = voc_data.build_voc(cfg.data.root, splits, keep_difficult=keep_difficult, classes=cfg.data.classes,
                                 skip_invalid=cfg.data.skip_invalid)
    for part in _parts(dataset):
        # Each id's image by any extension (train() has checked that every one exists and decodes); an
        # evaluation from annotations alone (no JPEGImages) names the devkit's .jpg.
        folder = part.root / "JPEGImages"
        images = index_images(folder) if folder.is_dir() else {}
        for i, image_id in enumerate(part.ids):
            ann = part.annotation(i)
            dicts.append({
                "file_name": str(images.get(image_id, folder / f"{image_id}.jpg")),
                "image_id": image_id, "height": ann.height, "width": ann.width,
                "annotations": [{"bbox": [float(v) for v in box], "bbox_mode": BoxMode.XYXY_ABS,
                                 "category_id": int(label), "iscrowd": 0, "difficult": int(flag)}
                                for box, label, flag in zip(ann.boxes, ann.labels, ann.difficult)],
            })
    return dicts


def register_voc(cfg: DetectionConfig, splits: str, train: bool) -> str:
    """Register ``splits`` of ``data.root`` in detectron2's catalogs (difficult boxes flagged; in training
    dropped only with ``data.train_difficult=false``); returns the dataset name, unique per (root, splits,
    classes, train, difficult); a second call reuses it. Images without boxes are left out of training by
    detectron2's loader (``DATALOADER.FILTER_EMPTY_ANNOTATIONS``).

    The metadata carries ``thing_classes`` and, for a single split, detectron2's VOC keys (``dirname``,
    ``split``, ``year``), so its own ``PascalVOCDetectionEvaluator`` can read the same devkit.
    """
    import_detectron2()
    from detectron2.data import DatasetCatalog, MetadataCatalog

    classes = _class_names(cfg)
    root = Path(cfg.data.root).resolve()
    keep_difficult = cfg.data.train_difficult or not train
    key = repr((str(root), splits, classes, train, cfg.data.skip_invalid, keep_difficult))
    name = f"tricks_voc_{splits.replace('+', '_')}_{'train' if train else 'test'}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    if name in DatasetCatalog.list():
        return name
    DatasetCatalog.register(name, lambda: voc_dataset_dicts(cfg, splits, keep_difficult=keep_difficult))
    meta: dict[str, Any] = {"thing_classes": list(classes)}
    if "+" not in splits:
        year, _, image_set = splits.partition("-")
        devkit = root / "VOCdevkit" if (root / "VOCdevkit").is_dir() else root
        meta.update(dirname=str(devkit / f"VOC{year}"), split=image_set, year=int(year))
    MetadataCatalog.get(name).set(**meta)
    return name


# ------------------------------------------------------------------------------------------------ evaluation
def _voc_evaluator_class():
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import DatasetEvaluator
    from detectron2.utils import comm

    class VOCEvaluator(DatasetEvaluator):
        """Collects detections (all ranks) and scores them on the main rank with ``detection.voc_eval``.

        ``evaluate()`` returns detectron2-style ``{"bbox": {"AP", "AP50", "AP75", "AP50-<class>"...}}`` (VOC07 11-point,
        percent, as the torch engine reports) plus ``{"voc": {"mAP_area", "AP50_area-<class>"..., "images"}}``
        (the VOC2010+ area under the precision/recall curve) on the main rank, None on the others (as
        detectron2's evaluators). After it, ``detections`` holds the gathered ``{image_id: VOCBoxes}`` on the
        main rank (for the VOC results format and the pictures).
        """

        def __init__(self, dataset_name: str):
            self.dataset_name = dataset_name
            self.class_names = list(MetadataCatalog.get(dataset_name).thing_classes)
            self.reset()

        def reset(self) -> None:
            self._predictions: dict[str, VOCBoxes] = {}
            self.detections: dict[str, VOCBoxes] = {}

        def process(self, inputs, outputs) -> None:
            for inp, out in zip(inputs, outputs):
                instances = out["instances"].to("cpu")
                self._predictions[inp["image_id"]] = VOCBoxes(
                    instances.pred_boxes.tensor.numpy().astype(np.float64),
                    instances.pred_classes.numpy(), scores=instances.scores.numpy().astype(np.float64))

        def evaluate(self):
            gathered = comm.gather(self._predictions, dst=0)
            if not comm.is_main_process():
                return None
            predictions = {k: v for part in gathered for k, v in part.items()}
            self.detections = predictions  # every rank's (tricks eval --write-results)
            truth, preds = [], []
            self.detections = predictions
            empty = VOCBoxes(np.zeros((0, 4)), np.zeros(0, np.int64), scores=np.zeros(0))
            for record in DatasetCatalog.get(self.dataset_name):
                annos = record["annotations"]
                truth.append(VOCBoxes(np.array([a["bbox"] for a in annos], np.float64).reshape(-1, 4),
                                      np.array([a["category_id"] for a in annos], np.int64),
                                      difficult=np.array([bool(a.get("difficult", 0)) for a in annos], bool)))
                preds.append(predictions.get(record["image_id"], empty))
            num_classes = len(self.class_names)
            eleven = evaluate_voc(preds, truth, num_classes, use_07_metric=True)
            area = evaluate_voc(preds, truth, num_classes, use_07_metric=False)
            iou_range = evaluate_voc_iou_range(preds, truth, num_classes, use_07_metric=True)
            # AP, AP50, AP75 as detectron2's PascalVOCDetectionEvaluator (with the 11-point metric: year 2007)
            bbox = {"AP": 100 * iou_range["AP"], "AP50": 100 * eleven["mAP"], "AP75": 100 * iou_range["AP75"]}
            bbox.update({f"AP50-{name}": 100 * float(ap) for name, ap in zip(self.class_names, eleven["ap"])})
            extra = {"mAP_area": 100 * area["mAP"], "images": float(len(truth))}
            extra.update({f"AP50_area-{name}": 100 * float(ap) for name, ap in zip(self.class_names, area["ap"])})
            return OrderedDict(bbox=bbox, voc=extra)

    return VOCEvaluator


def build_evaluator(dataset_name: str):
    """Our evaluator for a registered set: COCOeval for COCO-format sets (``detection.d2_coco``), else VOC."""
    from detectron2.data import MetadataCatalog

    if MetadataCatalog.get(dataset_name).get("evaluator_type") == "tricks_coco":
        from .d2_coco import coco_evaluator_class

        return coco_evaluator_class()(dataset_name)
    return _voc_evaluator_class()(dataset_name)


def build_voc_evaluator(dataset_name: str):
    """The suite's VOC evaluator (a detectron2 ``DatasetEvaluator``) for a registered dataset."""
    import_detectron2()
    return _voc_evaluator_class()(dataset_name)


def metrics_from_results(results: dict, class_names) -> dict[str, Any]:
    """detectron2 results of ``VOCEvaluator`` -> the suite's ``{"mAP", "ap", "ap75", "AP", "images", "mAP_area"}``
    (percent; ``ap``/``ap75``: detectron2's VOC AP over IoU 0.50:0.95 and AP75); of the COCO evaluator ->
    ``detection.d2_coco.metrics_from_coco_results``."""
    if "coco" in results:
        from .d2_coco import metrics_from_coco_results

        return metrics_from_coco_results(results, class_names)
    bbox, extra = results["bbox"], results.get("voc", {})
    return {"mAP": float(bbox["AP50"]), "ap": float(bbox["AP"]), "ap75": float(bbox["AP75"]),
            "AP": {name: float(bbox[f"AP50-{name}"]) for name in class_names},
            "images": int(extra.get("images", 0)), "mAP_area": float(extra.get("mAP_area", float("nan")))}


# ------------------------------------------------------------------------------------------------ config
def build_d2_config(cfg: DetectionConfig):
    """A detectron2 ``CfgNode`` for ``cfg``: detectron2's VOC recipe (``faster_rcnn_R_50_FPN.yaml`` on
    ``Base-RCNN-FPN.yaml``, or ``faster_rcnn_R_50_C4.yaml`` on ``Base-RCNN-C4.yaml``) with our backbone,
    data, schedule and sizes. The global batch is ``train.batch_size`` x WORLD_SIZE; lr is per 16 images."""
    import_detectron2()
    register_d2_components()
    from detectron2.config import CfgNode, get_cfg

    m, o, t = cfg.model, cfg.optim, cfg.train
    cuda = torch.cuda.is_available()
    # auto: fp16 on CUDA (AMPTrainer), fp32 on a CPU (detectron2 v0.6 has no bf16 path)
    precision = ("fp16" if cuda else "fp32") if t.precision == "auto" else t.precision
    if precision == "bf16":
        raise ConfigError("train.precision=bf16: detectron2 v0.6's AMPTrainer autocasts to fp16 only (with a "
                         "GradScaler, on CUDA); use precision=fp16 on CUDA or fp32, or engine=torch for bf16")
    if precision == "fp16" and not cuda:
        raise ConfigError("train.precision=fp16 needs CUDA with the detectron2 engine (its AMPTrainer asserts it); "
                         "use precision=fp32 on CPU")
    # first: an unknown backbone or builder argument is a ConfigError naming the key, with suggestions
    mean, std = normalization(cfg.data.mean, cfg.data.std, m.backbone, 3, m.kwargs, weights=m.weights)
    classes = _class_names(cfg)
    global_batch = t.batch_size * world_size()
    d2 = get_cfg()
    d2.MODEL.TRICKS = CfgNode({"BACKBONE": m.backbone, "WEIGHTS": m.weights or "", "NORM": m.norm,
                               "FROZEN_STAGES": m.frozen_stages, "KWARGS": CfgNode(dict(m.kwargs)),
                               "SYNC_BN": bool(m.sync_bn and world_size() > 1),  # SyncBatchNorm under DDP
                               "CHANNELS_LAST": m.channels_last})
    d2.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    d2.MODEL.MASK_ON = False
    d2.MODEL.WEIGHTS = ""  # the backbone loads its own pretrained weights (MODEL.TRICKS.WEIGHTS)
    d2.MODEL.DEVICE = "cuda" if cuda else "cpu"
    # Our backbones take RGB normalised with the classification run's mean/std; detectron2 on 0-255 pixels.
    d2.INPUT.FORMAT = "RGB"
    d2.MODEL.PIXEL_MEAN = [255.0 * v for v in mean]
    d2.MODEL.PIXEL_STD = [255.0 * v for v in std]
    d2.MODEL.BACKBONE.FREEZE_AT = m.frozen_stages + 1  # informative: our backbone freezes itself
    if m.arch == "fpn":  # Base-RCNN-FPN.yaml
        d2.MODEL.BACKBONE.NAME = FPN_BACKBONE
        d2.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
        d2.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
        check_fpn_anchor_sizes(m.anchor_sizes)
        d2.MODEL.ANCHOR_GENERATOR.SIZES = [[size] for size in m.anchor_sizes]
        d2.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
        d2.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
        d2.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
        d2.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
        d2.MODEL.ROI_BOX_HEAD.NUM_FC = 2
        d2.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
        d2.MODEL.ROI_BOX_HEAD.FC_DIM = m.box_fc_dim
        d2.MODEL.FPN.OUT_CHANNELS = m.fpn_channels
    elif m.arch == "c4":  # Base-RCNN-C4.yaml (RPN and box head on res4, res5 as the box head)
        d2.MODEL.BACKBONE.NAME = C4_BACKBONE
        d2.MODEL.RESNETS.OUT_FEATURES = ["res4"]
        d2.MODEL.ANCHOR_GENERATOR.SIZES = [list(m.anchor_sizes)]  # every size on the one res4 level
        d2.MODEL.RPN.IN_FEATURES = ["res4"]
        d2.MODEL.ROI_HEADS.NAME = C4_ROI_HEADS
        d2.MODEL.ROI_HEADS.IN_FEATURES = ["res4"]
    else:
        raise ConfigError(f"model.arch={m.arch!r}: use 'fpn' or 'c4'")
    d2.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    (d2.MODEL.RPN.PRE_NMS_TOPK_TRAIN, d2.MODEL.RPN.POST_NMS_TOPK_TRAIN, d2.MODEL.RPN.PRE_NMS_TOPK_TEST,
     d2.MODEL.RPN.POST_NMS_TOPK_TEST) = rpn_topk(m)
    d2.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = m.roi_batch_per_image
    d2.MODEL.ROI_HEADS.SCORE_THRESH_TEST = m.score_thresh_test
    d2.TEST.DETECTIONS_PER_IMAGE = m.detections_per_image
    d2.MODEL.ROI_HEADS.NUM_CLASSES = len(classes)
    d2.INPUT.MIN_SIZE_TRAIN = tuple(m.min_size_train)
    d2.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    d2.INPUT.MAX_SIZE_TRAIN = m.max_size
    d2.INPUT.MIN_SIZE_TEST = m.min_size_test
    d2.INPUT.MAX_SIZE_TEST = m.max_size
    d2.INPUT.RANDOM_FLIP = "horizontal" if cfg.data.hflip > 0 else "none"
    if getattr(cfg.data, "format", "voc") == "coco":  # detection/d2_coco.py: COCO sets, COCOeval
        from .d2_coco import register_coco

        d2.DATASETS.TRAIN, d2.DATASETS.TEST = (register_coco(cfg, train=True),), (register_coco(cfg, train=False),)
    else:
        d2.DATASETS.TRAIN = (register_voc(cfg, cfg.data.train_splits, train=True),)
        d2.DATASETS.TEST = (register_voc(cfg, cfg.data.test_splits, train=False),)
    d2.DATALOADER.NUM_WORKERS = default_workers(cfg.data.workers)
    d2.SOLVER.IMS_PER_BATCH = global_batch
    d2.SOLVER.REFERENCE_WORLD_SIZE = 0  # the batch and lr are already the global ones
    d2.SOLVER.BASE_LR = scale_lr(o.lr, global_batch, REFERENCE_BATCH)
    d2.SOLVER.MOMENTUM = o.momentum
    d2.SOLVER.WEIGHT_DECAY = o.weight_decay
    # optim.no_bias_decay as in the torch engine: biases and norm layers exempt, or nothing exempt (detectron2's
    # own recipe exempts norm layers only; with the default frozen BN they have no gradient either way)
    d2.SOLVER.WEIGHT_DECAY_NORM = 0.0 if o.no_bias_decay else o.weight_decay
    d2.SOLVER.WEIGHT_DECAY_BIAS = 0.0 if o.no_bias_decay else None  # None: same as WEIGHT_DECAY
    d2.SOLVER.STEPS = tuple(o.milestones)
    d2.SOLVER.GAMMA = o.gamma
    d2.SOLVER.WARMUP_ITERS = o.warmup_iters
    d2.SOLVER.WARMUP_FACTOR = 0.0  # linear from 0, as the torch engine (runtime.schedules.lr_at); detectron2: 0.001
    d2.SOLVER.MAX_ITER = t.max_iter
    d2.SOLVER.CHECKPOINT_PERIOD = t.checkpoint_every or t.max_iter  # 0: at the end only (its final checkpoint)
    d2.SOLVER.AMP.ENABLED = precision == "fp16"
    d2.TEST.EVAL_PERIOD = t.eval_every
    d2.SEED = t.seed
    d2.OUTPUT_DIR = cfg.output_dir
    return d2


# ------------------------------------------------------------------------------------------------ trainer
def _nonfinite_policy(base):
    """``base`` (detectron2's ``SimpleTrainer`` or ``AMPTrainer``) with the suite's non-finite policy.

    detectron2 checks the loss in ``_write_metrics`` (between backward and the optimizer step) and raises
    ``FloatingPointError`` on the main rank alone. Here every rank learns whether the loss was finite on
    all ranks (one all-reduce); if not, the step is skipped everywhere: in fp32 the gradients are dropped
    (``grad=None``: SGD leaves such a parameter, its momentum and its weight decay untouched); in fp16 the
    GradScaler skips it (a non-finite loss makes non-finite gradients) and lowers the scale. The schedule
    still advances (it counts iterations); ``max_nonfinite`` skipped steps in a row raise
    ``TrainingDiverged`` before this iteration's checkpoint hook runs."""

    class NonFinitePolicy(base):
        max_nonfinite = 20
        nonfinite_streak = 0

        def _write_metrics(self, loss_dict, data_time, prefix=""):
            total = sum(v.detach().float() for v in loss_dict.values())
            if bool(all_reduce_min(torch.isfinite(total).float()).item()):
                self.nonfinite_streak = 0
                return super()._write_metrics(loss_dict, data_time, prefix)
            self.nonfinite_streak += 1
            if not hasattr(self, "grad_scaler"):
                self.optimizer.zero_grad(set_to_none=True)
            log.warning("iteration %d: non-finite loss (%s), step skipped (%d in a row; train.max_nonfinite=%d)",
                        self.iter + 1, {k: float(v) for k, v in loss_dict.items()}, self.nonfinite_streak,
                        self.max_nonfinite)
            if self.nonfinite_streak >= self.max_nonfinite:
                raise TrainingDiverged(
                    f"the loss was non-finite for {self.nonfinite_streak} steps in a row (iteration {self.iter + 1}); "
                    f"stopped. The last good checkpoint is the newest model_*.pth in {self.checkpoint_dir}. "
                    "Lower optim.lr, lengthen the warm-up, or train in fp32")

    return NonFinitePolicy


def _rng_state() -> dict:
    """This process's RNG states (python, numpy, torch, CUDA), as plain lists and tensors (a checkpoint
    loads with ``weights_only``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_hook_class():
    from detectron2.engine import HookBase
    from detectron2.utils import comm

    class RNGStates(HookBase):
        """Every rank's RNG states in each checkpoint, restored on resume. detectron2 v0.6 checkpoints the
        model, optimizer, scheduler and iteration, not these: a resumed run drew other RPN / RoI samples and
        augmentations than the uninterrupted run would. Gathered on the checkpoint iterations (all ranks,
        before the checkpointer writes). The data stream still restarts on resume (detectron2 keeps no
        position in its infinite sampler)."""

        def __init__(self, period: int):
            self._period = period
            self._states: Optional[list] = None

        def after_step(self):
            done = self.trainer.iter + 1
            if done % self._period == 0 or done >= self.trainer.max_iter:
                self._states = comm.gather(_rng_state(), dst=0)

        def state_dict(self):
            return {"ranks": self._states} if self._states else {}

        def load_state_dict(self, state):
            ranks = state.get("ranks") or []
            if len(ranks) == comm.get_world_size():
                _set_rng_state(ranks[comm.get_rank()])
            else:
                log.warning("the checkpoint holds the RNG states of %d processes, this run has %d: continuing "
                            "with fresh ones", len(ranks), comm.get_world_size())

    return RNGStates


@contextmanager
def _ddp_without_device_ids():
    """While detectron2's trainer is built on CPU: its ``create_ddp_model`` without ``device_ids``.

    ``DefaultTrainer.__init__`` calls ``create_ddp_model(model, broadcast_buffers=False)``, which adds
    ``device_ids=[local_rank]``: right for one GPU per process, refused by DDP for a CPU module (gloo). v0.6
    has no argument for it, so the module-level function is swapped for the constructor's duration only."""
    from detectron2.engine import defaults

    create = defaults.create_ddp_model
    defaults.create_ddp_model = lambda model, **kwargs: create(model, device_ids=None, **kwargs)
    try:
        yield
    finally:
        defaults.create_ddp_model = create


def _trainer_class():
    from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
    from detectron2.data import transforms as T
    from detectron2.data.common import AspectRatioGroupedDataset
    from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, hooks
    from detectron2.utils import comm

    policies = {SimpleTrainer: _nonfinite_policy(SimpleTrainer), AMPTrainer: _nonfinite_policy(AMPTrainer)}

    class Trainer(DefaultTrainer):
        """detectron2's ``DefaultTrainer`` with our evaluator, our flip probability, the writers' period
        ``train.log_every`` and the suite's non-finite policy; the loop is its own.

        ``last_evaluator`` is the evaluator of the latest evaluation (its ``detections``, on the main rank).
        """

        flip_prob = 0.5
        log_every = 20
        max_nonfinite = 20
        last_evaluator = None

        def __init__(self, cfg):
            if cfg.MODEL.DEVICE == "cpu" and world_size() > 1:
                with _ddp_without_device_ids():
                    super().__init__(cfg)
            else:
                super().__init__(cfg)
            # DefaultTrainer builds SimpleTrainer / AMPTrainer itself (no factory method in v0.6): the same
            # object, given the subclass that adds the non-finite policy to its loss check.
            self._trainer.__class__ = policies[type(self._trainer)]
            self._trainer.max_nonfinite = self.max_nonfinite
            self._trainer.checkpoint_dir = cfg.OUTPUT_DIR

        def state_dict(self):
            # detectron2 v0.6's DefaultTrainer checkpoints the iteration and its hooks (the scheduler), not the
            # optimizer (its momentum) nor AMP's GradScaler, which its SimpleTrainer holds: a resumed run restarted
            # them from zero. Saved and restored as later detectron2 releases do.
            return {**super().state_dict(), "_trainer": self._trainer.state_dict()}

        def load_state_dict(self, state_dict):
            super().load_state_dict(state_dict)
            if "_trainer" in state_dict:
                self._trainer.load_state_dict(state_dict["_trainer"])
            else:
                log.warning("this checkpoint holds no optimizer state (written before it was saved): the momentum "
                            "restarts from zero")

        @classmethod
        def build_model(cls, cfg):
            model = super().build_model(cfg)
            if cfg.MODEL.TRICKS.SYNC_BN:  # model.sync_bn under DDP: BN statistics over the global batch
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            return model

        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            cls.last_evaluator = build_evaluator(dataset_name)
            return cls.last_evaluator

        @classmethod
        def test(cls, cfg, model, evaluators=None):
            # DefaultTrainer builds DDP with broadcast_buffers=False, so trainable BN keeps each rank's own
            # running statistics: every shard is evaluated with rank 0's, the ones its checkpoint holds.
            if isinstance(model, nn.parallel.DistributedDataParallel):
                for buffer in model.module.buffers():
                    torch.distributed.broadcast(buffer, src=0)
            return super().test(cfg, model, evaluators)

        @classmethod
        def build_train_loader(cls, cfg):
            augmentations = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                                  cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
            if cls.flip_prob > 0:
                augmentations.append(T.RandomFlip(prob=cls.flip_prob, horizontal=True))
            loader = build_detection_train_loader(cfg, mapper=DatasetMapper(cfg, is_train=True,
                                                                            augmentations=augmentations))
            # Its own generator: starting the loader (lazily, at the first batch: after a resume has restored
            # the RNG states) then draws its workers' base seed from it, not from the training RNG.
            torch_loader = loader.dataset if isinstance(loader, AspectRatioGroupedDataset) else loader
            torch_loader.generator = torch.Generator().manual_seed(cfg.SEED + comm.get_rank())
            return loader

        @classmethod
        def build_test_loader(cls, cfg, dataset_name):
            return build_detection_test_loader(cfg, dataset_name)

        def build_writers(self):
            self.writers = super().build_writers()  # built once, handed to the writer hook below
            return self.writers

        def build_hooks(self):
            # DefaultTrainer fixes the writers' period at 20: the same writers at train.log_every instead.
            found = [hooks.PeriodicWriter(self.writers, period=self.log_every) if isinstance(hook, hooks.PeriodicWriter)
                     else hook for hook in super().build_hooks()]
            return [_rng_hook_class()(self.cfg.SOLVER.CHECKPOINT_PERIOD), *found]  # before the checkpointer

    return Trainer


def _init_distributed() -> None:
    """Join torchrun's process group (if WORLD_SIZE > 1) and give detectron2 its per-machine group."""
    if world_size() <= 1:
        return
    from detectron2.utils import comm

    from runtime.distributed import init_distributed

    info = init_distributed()
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    if getattr(comm, "_LOCAL_PROCESS_GROUP", None) is not None:
        return
    if hasattr(comm, "create_local_process_group"):  # detectron2 > 0.6
        comm.create_local_process_group(local_size)
        return
    # v0.6 creates it only in engine/launch.py: the same, from torchrun's environment. Every rank must
    # create every group, in the same order.
    machine = info.rank // local_size
    for i in range(info.world_size // local_size):
        group = torch.distributed.new_group(list(range(i * local_size, (i + 1) * local_size)))
        if i == machine:
            comm._LOCAL_PROCESS_GROUP = group


def _train_images(cfg: DetectionConfig) -> int:
    """Images detectron2's loader trains on (those with boxes: ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``)."""
    from detectron2.data import DatasetCatalog

    return sum(1 for record in DatasetCatalog.get(register_voc(cfg, cfg.data.train_splits, train=True))
               if record["annotations"])


class _CurrentStdout:
    """A stream that writes to the ``sys.stdout`` of the moment."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


def build_trainer(cfg: DetectionConfig, resume: Optional[str] = None):
    """detectron2's trainer for ``cfg``, with weights/state loaded: ``resume`` "auto" continues from
    ``<output_dir>/last_checkpoint`` if present, a path continues from that checkpoint, None starts fresh."""
    import_detectron2()
    _init_distributed()
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.logger import setup_logger

    if cfg.model.norm == "frozenbatchnorm" and cfg.model.weights is None:
        raise ConfigError("model.norm=frozenbatchnorm with model.weights unset freezes randomly initialised BN, and "
                         "Faster R-CNN then diverges: set model.weights to a pretrained backbone (model.safetensors "
                         "of a classification run) or use model.norm=batchnorm")
    if cfg.model.roi_align != "auto":
        raise ConfigError(f"model.roi_align={cfg.model.roi_align} chooses the torchvision engine's RoI pooler; the "
                          "detectron2 engine pools with detectron2's ROIAlignV2: leave model.roi_align=auto")
    check_sync_bn(cfg.model, torch.cuda.is_available())
    check_bounds(cfg)
    given = cfg
    cfg = schedule_for_batch(cfg, cfg.train.batch_size * world_size(), REFERENCE_BATCH, _train_images(cfg))
    d2 = build_d2_config(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    logger = setup_logger(str(out), distributed_rank=comm.get_rank(), name="detectron2")
    # setup_logger is cached per arguments: its console handler would keep the sys.stdout of its first call,
    # which a caller may swap later (a redirection, a test's capture): it writes to the current one instead.
    for handler in logger.handlers:
        if type(handler) is logging.StreamHandler and not isinstance(handler.stream, _CurrentStdout):
            handler.setStream(_CurrentStdout())
    seed_all_rng(cfg.train.seed + comm.get_rank())
    if comm.is_main_process():
        dump_config(given, out / "config.yaml")  # ours, resolved (the schedule as given: see train.scale_schedule)
        (out / "detectron2_config.yaml").write_text(d2.dump())  # what detectron2 ran
    d2.freeze()
    trainer_cls = _trainer_class()
    trainer_cls.flip_prob, trainer_cls.log_every = cfg.data.hflip, cfg.train.log_every
    trainer_cls.max_nonfinite = cfg.train.max_nonfinite
    trainer = trainer_cls(d2)
    if resume == "auto":
        if trainer.checkpointer.has_checkpoint():  # strictly: fvcore would skip what does not fit
            _check_fits(trainer.checkpointer.model, trainer.checkpointer.get_checkpoint_file(), cfg)
        trainer.resume_or_load(resume=True)
    elif resume:
        if not Path(resume).is_file():
            raise UserPathError(f"train.resume={resume!r}: no such checkpoint (use 'auto' or a model_*.pth "
                                f"of a detectron2-engine run)")
        _check_fits(trainer.checkpointer.model, resume, cfg)
        trainer.checkpointer.load(resume)  # model, optimizer, scheduler and iteration
        trainer.start_iter = trainer.iter + 1
    else:
        trainer.resume_or_load(resume=False)
    return trainer


def _check_fits(model, checkpoint: str, cfg: DetectionConfig) -> None:
    """Strict loading: detectron2's checkpointer (fvcore) loads what fits and logs "Skip loading" for the
    rest, which would evaluate or resume a partly random model. A checkpoint of another engine, architecture
    or number of classes is an error naming the file and what differs."""
    if str(checkpoint).endswith(".pkl"):  # Detectron / model-zoo pickles: detectron2 renames their keys itself
        return
    loaded = read_checkpoint(checkpoint)
    state = {k.removeprefix("module."): v for k, v in model_state(loaded, checkpoint).items()}
    check_fits(model, state, checkpoint, f"a detectron2-engine Faster R-CNN ({cfg.model.arch}, "
               f"{len(_class_names(cfg))} classes)", loaded)
    check_checkpoint_classes(loaded, checkpoint, _class_names(cfg))


def train(cfg: DetectionConfig) -> dict[str, Any]:
    """Train on ``data.train_splits`` with detectron2's trainer, evaluate on ``data.test_splits``.

    Returns ``{"mAP", "AP": {class: AP}, "images", "mAP_area", "detections"}`` (VOC07 11-point AP in percent;
    detections per image id) on the main rank, an empty dict on the others. Checkpoints:
    ``<output_dir>/model_*.pth`` and ``last_checkpoint``; PNGs of the first ``train.visualize`` test images'
    detections in ``<output_dir>/detections``.
    """
    # Both splits read and every image decoded before detectron2 builds anything: a broken test image stops
    # the run now, not after training (errors name the file).
    if getattr(cfg.data, "format", "voc") == "voc":  # (COCO files are validated when registered)
        voc_data.build_voc(cfg.data.root, cfg.data.train_splits, keep_difficult=cfg.data.train_difficult,
                           classes=cfg.data.classes, skip_invalid=cfg.data.skip_invalid, check_images=True)
        voc_data.build_voc(cfg.data.root, cfg.data.test_splits, keep_difficult=True, classes=cfg.data.classes,
                           skip_invalid=cfg.data.skip_invalid, check_images=True)
    trainer = build_trainer(cfg, resume=cfg.train.resume)
    trainer.train()
    # detectron2's EvalHook evaluates after the last iteration on every rank; the main rank gets the
    # results, the others {}. Evaluate here only if it did not run (on every rank alike: it gathers).
    if not hasattr(trainer, "_last_eval_results"):
        trainer._last_eval_results = trainer.test(trainer.cfg, trainer.model)
    results = trainer._last_eval_results
    if not results:
        return {}
    return _metrics_with_detections(cfg, results, type(trainer).last_evaluator)


def _metrics_with_detections(cfg: DetectionConfig, results: dict, evaluator) -> dict[str, Any]:
    """The suite's metrics of an evaluation, with what ``tricks eval --write-results`` writes: the detections
    per image (VOC; and their pictures) or the COCO results records."""
    metrics = metrics_from_results(results, _class_names(cfg))
    if metrics.get("format") == "coco":
        metrics["results"] = evaluator.results
    else:
        metrics["detections"] = evaluator.detections
        _save_pictures(cfg, metrics["detections"])
    return metrics


def _save_pictures(cfg: DetectionConfig, detections: dict) -> None:
    """PNGs of the first ``train.visualize`` test images with their detections (``detection.visualize``)."""
    if cfg.train.visualize > 0:
        from .visualize import save_detection_pictures

        test_set = voc_data.build_voc(cfg.data.root, cfg.data.test_splits, keep_difficult=True,
                                      classes=cfg.data.classes, skip_invalid=cfg.data.skip_invalid)
        save_detection_pictures(test_set, detections, Path(cfg.output_dir) / "detections", cfg.train.visualize,
                                cfg.train.visualize_thresh)


def evaluate(cfg: DetectionConfig, checkpoint: str) -> dict[str, Any]:
    """VOC07 mAP (percent) of a detectron2-engine checkpoint (``model_final.pth``) on ``data.test_splits``."""
    import_detectron2()
    _init_distributed()
    from detectron2.checkpoint import DetectionCheckpointer

    if not Path(checkpoint).is_file():
        raise UserPathError(f"{checkpoint}: no such checkpoint (a model_*.pth of a detectron2-engine run)")
    d2 = build_d2_config(cfg)
    trainer_cls = _trainer_class()
    model = trainer_cls.build_model(d2)
    _check_fits(model, checkpoint, cfg)  # fvcore's load skips what does not fit ("Skip loading ...")
    DetectionCheckpointer(model).load(checkpoint)
    results = trainer_cls.test(d2, model)
    if not results:
        return {}
    return _metrics_with_detections(cfg, results, trainer_cls.last_evaluator)
