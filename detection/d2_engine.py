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

Multi-GPU: launch with torchrun, e.g. ``torchrun --nproc-per-node 8 -m tricks train CONFIG``
(or a script calling ``train(cfg)``). ``train`` joins the process group torchrun describes and creates
the per-machine group that detectron2's ``comm.get_local_rank`` needs (v0.6 makes it only in its own
``launch()``). detectron2 wraps the model in DDP with ``device_ids=[local_rank]``, so multi-process
training needs CUDA.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.machinery
import importlib.util
import inspect
import logging
import os
import sys
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

from runtime.config import dump_config
from runtime.data import default_workers, normalization
from runtime.distributed import world_size
from runtime.errors import UserPathError
from runtime.images import index_images
from runtime.schedules import scale_lr
from runtime.strict import check_fits, model_state, read_checkpoint

from . import voc as voc_data
from .config import REFERENCE_BATCH, DetectionConfig
from .voc_eval import VOCBoxes, evaluate_voc

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
        from the module (the C4 box head owns res5), so DDP sees no unused parameters.
        """

        def __init__(self, backbone, out_features: list[str], up_to: Optional[str] = None):
            super().__init__()
            self.body = backbone
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
    return _backbone_class()(_create_registry_backbone(d2_cfg.MODEL.TRICKS), out_features, up_to)


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
    if hasattr(voc_data, "resolve_classes"):
        return tuple(voc_data.resolve_classes(cfg.data.classes))
    if cfg.data.classes is not None:
        raise ValueError("data.classes is set but this detection.voc cannot load other classes than the 20 VOC "
                         "ones (no resolve_classes): leave data.classes unset")
    return voc_data.VOC_CLASSES


def _build_voc(cfg: DetectionConfig, splits: str, keep_difficult: bool, **kwargs: Any):
    """Our VOC loader, given ``classes=`` / ``skip_invalid=`` when this detection.voc takes them."""
    params = inspect.signature(voc_data.build_voc).parameters
    if "classes" in params:
        kwargs["classes"] = cfg.data.classes
    if "skip_invalid" in params:
        kwargs["skip_invalid"] = cfg.data.skip_invalid
    return voc_data.build_voc(cfg.data.root, splits, keep_difficult=keep_difficult, **kwargs)


def _parts(dataset) -> list:
    return list(dataset.datasets) if isinstance(dataset, voc_data.VOCConcat) else [dataset]


def voc_dataset_dicts(cfg: DetectionConfig, splits: str, keep_difficult: bool) -> list[dict]:
    """Our VOC splits as detectron2 dataset dicts: ``file_name``, ``image_id``, ``height``, ``width`` and
    ``annotations`` (``bbox`` XYXY_ABS continuous coordinates, ``category_id`` 0-based, ``iscrowd`` 0,
    ``difficult``). ``keep_difficult=False`` (training) drops difficult boxes."""
    from detectron2.structures import BoxMode

    dicts = []
    for part in _parts(_build_voc(cfg, splits, keep_difficult)):
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
    """Register ``splits`` of ``data.root`` (training: difficult boxes dropped) in detectron2's catalogs;
    returns the dataset name, unique per (root, splits, classes, train); a second call reuses it.

    The metadata carries ``thing_classes`` and, for a single split, detectron2's VOC keys (``dirname``,
    ``split``, ``year``), so its own ``PascalVOCDetectionEvaluator`` can read the same devkit.
    """
    import_detectron2()
    from detectron2.data import DatasetCatalog, MetadataCatalog

    classes = _class_names(cfg)
    root = Path(cfg.data.root).resolve()
    key = repr((str(root), splits, classes, train, cfg.data.skip_invalid))
    name = f"tricks_voc_{splits.replace('+', '_')}_{'train' if train else 'test'}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    if name in DatasetCatalog.list():
        return name
    DatasetCatalog.register(name, lambda: voc_dataset_dicts(cfg, splits, keep_difficult=not train))
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

        ``evaluate()`` returns detectron2-style ``{"bbox": {"AP50", "AP50-<class>"...}}`` (VOC07 11-point,
        percent, as the torch engine reports) plus ``{"voc": {"mAP_area", "AP50_area-<class>"..., "images"}}``
        (the VOC2010+ area under the precision/recall curve).
        """

        def __init__(self, dataset_name: str):
            self.dataset_name = dataset_name
            self.class_names = list(MetadataCatalog.get(dataset_name).thing_classes)
            self.reset()

        def reset(self) -> None:
            self._predictions: dict[str, VOCBoxes] = {}

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
            truth, preds = [], []
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
            bbox = {"AP50": 100 * eleven["mAP"]}
            bbox.update({f"AP50-{name}": 100 * float(ap) for name, ap in zip(self.class_names, eleven["ap"])})
            extra = {"mAP_area": 100 * area["mAP"], "images": float(len(truth))}
            extra.update({f"AP50_area-{name}": 100 * float(ap) for name, ap in zip(self.class_names, area["ap"])})
            return OrderedDict(bbox=bbox, voc=extra)

    return VOCEvaluator


