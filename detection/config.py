"""Typed configuration of a detection run (the torchvision engine); units in the comments.

Defaults follow detectron2's PASCAL VOC Faster R-CNN recipe (``faster_rcnn_R_50_FPN.yaml`` for VOC):
07+12 trainval, 07 test, 18k iterations of 16 images, lr 0.02 dropped x0.1 at 12k and 16k, 100
warm-up iterations, shorter side 480-800 in training and 800 in test.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

from runtime.config import ConfigError

REFERENCE_BATCH = 16  # optim.lr is per 16 images (detectron2's recipes), scaled linearly by every engine


@dataclass
class DetModelConfig:
    backbone: str = "resnet50d"              # registry name (backbones.list_backbones())
    kwargs: dict[str, Any] = field(default_factory=dict)  # further backbone builder arguments (width_mult, ...)
    arch: Literal["fpn", "c4"] = "fpn"       # fpn: Faster R-CNN + FPN; c4: res5 as the box head (detectron2 engine only)
    weights: Optional[str] = None            # pretrained backbone: the classification run's model.safetensors
    frozen_stages: int = 1                   # stem + first k stages frozen (detectron2 FREEZE_AT=2)
    norm: Literal["frozenbatchnorm", "batchnorm"] = "frozenbatchnorm"  # batchnorm: training from scratch
    sync_bn: bool = False                    # norm=batchnorm under DDP on CUDA: SyncBatchNorm (statistics over the global batch)
    channels_last: bool = True               # NHWC memory format for the backbone and FPN (both engines)
    roi_align: Literal["auto", "gather", "torchvision"] = "auto"  # torch engine's box pooler, torchvision's numbers either way: gather = all FPN levels in one gather (detection/roi_align.py, faster on CPU); auto = gather on CPU, torchvision's kernel on CUDA
    min_size_train: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))  # shorter side (px), drawn per image
    min_size_test: int = 800                 # shorter side at test (px)
    max_size: int = 1333                     # longer side cap (px)
    fpn_channels: int = 256                  # FPN output channels (detectron2 FPN.OUT_CHANNELS)
    box_fc_dim: int = 1024                   # width of the box head's two fully connected layers (ROI_BOX_HEAD.FC_DIM)
    # Region proposals and RoI sampling (both engines read them). The proposal counts left unset (None) are
    # the architecture's recipe: fpn as Base-RCNN-FPN 2000/1000 (train), 1000/1000 (test); c4 as
    # Base-RCNN-C4 12000/2000 (train), 6000/1000 (test); see rpn_topk().
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # px, one per level P2..P6
    rpn_pre_nms_topk_train: Optional[int] = None   # proposals kept (per level with FPN) before NMS (training)
    rpn_post_nms_topk_train: Optional[int] = None  # proposals kept per image after NMS (training)
    rpn_pre_nms_topk_test: Optional[int] = None
    rpn_post_nms_topk_test: Optional[int] = None
    roi_batch_per_image: int = 512           # RoIs sampled per image for the box head (25% positive)
    score_thresh_test: float = 0.05          # detections kept above this score (the devkit's mAP wants low)
    detections_per_image: int = 100


@dataclass
class DetDataConfig:
    format: Literal["voc", "coco"] = "voc"   # voc: root + splits; coco: instances JSON + images folder (detection/coco.py)
    root: str = "data/VOCdevkit"             # the VOCdevkit folder (VOC2007/, VOC2012/)
    train_splits: str = "2007-trainval+2012-trainval"
    test_splits: str = "2007-test"
    train_json: Optional[str] = None         # format=coco: training instances JSON and its images folder
    train_images: Optional[str] = None
    test_json: Optional[str] = None          # format=coco: test instances JSON and its images folder
    test_images: Optional[str] = None
    classes: Any = None                      # None = the 20 VOC classes (coco: every category); a list of names, or a file with one name per line
    skip_invalid: bool = False               # True: skip zero-area boxes / unknown class names and count them; False: error
    mean: Optional[list[float]] = None       # input normalisation (0-1 scale, RGB); None = the backbone's default
    std: Optional[list[float]] = None
    hflip: float = 0.5                       # horizontal flip probability in training
    train_difficult: bool = True             # train on boxes marked difficult too (detectron2's VOC loader does);
                                             # evaluation always keeps them aside (the devkit ignores them)
    workers: int = -1                        # DataLoader workers per process; -1 = from the CPU count


@dataclass
class DetOptimConfig:
    lr: float = 0.02                         # per 16 images; scaled linearly by the global batch
    momentum: float = 0.9
    weight_decay: float = 1e-4
    no_bias_decay: bool = False              # the paper's trick (biases and norm layers without decay); off: everything decays
    warmup_iters: int = 100                  # linear warm-up from 0 (iterations)
    milestones: list[int] = field(default_factory=lambda: [12000, 16000])  # x gamma at these iterations
    gamma: float = 0.1


@dataclass
class DetTrainConfig:
    max_iter: int = 18000                    # iterations (optimizer steps)
    scale_schedule: bool = False             # true: a global batch other than REFERENCE_BATCH (16) rescales max_iter,
                                             # milestones, warm-up, eval and checkpoint periods to the recipe's epochs
    batch_size: int = 2                      # images per device and step
    precision: Literal["fp32", "fp16", "bf16", "auto"] = "fp32"  # auto: fp16 on CUDA, bf16 on AMX / AMD AVX-512-BF16 CPUs, else fp32
    seed: int = 0
    log_every: int = 20                      # iterations
    eval_every: int = 0                      # iterations; 0 = only at the end
    checkpoint_every: int = 2000             # iterations; 0 = only at the end
    visualize: int = 4                       # PNGs of detections on the first N test images after evaluation
    visualize_thresh: float = 0.5            # detections drawn in those PNGs: score >= this
    resume: Optional[str] = None             # "auto" = <output_dir>/last.pth if present, or a path
    max_nonfinite: int = 20                  # stop after this many non-finite losses in a row (skipped steps)


# Proposal counts of detectron2's base recipes: (pre-NMS train, post-NMS train, pre-NMS test, post-NMS test).
RPN_TOPK = {"fpn": (2000, 1000, 1000, 1000),     # Base-RCNN-FPN.yaml (pre-NMS per level)
            "c4": (12000, 2000, 6000, 1000)}     # Base-RCNN-C4.yaml (detectron2's defaults)


def rpn_topk(model: DetModelConfig) -> tuple[int, int, int, int]:
    """The RPN's proposal counts (pre-NMS train, post-NMS train, pre-NMS test, post-NMS test): each key set
    in ``model`` as given, each left unset from the recipe of ``model.arch`` (``RPN_TOPK``)."""
    given = (model.rpn_pre_nms_topk_train, model.rpn_post_nms_topk_train, model.rpn_pre_nms_topk_test,
             model.rpn_post_nms_topk_test)
    recipe = RPN_TOPK[model.arch]
    return tuple(r if g is None else g for g, r in zip(given, recipe))


def check_sync_bn(model: DetModelConfig, cuda: bool) -> None:
    """``model.sync_bn=true`` needs trainable BN (``model.norm=batchnorm``) and CUDA (torch's SyncBatchNorm
    has no CPU kernel); both engines check it before training."""
    if model.sync_bn and model.norm != "batchnorm":
        raise ConfigError(f"model.sync_bn=true synchronises trainable BN, but model.norm={model.norm} (frozen BN "
                         "has no batch statistics): set model.norm=batchnorm or model.sync_bn=false")
    if model.sync_bn and not cuda:
        raise ConfigError("model.sync_bn=true needs CUDA: torch's SyncBatchNorm has no CPU kernel (set model.sync_bn=false)")


FPN_LEVELS = 5  # P2..P6: one anchor size per level


def check_fpn_anchor_sizes(anchor_sizes) -> None:
    """``model.anchor_sizes`` of a Faster R-CNN with FPN: one size per level P2..P6; both engines check it."""
    if len(anchor_sizes) != FPN_LEVELS:
        raise ConfigError(f"model.anchor_sizes={list(anchor_sizes)}: FPN takes one size per level P2..P6 "
                          f"({FPN_LEVELS})")


@dataclass
class DetectionConfig:
    # checked by runtime.config.load_config once every layer is applied (a ConfigError names the key)
    BOUNDS: ClassVar[dict[str, str]] = {
        "model.frozen_stages": ">= -1", "model.min_size_train": "nonempty >= 1", "model.min_size_test": ">= 1",
        "model.max_size": ">= 1", "model.fpn_channels": ">= 1", "model.box_fc_dim": ">= 1",
        "model.rpn_pre_nms_topk_train": ">= 1", "model.rpn_post_nms_topk_train": ">= 1",
        "model.rpn_pre_nms_topk_test": ">= 1", "model.rpn_post_nms_topk_test": ">= 1",
        "model.roi_batch_per_image": ">= 1", "model.score_thresh_test": "[0, 1]", "model.detections_per_image": ">= 1",
        "data.hflip": "[0, 1]", "data.workers": ">= -1", "data.std": "> 0",
        "optim.lr": "> 0", "optim.momentum": "[0, 1)", "optim.weight_decay": ">= 0", "optim.warmup_iters": ">= 0",
        "optim.gamma": "> 0", "optim.milestones": "ascending >= 0", "model.anchor_sizes": "nonempty >= 1",
        "train.max_iter": ">= 1", "train.batch_size": ">= 1", "train.seed": ">= 0", "train.log_every": ">= 1",
        "train.eval_every": ">= 0", "train.checkpoint_every": ">= 0", "train.visualize": ">= 0",
        "train.visualize_thresh": "[0, 1]", "train.max_nonfinite": ">= 1",
    }

    task: Literal["detection"] = "detection"
    engine: Literal["torch", "detectron2"] = "torch"  # torch: detection/train.py; detectron2: detection/d2_engine.py
    model: DetModelConfig = field(default_factory=DetModelConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    optim: DetOptimConfig = field(default_factory=DetOptimConfig)
    train: DetTrainConfig = field(default_factory=DetTrainConfig)
    output_dir: str = "runs/detection/default"
