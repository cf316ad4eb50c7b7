"""Typed configuration of a classification run.

One dataclass per section; units are in the comments. YAML files in ``configs/classification`` fill
these in (``runtime.config.load_config``), dotted ``key=value`` overrides on the command line come last,
and every run writes the resolved config to ``<output_dir>/config.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional


REFERENCE_BATCH = 256  # optim.lr is per 256 images (the paper's linear scaling rule, §3.1)


@dataclass
class ModelConfig:
    name: str = "resnet50d"                 # registry name (backbones.list_backbones())
    in_chans: int = 3                       # input channels; 1 for grayscale
    weights: Optional[str] = None           # initial weights: .safetensors / .pth (suite, timm, torchvision)
    width_mult: float = 1.0                 # channel width multiplier (ResNet, MobileNet, Inception-V3); 1.0 = published shapes
    init: Literal["xavier", "kaiming"] = "xavier"  # conv/fc init (paper: Xavier)
    zero_init_last: bool = False            # zero-gamma: last BN of each residual block starts at 0
    norm_eval: bool = False                 # keep every BN in eval mode (fine-tuning with small batches)
    sync_bn: bool = False                   # convert BN to SyncBatchNorm under DDP
    channels_last: bool = True              # NHWC memory format for model and inputs
    kwargs: dict[str, Any] = field(default_factory=dict)  # further builder arguments, e.g. {stem_pool: false}


@dataclass
class DataConfig:
    name: Literal["imagenet", "fashion_mnist", "synthetic"] = "imagenet"
    root: str = "data/imagenet"             # imagenet: <root>/{train,val}/<class>/<img>; fashion_mnist: dir with the idx(.gz) files
    train_split: str = "train"
    val_split: str = "val"
    img_size: int = 224                     # train crop (px)
    val_resize: int = 256                   # val: resize short side to this (px) ...
    val_crop: int = 224                     # ... then center crop (px)
    val_hflip_tta: bool = False             # val: average the predictions of each image and its mirror image (TTA; not in the paper)
    val_translate_tta: int = 0              # val: also the image shifted diagonally by +-this many px (weights 1/2, 1/4, 1/4; airbench's TTA; not in the paper)
    min_area: float = 0.08                  # RandomResizedCrop smallest area fraction
    max_area: float = 1.0
    hflip: float = 0.5                      # horizontal flip probability
    translate: int = 0                      # random shift by up to this many px per axis, reflect-padded (not in the paper; airbench)
    brightness: float = 0.4                 # factor ~ U[1-b, 1+b]
    contrast: float = 0.4                   # factor ~ U[1-c, 1+c]
    saturation: float = 0.4                 # factor ~ U[1-s, 1+s]
    hue: float = 0.0                        # hue shift ~ U[-h, h] (fraction of the colour circle)
    lighting: float = 0.1                   # PCA lighting noise std (AlexNet eigen-decomposition); 0 = off
    # Random erasing (Zhong et al. 2017; timm's --reprob/--remode; not in the paper): with this probability a
    # training image gets one rectangle of erase_area (fraction of the image, uniform) and aspect ratio
    # log-uniform in [erase_aspect, 1/erase_aspect] filled after normalisation: "const" 0 (the mean colour),
    # "rand" one normal colour per image, "pixel" normal noise per pixel. 0 = off
    random_erase: float = 0.0
    erase_area: list[float] = field(default_factory=lambda: [0.02, 1 / 3])
    erase_aspect: float = 0.3
    erase_mode: Literal["const", "rand", "pixel"] = "pixel"
    mean: Optional[list[float]] = None      # None = the backbone's default (0-1 scale)
    std: Optional[list[float]] = None
    # "samples": per-image transforms in DataLoader workers; "tensor": the dataset in memory as uint8,
    # augmented per batch on the device (batch_transforms.py); "hybrid": per-image decode, crop and flip in
    # the workers, which ship uint8, then colour jitter, lighting and normalisation per batch on the device
    # (hue not supported); "auto": tensor for fashion_mnist, else samples.
    pipeline: Literal["auto", "samples", "tensor", "hybrid"] = "auto"
    workers: int = -1                       # DataLoader workers per process; -1 = from the CPU count (runtime.data.default_workers)
    skip_corrupt: bool = False              # True: skip unreadable images and report the count; False: error naming the file
    download: bool = False                  # fashion_mnist only: download if files are missing (needs internet)
    synthetic_size: int = 512               # synthetic only: number of train images (val = 1/4)
    num_classes: int = 0                    # 0 = from the dataset


@dataclass
class OptimConfig:
    lr: float = 0.1                         # learning rate per 256 images; scaled linearly by the global batch
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    no_bias_decay: bool = False             # biases and BN gamma/beta without weight decay
    schedule: Literal["step", "cosine"] = "step"
    milestones: list[float] = field(default_factory=lambda: [30, 60, 90])  # epochs (step schedule); fractions allowed
    gamma: float = 0.1                      # step decay factor
    warmup_epochs: float = 0.0              # linear warmup from 0, per iteration


@dataclass
class TrainConfig:
    epochs: int = 120
    batch_size: int = 256                   # per device (images)
    accum_steps: int = 1                    # gradient accumulation; global batch = batch_size * world * accum
    precision: Literal["fp32", "fp16", "bf16", "auto"] = "fp32"  # auto: fp16 on CUDA, bf16 on AMX / AMD AVX-512-BF16 CPUs, else fp32
    label_smoothing: float = 0.0            # epsilon of the paper (q_y = 1 - eps, others eps / (K - 1))
    mixup_alpha: float = 0.0                # lambda ~ Beta(alpha, alpha); 0 = off
    mixup_off_epochs: int = 0               # no mixup for the last N epochs
    seed: int = 0
    resume: Optional[str] = None            # None | "auto" (last checkpoint in output_dir) | path
    eval_every: int = 1                     # epochs between validations; 0 = only after the last epoch
    log_every: int = 20                     # iterations between log lines / JSONL records
    max_nonfinite: int = 20                 # stop after this many non-finite losses in a row
    max_steps: int = 0                      # >0: stop after this many optimizer steps (smoke tests, benchmarks)
    checkpoint_every: int = 0               # >0: also write last.pth every this many steps (inside an epoch); 0 = per epoch only
    compile: bool = False                   # torch.compile the model
    ema_decay: float = 0.0                  # >0: exponential moving average of the weights and BN statistics, updated every
                                            # step; evaluated and saved instead of the raw weights (not in the paper)


@dataclass
class DistillConfig:
    teacher: Optional[str] = None           # registry name of the teacher; None = no distillation
    teacher_weights: Optional[str] = None   # required when teacher is set
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)  # further builder arguments of the teacher, e.g. {width_mult: 0.25}
    temperature: float = 20.0               # T of the paper
    teacher_img_size: Optional[int] = None  # the teacher sees each (mixed) batch resized to this size (bilinear,
                                            # antialiased): a teacher trained at another resolution than the student;
                                            # None = the student's batch as it is


@dataclass
class Config:
    # checked by runtime.config.load_config once every layer is applied (a ConfigError names the key)
    BOUNDS: ClassVar[dict[str, str]] = {
        "model.in_chans": ">= 1", "model.width_mult": "> 0",
        "data.img_size": ">= 1", "data.val_resize": ">= 1", "data.val_crop": ">= 1", "data.val_translate_tta": ">= 0",
        "data.min_area": "(0, 1]", "data.max_area": "(0, 1]", "data.hflip": "[0, 1]", "data.translate": ">= 0",
        "data.brightness": ">= 0", "data.contrast": ">= 0", "data.saturation": ">= 0", "data.hue": "[0, 0.5]",
        "data.lighting": ">= 0",
        "data.random_erase": "[0, 1]", "data.erase_area": "ascending pair (0, 1]", "data.erase_aspect": "(0, 1]",
        "data.workers": ">= -1", "data.synthetic_size": ">= 1", "data.num_classes": ">= 0", "data.std": "> 0",
        "optim.lr": "> 0", "optim.momentum": "[0, 1)", "optim.weight_decay": ">= 0", "optim.gamma": "> 0",
        "optim.warmup_epochs": ">= 0", "optim.milestones": "ascending >= 0",
        "train.epochs": ">= 1", "train.batch_size": ">= 1", "train.accum_steps": ">= 1",
        "train.label_smoothing": "[0, 1)", "train.mixup_alpha": ">= 0", "train.mixup_off_epochs": ">= 0",
        "train.seed": ">= 0", "train.eval_every": ">= 0", "train.log_every": ">= 1", "train.max_nonfinite": ">= 1",
        "train.max_steps": ">= 0", "train.checkpoint_every": ">= 0", "train.ema_decay": "[0, 1)",
        "distill.temperature": "> 0", "distill.teacher_img_size": ">= 1",
    }
    # (key, "<" or "<=", other key), also checked by check_bounds
    RELATIONS: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("data.min_area", "<=", "data.max_area"), ("data.translate", "<", "data.img_size"),
        ("data.val_translate_tta", "<", "data.val_crop"), ("data.val_crop", "<=", "data.val_resize"),
    )

    task: Literal["classification"] = "classification"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    output_dir: str = "runs/classification"