def build_voc_evaluator(dataset_name: str):
    """The suite's VOC evaluator (a detectron2 ``DatasetEvaluator``) for a registered dataset."""
    import_detectron2()
    return _voc_evaluator_class()(dataset_name)


def metrics_from_results(results: dict, class_names) -> dict[str, Any]:
    """detectron2 results of ``VOCEvaluator`` -> the suite's ``{"mAP", "AP", "images", "mAP_area"}`` (percent)."""
    bbox, extra = results["bbox"], results.get("voc", {})
    return {"mAP": float(bbox["AP50"]), "AP": {name: float(bbox[f"AP50-{name}"]) for name in class_names},
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
    if t.precision == "bf16":
        raise ValueError("train.precision=bf16: detectron2 v0.6's AMPTrainer autocasts to fp16 only (with a "
                         "GradScaler, on CUDA); use precision=fp16 on CUDA or fp32, or engine=torch for bf16")
    cuda = torch.cuda.is_available()
    if t.precision == "fp16" and not cuda:
        raise ValueError("train.precision=fp16 needs CUDA with the detectron2 engine (its AMPTrainer asserts it); "
                         "use precision=fp32 on CPU")
    from backbones import get_builder  # noqa: F401  (checks the name early, with suggestions)

    get_builder(m.backbone)
    classes = _class_names(cfg)
    global_batch = t.batch_size * world_size()
    d2 = get_cfg()
    d2.MODEL.TRICKS = CfgNode({"BACKBONE": m.backbone, "WEIGHTS": m.weights or "", "NORM": m.norm,
                               "FROZEN_STAGES": m.frozen_stages, "KWARGS": CfgNode(dict(m.kwargs))})
    d2.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    d2.MODEL.MASK_ON = False
    d2.MODEL.WEIGHTS = ""  # the backbone loads its own pretrained weights (MODEL.TRICKS.WEIGHTS)
    d2.MODEL.DEVICE = "cuda" if cuda else "cpu"
    # Our backbones take RGB normalised with the classification run's mean/std; detectron2 on 0-255 pixels.
    mean, std = normalization(cfg.data.mean, cfg.data.std, m.backbone, 3, m.kwargs)
    d2.INPUT.FORMAT = "RGB"
    d2.MODEL.PIXEL_MEAN = [255.0 * v for v in mean]
    d2.MODEL.PIXEL_STD = [255.0 * v for v in std]
    d2.MODEL.BACKBONE.FREEZE_AT = m.frozen_stages + 1  # informative: our backbone freezes itself
    if m.arch == "fpn":  # Base-RCNN-FPN.yaml
        d2.MODEL.BACKBONE.NAME = FPN_BACKBONE
        d2.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
        d2.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
        if len(m.anchor_sizes) != 5:
            raise ValueError(f"model.anchor_sizes={m.anchor_sizes}: FPN takes one size per level P2..P6 (5)")
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
        raise ValueError(f"model.arch={m.arch!r}: use 'fpn' or 'c4'")
    d2.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    d2.MODEL.RPN.PRE_NMS_TOPK_TRAIN = m.rpn_pre_nms_topk_train
    d2.MODEL.RPN.POST_NMS_TOPK_TRAIN = m.rpn_post_nms_topk_train
    d2.MODEL.RPN.PRE_NMS_TOPK_TEST = m.rpn_pre_nms_topk_test
    d2.MODEL.RPN.POST_NMS_TOPK_TEST = m.rpn_post_nms_topk_test
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
    d2.DATASETS.TRAIN = (register_voc(cfg, cfg.data.train_splits, train=True),)
    d2.DATASETS.TEST = (register_voc(cfg, cfg.data.test_splits, train=False),)
    d2.DATALOADER.NUM_WORKERS = default_workers(cfg.data.workers)
    d2.SOLVER.IMS_PER_BATCH = global_batch
    d2.SOLVER.REFERENCE_WORLD_SIZE = 0  # the batch and lr are already the global ones
    d2.SOLVER.BASE_LR = scale_lr(o.lr, global_batch, REFERENCE_BATCH)
    d2.SOLVER.MOMENTUM = o.momentum
    d2.SOLVER.WEIGHT_DECAY = o.weight_decay
    d2.SOLVER.WEIGHT_DECAY_NORM = 0.0
    d2.SOLVER.WEIGHT_DECAY_BIAS = 0.0 if o.no_bias_decay else None  # None: same as WEIGHT_DECAY
    d2.SOLVER.STEPS = tuple(o.milestones)
    d2.SOLVER.GAMMA = o.gamma
    d2.SOLVER.WARMUP_ITERS = o.warmup_iters
    d2.SOLVER.MAX_ITER = t.max_iter
    d2.SOLVER.CHECKPOINT_PERIOD = t.checkpoint_every
    d2.SOLVER.AMP.ENABLED = t.precision == "fp16"
    d2.TEST.EVAL_PERIOD = t.eval_every
    d2.SEED = t.seed
    d2.OUTPUT_DIR = cfg.output_dir
    return d2


# ------------------------------------------------------------------------------------------------ trainer
def _trainer_class():
    from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
    from detectron2.data import transforms as T
    from detectron2.engine import DefaultTrainer, hooks

    class Trainer(DefaultTrainer):
        """detectron2's ``DefaultTrainer`` with our evaluator and our flip probability; the loop is its own."""

        flip_prob = 0.5
        log_every = 20

        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            return _voc_evaluator_class()(dataset_name)

        @classmethod
        def build_train_loader(cls, cfg):
            augmentations = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                                  cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
            if cls.flip_prob > 0:
                augmentations.append(T.RandomFlip(prob=cls.flip_prob, horizontal=True))
            return build_detection_train_loader(cfg, mapper=DatasetMapper(cfg, is_train=True,
                                                                          augmentations=augmentations))

        @classmethod
        def build_test_loader(cls, cfg, dataset_name):
            return build_detection_test_loader(cfg, dataset_name)

        def build_hooks(self):
            found = super().build_hooks()
            for hook in found:  # DefaultTrainer fixes the writer period at 20: use train.log_every
                if isinstance(hook, hooks.PeriodicWriter):
                    hook._period = self.log_every
            return found

    return Trainer


def _init_distributed() -> None:
    """Join torchrun's process group (if WORLD_SIZE > 1) and give detectron2 its per-machine group."""
    if world_size() <= 1:
        return
    from detectron2.utils import comm

    from runtime.distributed import init_distributed

    info = init_distributed()
    if info.device.type != "cuda":
        raise RuntimeError("multi-process training with the detectron2 engine needs CUDA (detectron2 builds "
                           "DDP with device_ids=[local_rank]); run one process on CPU")
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count()))
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


