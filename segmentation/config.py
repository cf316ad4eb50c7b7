"""Typed configuration of a segmentation run (both engines); units in the comments.

Defaults follow mmsegmentation's ``fcn_r50-d8_4xb4-80k_ade20k-512x512.py``: ADE20K (150 classes, label 0
"other" ignored), random resize of the (2048, 512) scale by 0.5-2.0 keeping the ratio, 512x512 crops with
``cat_max_ratio`` 0.75, flip, photometric distortion; SGD lr 0.01 for 16 images (4 devices x 4), momentum
0.9, weight decay 5e-4, poly decay (power 0.9, down to 1e-4) per iteration for 80k iterations.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional


REFERENCE_BATCH = 16  # optim.lr and optim.min_lr are per 16 images (mmseg's recipes: 4 devices x 4), both engines


@dataclass
class SegModelConfig:
    backbone: str = "resnet50d"              # registry name (backbones.list_backbones())
    weights: Optional[str] = None            # pretrained backbone: a classification run's model.safetensors, timm/torchvision files
    head: Literal["fcn", "torchvision"] = "fcn"  # fcn: mmseg's FCNHead (2 convs, input concatenated); torchvision: its single-conv FCNHead
    channels: int = 512                      # decode head width (mmseg fcn_r50-d8: 512)
    aux_channels: int = 256                  # auxiliary head width on res4 (mmseg: 256); aux_weight 0 = no auxiliary head
    aux_weight: float = 0.4                  # weight of the auxiliary loss
    dropout: float = 0.1                     # dropout before the classifier conv
    output_stride: int = 8                   # 8: dilation 2 and 4 in the last two stages (FCN-D8)
    frozen_stages: int = -1                  # stem + first k stages frozen; -1 = all trainable (mmseg)
    sync_bn: bool = True                     # SyncBatchNorm under DDP on CUDA (mmseg's SyncBN); BN otherwise
    in_chans: int = 3                        # input channels of the backbone
    channels_last: bool = True               # NHWC memory format for model and inputs
    kwargs: dict[str, Any] = field(default_factory=dict)  # further backbone builder arguments


@dataclass
class SegDataConfig:
    root: str = "data/ade/ADEChallengeData2016"  # the ADEChallengeData2016 folder (images/, annotations/)
    train_split: str = "training"
    val_split: str = "validation"
    num_classes: int = 150                   # classes after reduce_zero_label
    reduce_zero_label: bool = True           # annotation 0 = "other" -> ignored, 1..K -> 0..K-1 (ADE20K)
    class_names: Optional[list[str]] = None  # for tables and overlays; None = ADE20K's names when num_classes=150
    scale: list[int] = field(default_factory=lambda: [2048, 512])  # (long, short) side bound of the resize (px)
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # training: the scale times U[lo, hi]
    crop_size: list[int] = field(default_factory=lambda: [512, 512])  # training crop (h, w) (px)
    cat_max_ratio: float = 0.75              # re-draw a crop (up to 10 times) while one class covers more than this
    hflip: float = 0.5                       # horizontal flip probability
    photometric: bool = True                 # mmseg's PhotoMetricDistortion (brightness, contrast, saturation, hue)
    photometric_on: Literal["auto", "workers", "device"] = "auto"  # torch engine: where the batch gets it (the same
                                             # pixels either way); auto: on a CUDA device, else in the loader workers
    mean: Optional[list[float]] = None       # None = the backbone's default (0-1 scale)
    std: Optional[list[float]] = None
    workers: int = -1                        # DataLoader workers per process; -1 = from the CPU count
    max_images: int = 0                      # >0: only the first N images of each split (smoke tests)


@dataclass
class SegOptimConfig:
    lr: float = 0.01                         # per 16 images; scaled linearly by the global batch
    momentum: float = 0.9
    weight_decay: float = 5e-4
    no_bias_decay: bool = False              # the paper's trick, off as in mmseg's recipe
    power: float = 0.9                       # poly decay: (lr - min_lr) (1 - t / T) ** power + min_lr
    min_lr: float = 1e-4                     # per 16 images, scaled like lr (mmseg: eta_min 1e-4 at batch 16)
    warmup_iters: int = 0                    # linear warm-up from 0 (iterations); mmseg's recipe has none


@dataclass
class SegTrainConfig:
    max_iter: int = 80000                    # iterations (optimizer steps)
    scale_schedule: bool = False             # true: a global batch other than REFERENCE_BATCH (16) rescales max_iter,
                                             # warm-up, eval and checkpoint periods to the recipe's epochs
    batch_size: int = 4                      # images per device and step
    accum_steps: int = 1                     # gradient accumulation; global batch = batch_size x world x accum
    precision: Literal["fp32", "fp16", "bf16", "auto"] = "fp32"  # auto: fp16 on CUDA, bf16 on AMX / AMD AVX-512-BF16 CPUs, else fp32
    compile: bool = False                    # torch.compile the training forward (torch engine: the model; mmseg
                                             # engine: mmengine's cfg.compile, its train_step); evaluation stays eager
    seed: int = 0
    log_every: int = 50                      # iterations
    eval_every: int = 8000                   # iterations; 0 = only at the end
    checkpoint_every: int = 8000             # iterations; 0 = only at the end
    resume: Optional[str] = None             # "auto" = <output_dir>/last.pth if present, or a path
    max_nonfinite: int = 20                  # stop after this many non-finite losses in a row


@dataclass
class SegEvalConfig:
    mode: Literal["whole", "slide"] = "whole"  # whole image, or sliding windows (mmseg's slide_inference)
    crop_size: list[int] = field(default_factory=lambda: [512, 512])  # slide: window (h, w) (px)
    stride: list[int] = field(default_factory=lambda: [341, 341])     # slide: step (h, w) (px)
    scales: list[float] = field(default_factory=lambda: [1.0])        # multi-scale test: factors of data.scale
    flip: bool = False                       # also the mirrored image, probabilities averaged
    overlays: int = 4                        # PNG overlays of predictions on the first N validation images


@dataclass
class SegmentationConfig:
    # checked by runtime.config.load_config once every layer is applied (a ConfigError names the key)
    BOUNDS: ClassVar[dict[str, str]] = {
        "model.channels": ">= 1", "model.aux_channels": ">= 1", "model.aux_weight": ">= 0", "model.dropout": "[0, 1)",
        "model.output_stride": "{8, 16, 32}", "model.frozen_stages": ">= -1", "model.in_chans": ">= 1",
        "data.num_classes": ">= 1", "data.scale": "pair >= 1", "data.ratio_range": "ascending pair > 0",
        "data.crop_size": "pair >= 1",
        "data.cat_max_ratio": "(0, 1]", "data.hflip": "[0, 1]", "data.std": "> 0", "data.workers": ">= -1",
        "data.max_images": ">= 0",
        "optim.lr": "> 0", "optim.momentum": "[0, 1)", "optim.weight_decay": ">= 0", "optim.power": "> 0",
        "optim.min_lr": ">= 0", "optim.warmup_iters": ">= 0",
        "train.max_iter": ">= 1", "train.batch_size": ">= 1", "train.accum_steps": ">= 1", "train.seed": ">= 0",
        "train.log_every": ">= 1", "train.eval_every": ">= 0", "train.checkpoint_every": ">= 0",
        "train.max_nonfinite": ">= 1",
        "eval.crop_size": "pair >= 1", "eval.stride": "pair >= 1", "eval.scales": "nonempty > 0",
        "eval.overlays": ">= 0",
    }
    # (key, "<" or "<=", other key), also checked by check_bounds: sliding windows farther apart than their size
    # would leave pixels without a prediction
    RELATIONS: ClassVar[tuple[tuple[str, str, str], ...]] = (("eval.stride", "<=", "eval.crop_size"),)

    task: Literal["segmentation"] = "segmentation"
    engine: Literal["torch", "mmseg"] = "torch"  # torch: segmentation/train.py; mmseg: segmentation/mmseg_engine.py
    model: SegModelConfig = field(default_factory=SegModelConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    optim: SegOptimConfig = field(default_factory=SegOptimConfig)
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
    eval: SegEvalConfig = field(default_factory=SegEvalConfig)
    output_dir: str = "runs/segmentation/default"