def build_trainer(cfg: DetectionConfig, resume: Optional[str] = None):
    """detectron2's trainer for ``cfg``, with weights/state loaded: ``resume`` "auto" continues from
    ``<output_dir>/last_checkpoint`` if present, a path continues from that checkpoint, None starts fresh."""
    import_detectron2()
    _init_distributed()
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.logger import setup_logger

    d2 = build_d2_config(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_logger(str(out), distributed_rank=comm.get_rank(), name="detectron2")
    seed_all_rng(cfg.train.seed + comm.get_rank())
    if comm.is_main_process():
        dump_config(cfg, out / "config.yaml")  # ours, resolved
        (out / "detectron2_config.yaml").write_text(d2.dump())  # what detectron2 ran
    d2.freeze()
    trainer_cls = _trainer_class()
    trainer_cls.flip_prob, trainer_cls.log_every = cfg.data.hflip, cfg.train.log_every
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


def train(cfg: DetectionConfig) -> dict[str, Any]:
    """Train on ``data.train_splits`` with detectron2's trainer, evaluate on ``data.test_splits``.

    Returns ``{"mAP", "AP": {class: AP}, "images", "mAP_area"}`` (VOC07 11-point AP in percent) on the main
    rank (an empty dict on the others). Checkpoints: ``<output_dir>/model_*.pth`` and ``last_checkpoint``.
    """
    # Both splits read and every image decoded before detectron2 builds anything: a broken test image stops
    # the run now, not after training (errors name the file).
    _build_voc(cfg, cfg.data.train_splits, keep_difficult=False, check_images=True)
    _build_voc(cfg, cfg.data.test_splits, keep_difficult=True, check_images=True)
    trainer = build_trainer(cfg, resume=cfg.train.resume)
    trainer.train()
    results = getattr(trainer, "_last_eval_results", None)
    if not results:  # detectron2's EvalHook evaluates after the last iteration; this is a fallback
        results = trainer.test(trainer.cfg, trainer.model)
    return metrics_from_results(results, _class_names(cfg)) if results else {}


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
    return metrics_from_results(results, _class_names(cfg)) if results else {}
