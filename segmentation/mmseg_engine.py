"""The mmsegmentation engine: mmseg's FCN-D8 recipe on a registry backbone, driven by mmengine's Runner.

mmsegmentation's own config ``fcn/fcn_r50-d8_4xb4-80k_ade20k-512x512.py`` (shipped in the wheel) is the
starting point; ``build_mmseg_config`` replaces its ResNetV1c by ``TricksBackbone`` (our
``backbones.create_backbone`` returning the ``(res2, res3, res4, res5)`` tuple mmseg's heads index) and
writes our ``SegmentationConfig`` into it: heads, data, SGD with linear lr scaling per 16 images, poly
decay, iterations, checkpoints, seed and AMP. mmengine then runs the loop, evaluation (mmseg's
``IoUMetric``) and resume; there is no second copy of its trainer here.

This is the only module of the suite that imports mmseg / mmengine / mmcv, and only inside functions::

    metrics = train(cfg)                      # {"mIoU", "mAcc", "aAcc"} in percent
    metrics = evaluate(cfg, "runs/.../iter_80000.pth")
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import pickle
import sys
import types
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from backbones import create_backbone
from runtime.config import ConfigError, check_bounds, dump_config
from runtime.data import default_workers, normalization
from runtime.distributed import init_distributed, world_size
from runtime.errors import CheckpointError, UserPathError, one_line
from runtime.precision import resolve_precision
from runtime.schedules import scale_lr, schedule_for_batch
from runtime.strict import check_fits

from .ade20k import ADE20K, palette
from .config import REFERENCE_BATCH, SegmentationConfig

log = logging.getLogger("segmentation")

INSTALL_HINT = "install it with `pip install -e '.[segmentation]'` (or `bash scripts/setup.sh`)"
# The recipe this engine follows, relative to the mmsegmentation wheel's ``.mim/configs`` folder.
BASE_RECIPE = "fcn/fcn_r50-d8_4xb4-80k_ade20k-512x512.py"
ADE20K_NUM_CLASSES = 150
FEATURE_NAMES = ("res2", "res3", "res4", "res5")


# ---------------------------------------------------------------------------------------------- imports
class _MissingOps(types.ModuleType):
    """Stand-in for mmcv's compiled ``mmcv._ext`` (absent from mmcv-lite): every op exists as a name, so
    ``mmcv.utils.ext_loader`` accepts the module, but raises when called. The dilated FCN calls none."""

    def __getattr__(self, name: str):
        if name.startswith("__"):  # importlib and pickle probe dunders; they must stay missing
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise NotImplementedError(
                f"mmcv op {name!r} needs mmcv's compiled extension, which mmcv-lite lacks. Use a model without "
                "it (the FCN recipe needs none) or build mmcv with ops (see DEPENDENCIES.md, 'Full' route).")

        return missing


def _install_ops_stand_in() -> None:
    if "mmcv._ext" in sys.modules or importlib.util.find_spec("mmcv._ext") is not None:
        return  # a real mmcv build with ops, or the stand-in already
    stand_in = _MissingOps("mmcv._ext")
    # A spec with no loader: mmengine's mmcv_full_available() then (correctly) reports no compiled ops.
    stand_in.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)
    sys.modules["mmcv._ext"] = stand_in


def import_mmseg() -> types.SimpleNamespace:
    """Import mmsegmentation, mmengine and mmcv (installing the ``mmcv._ext`` stand-in when mmcv has no
    compiled ops) and return them as ``.mmseg``, ``.mmengine``, ``.mmcv``.

    Raises ImportError naming the install command when one of them is missing.
    """
    try:
        import mmcv
        import mmengine
    except ImportError as e:
        raise ImportError(f"the mmseg engine needs mmengine and mmcv ({e}): {INSTALL_HINT}") from e
    _install_ops_stand_in()
    try:
        import mmseg
        import mmseg.datasets  # noqa: F401  the registries fill as these packages import
        import mmseg.evaluation  # noqa: F401
        import mmseg.models  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the mmseg engine needs mmsegmentation 1.2.2 ({e}): {INSTALL_HINT}") from e
    return types.SimpleNamespace(mmseg=mmseg, mmengine=mmengine, mmcv=mmcv)


# ---------------------------------------------------------------------------------------------- backbone
class TricksBackbone(nn.Module):
    """A registry backbone as an mmseg backbone: ``forward(x)`` returns the tuple of feature maps
    ``out_indices`` selects from ``("res2", "res3", "res4", "res5")``; mmseg heads pick one by ``in_index``
    (FCN-D8: 3 = res5 for the decode head, 2 = res4 for the auxiliary head, as with ResNetV1c).

    ``weights`` (our ``model.safetensors``, timm or torchvision files) are loaded here, at build time;
    the module has no ``init_weights``, so mmengine's initialisation leaves them alone.
    """

    def __init__(self, name: str, weights: Optional[str] = None, output_stride: int = 8, frozen_stages: int = -1,
                 norm_eval: bool = False, in_chans: int = 3, out_indices: Sequence[int] = (0, 1, 2, 3),
                 norm_layer: Optional[str] = None, channels_last: bool = False, **kwargs: Any):
        super().__init__()
        self.body = create_backbone(name, weights=weights, num_classes=0, in_chans=in_chans, new_head=True, adapt_input=True,
                                    output_stride=output_stride, frozen_stages=frozen_stages,
                                    norm_layer=norm_layer, norm_eval=norm_eval, **kwargs)
        infos = {f.name: f for f in self.body.feature_info}
        self.out_names = [FEATURE_NAMES[i] for i in out_indices]
        missing = [n for n in self.out_names if n not in infos]
        if missing:
            raise ValueError(f"backbone {name!r} has no feature {missing}: it declares {sorted(infos)}")
        self.feature_info = [infos[n] for n in self.out_names]
        self.channels_last = channels_last
        if channels_last:
            self.body.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.body.forward_features(x)
        return tuple(features[n] for n in self.out_names)


def register_modules() -> types.SimpleNamespace:
    """Import mmseg (``import_mmseg``) and register ``TricksBackbone`` in its MODELS, the optimizer wrappers
    with the suite's non-finite policy (``_optim_wrapper_classes``) in its OPTIM_WRAPPERS and the
    per-optimizer-step schedule hook in its HOOKS. Idempotent: a second call re-registers the same classes."""
    mm = import_mmseg()
    from mmseg.registry import HOOKS, MODELS, OPTIM_WRAPPERS
    MODELS.register_module(name="TricksBackbone", module=TricksBackbone, force=True)
    for name, wrapper in _optim_wrapper_classes().items():
        OPTIM_WRAPPERS.register_module(name=name, module=wrapper, force=True)
    HOOKS.register_module(name="OptimizerStepParamSchedulerHook", module=_scheduler_hook_class(), force=True)
    return mm


_OPTIM_WRAPPERS: dict[str, type] = {}
_SCHEDULER_HOOK: Optional[type] = None


def _optim_wrapper_classes() -> dict[str, type]:
    """``{registered name: class}``: mmengine's ``OptimWrapper`` and ``AmpOptimWrapper`` and a CPU bf16
    wrapper, each with the suite's non-finite policy (``runtime.step``). Built once, on first use (mmengine
    is imported lazily).

    The policy, as in the torch engine: a step (``accumulative_counts`` micro-batches) in which any
    micro-batch's loss is not finite on any rank is skipped on every rank (gradients dropped, no update;
    the schedule still advances), and ``max_nonfinite`` skipped steps in a row raise ``TrainingDiverged``
    inside the step, before the checkpoint hook runs: the last checkpoint stays the last good one.
    mmengine's own wrappers would step an fp32 run on NaN gradients to the end. The finiteness check is
    one scalar per micro-batch; mmengine reads every loss on the host for its log anyway.
    """
    if _OPTIM_WRAPPERS:
        return _OPTIM_WRAPPERS
    from mmengine.optim import AmpOptimWrapper, OptimWrapper

    from runtime.distributed import all_reduce_min
    from runtime.step import TrainingDiverged

    class NonFinitePolicy:
        def __init__(self, *args, max_nonfinite: int = 20, **kwargs):
            super().__init__(*args, **kwargs)
            if max_nonfinite < 1:
                raise ConfigError(f"train.max_nonfinite must be >= 1, got {max_nonfinite}")
            self.max_nonfinite, self.nonfinite_streak, self._step_finite = max_nonfinite, 0, True

        def update_params(self, loss: Tensor, step_kwargs: Optional[dict] = None,
                          zero_kwargs: Optional[dict] = None) -> None:
            # backward even when non-finite: under DDP every rank must take part in the gradient all-reduce
            self._step_finite &= bool(all_reduce_min(torch.isfinite(loss.detach()).float()).item())
            self.backward(self.scale_loss(loss))
            if not self.should_update():
                return
            if self._step_finite:
                self.step(**(step_kwargs or {}))
                self.nonfinite_streak = 0
            else:
                self.nonfinite_streak += 1
                log.warning("non-finite loss: optimizer step skipped (%d in a row; train.max_nonfinite=%d)",
                            self.nonfinite_streak, self.max_nonfinite)
            self.zero_grad(**(zero_kwargs or {}))
            self._step_finite = True
            if self.nonfinite_streak >= self.max_nonfinite:
                raise TrainingDiverged(
                    f"the loss was non-finite for {self.nonfinite_streak} steps in a row; stopped before the "
                    "checkpoint of this iteration, so the work dir's last checkpoint is the last good one. "
                    "Lower optim.lr, lengthen the warm-up, or train in fp32")

    class TricksOptimWrapper(NonFinitePolicy, OptimWrapper):
        """mmengine's OptimWrapper with the suite's non-finite policy."""

    class TricksAmpOptimWrapper(NonFinitePolicy, AmpOptimWrapper):
        """mmengine's AmpOptimWrapper (CUDA fp16/bf16) with the suite's non-finite policy."""

    class CPUAutocastOptimWrapper(TricksOptimWrapper):
        """Forward and loss under CPU bf16 autocast. mmengine's AmpOptimWrapper refuses to run without a
        GPU, yet bf16 autocast is the fast way to train on a CPU with AMX or an AMD CPU with AVX-512-BF16
        (0.52-0.72x fp32's time per step: benchmarks/results/step_settings_amd/); on other CPUs it can be
        slower than fp32 (benchmarks/results/step_settings.md: 1.5x slower on an AVX-512-BF16 Xeon without
        AMX). bf16 keeps fp32's exponent range, so no loss scaling is needed."""

        @contextlib.contextmanager
        def optim_context(self, model: nn.Module):
            with super().optim_context(model), torch.autocast("cpu", dtype=torch.bfloat16):
                yield

    _OPTIM_WRAPPERS.update(TricksOptimWrapper=TricksOptimWrapper, TricksAmpOptimWrapper=TricksAmpOptimWrapper,
                           CPUAutocastOptimWrapper=CPUAutocastOptimWrapper)
    return _OPTIM_WRAPPERS


def _scheduler_hook_class() -> type:
    """mmengine's ParamSchedulerHook stepping the iteration-based schedules once per optimizer step.

    mmengine counts a micro-batch as an iteration (``accumulative_counts`` of them per optimizer step) and
    its hook steps the schedules after each one; ``train.max_iter``, ``optim.warmup_iters`` and the poly
    span count optimizer steps, as in the torch engine. So the loop's ``max_iters`` and the intervals are
    scaled by ``train.accum_steps`` (``build_mmseg_config``) and the schedules advance only after the
    iterations that ended with an update: the same lr at every optimizer step as ``runtime.schedules``.
    """
    global _SCHEDULER_HOOK
    if _SCHEDULER_HOOK is None:
        from mmengine.hooks import ParamSchedulerHook

        class OptimizerStepParamSchedulerHook(ParamSchedulerHook):
            def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
                if runner.optim_wrapper.should_update():  # this iteration ended with an optimizer step
                    super().after_train_iter(runner, batch_idx, data_batch, outputs)

        _SCHEDULER_HOOK = OptimizerStepParamSchedulerHook
    return _SCHEDULER_HOOK


# ---------------------------------------------------------------------------------------------- config
def _data_root(root: str) -> str:
    # As segmentation.ade20k: the ADEChallengeData2016 folder or its parent.
    nested = Path(root) / "ADEChallengeData2016"
    return str(nested if nested.is_dir() else Path(root))


def _class_names(cfg: SegmentationConfig) -> Optional[list[str]]:
    names = cfg.data.class_names
    if names is not None and len(names) != cfg.data.num_classes:
        raise ConfigError(f"data.class_names has {len(names)} names but data.num_classes is {cfg.data.num_classes}: "
                          "give one name per class")
    if cfg.data.num_classes == ADE20K_NUM_CLASSES and names is None:
        return None  # ADE20KDataset's own names and palette
    return list(names) if names is not None else [f"class_{i}" for i in range(cfg.data.num_classes)]


def check_data(cfg: SegmentationConfig) -> None:
    """Before the first iteration: class names against ``data.num_classes``, both splits' images and masks
    decoded and checked in worker processes (``segmentation.ade20k.ADE20K(check=True)``)."""
    _class_names(cfg)
    d = cfg.data
    for split in (d.train_split, d.val_split):
        ADE20K(d.root, split, num_classes=d.num_classes, reduce_zero_label=d.reduce_zero_label,
               max_images=d.max_images, check=True)


def _dataset(cfg: SegmentationConfig, split: str, pipeline: list[dict]) -> dict:
    names = _class_names(cfg)
    d = cfg.data
    # The split's one image extension (check_data has read the split before training); a config built
    # without its data (to inspect it) names ADE20K's .jpg.
    images = Path(_data_root(d.root)) / "images" / split
    suffix = ADE20K(d.root, split, num_classes=d.num_classes,
                    reduce_zero_label=d.reduce_zero_label).image_suffix() if images.is_dir() else ".jpg"
    common = dict(data_root=_data_root(cfg.data.root), pipeline=pipeline, reduce_zero_label=cfg.data.reduce_zero_label,
                  data_prefix=dict(img_path=f"images/{split}", seg_map_path=f"annotations/{split}"),
                  img_suffix=suffix)
    if cfg.data.max_images > 0:
        common["indices"] = cfg.data.max_images
    if names is None:
        return dict(type="ADE20KDataset", **common)
    # ADE20KDataset maps any other class list onto a subset of its 150 names (and refuses unknown names), so
    # another dataset in the ADE20K layout uses the base class with the same file suffixes and its own classes.
    # The palette is fixed (seeded, the torch engine's), as mmseg draws one for classes without colours.
    return dict(type="BaseSegDataset", seg_map_suffix=".png",
                metainfo=dict(classes=tuple(names), palette=palette(len(names)).tolist()), **common)


def _workers(cfg: SegmentationConfig) -> int:
    return default_workers(cfg.data.workers)  # -1: from the CPUs per process, as the torch engine


def _loader(cfg: SegmentationConfig, base: dict, dataset: dict, batch_size: int) -> dict:
    workers = _workers(cfg)
    return {**base, "batch_size": batch_size, "num_workers": workers, "persistent_workers": workers > 0,
            "dataset": dataset}


def _optim_wrapper(cfg: SegmentationConfig, lr: float, on_cuda: bool) -> dict:
    wrapper = dict(type="TricksOptimWrapper", clip_grad=None, accumulative_counts=cfg.train.accum_steps,
                   max_nonfinite=cfg.train.max_nonfinite,
                   optimizer=dict(type="SGD", lr=lr, momentum=cfg.optim.momentum,
                                  weight_decay=cfg.optim.weight_decay))
    if cfg.optim.no_bias_decay:  # the paper's rule: biases and norm-layer parameters get no weight decay
        wrapper["paramwise_cfg"] = dict(bias_decay_mult=0.0, norm_decay_mult=0.0)
    device = torch.device("cuda" if on_cuda else "cpu")
    precision = resolve_precision(cfg.train.precision, device)
    if precision == "bf16" and cfg.train.precision == "auto":  # auto looks at the network (depthwise convs: fp32)
        with torch.device("meta"):  # its structure only: no memory, no weights
            backbone = create_backbone(cfg.model.backbone, num_classes=0, in_chans=cfg.model.in_chans,
                                       output_stride=cfg.model.output_stride, **cfg.model.kwargs)
        precision = resolve_precision(cfg.train.precision, device, backbone)
    if precision == "fp16":
        if not on_cuda:
            raise ConfigError("train.precision=fp16 needs a GPU (mmengine's AmpOptimWrapper); on a CPU use bf16 or fp32")
        wrapper.update(type="TricksAmpOptimWrapper", loss_scale="dynamic")
    elif precision == "bf16":
        wrapper.update(type="TricksAmpOptimWrapper", dtype="bfloat16") if on_cuda else wrapper.update(
            type="CPUAutocastOptimWrapper")
    return wrapper


def build_mmseg_config(cfg: SegmentationConfig):
    """mmseg's ``fcn_r50-d8_4xb4-80k_ade20k-512x512`` recipe as an ``mmengine.Config``, with ``cfg`` written in.

    The model's backbone becomes ``TricksBackbone(cfg.model.backbone, ...)``; head widths, classes,
    dropout and the auxiliary loss weight (0 = no auxiliary head) come from ``cfg.model``; normalisation
    is mmseg's SyncBN under DDP on CUDA with ``model.sync_bn``, BN otherwise. Image mean/std are
    ``data.mean``/``data.std`` (or the backbone's default) times 255, mmseg's pixel scale. SGD's lr and
    the poly schedule's floor are per 16 images, scaled by the global batch (batch_size x world x accum).
    """
    mm = register_modules()
    Config = mm.mmengine.Config
    if cfg.eval.flip or list(cfg.eval.scales) != [1.0]:
        raise ConfigError("eval.flip / eval.scales (test-time augmentation) are not wired into the mmseg engine; "
                         "use eval.flip=false eval.scales=[1.0], or engine=torch")
    if cfg.data.photometric_on == "device":
        raise ConfigError("data.photometric_on=device is the torch engine's: mmseg's pipeline distorts colours in its "
                         "loader workers; use data.photometric_on=auto, or engine=torch")
    if cfg.model.head != "fcn":
        raise ConfigError(f"model.head={cfg.model.head!r} is the torch engine's head; the mmseg engine runs mmseg's "
                         "FCNHead: set model.head=fcn")
    recipe = Path(mm.mmseg.__file__).parent / ".mim" / "configs" / BASE_RECIPE
    if not recipe.is_file():
        raise FileNotFoundError(f"{recipe} not found: the mmsegmentation wheel ships its configs there; "
                                f"reinstall it: {INSTALL_HINT}")
    mc = Config.fromfile(str(recipe))
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train

    world = world_size()
    on_cuda = torch.cuda.is_available()
    sync_bn = m.sync_bn and world > 1 and on_cuda
    norm_cfg = dict(type="SyncBN" if sync_bn else "BN", requires_grad=True)

    # Channels and the default normalisation, read from a parameter-less (meta device) copy of the backbone.
    mean, std = normalization(d.mean, d.std, m.backbone, m.in_chans, m.kwargs, weights=m.weights)  # first: names a bad key
    with torch.device("meta"):
        probe = create_backbone(m.backbone, num_classes=0, in_chans=m.in_chans, output_stride=m.output_stride,
                                **m.kwargs)
    channels = {f.name: f.channels for f in probe.feature_info}
    crop = tuple(d.crop_size)

    preprocessor = dict(mc.data_preprocessor, size=crop, mean=[255 * v for v in mean], std=[255 * v for v in std])
    mc.data_preprocessor = preprocessor
    mc.model.data_preprocessor = preprocessor
    mc.model.pretrained = None  # ResNetV1c's ImageNet download; our weights load inside TricksBackbone
    mc.model.backbone = dict(type="TricksBackbone", name=m.backbone, weights=m.weights, output_stride=m.output_stride,
                             frozen_stages=m.frozen_stages, norm_eval=False, in_chans=m.in_chans,
                             out_indices=(0, 1, 2, 3), norm_layer="syncbatchnorm" if sync_bn else None,
                             channels_last=m.channels_last, **m.kwargs)
    mc.norm_cfg, mc.crop_size, mc.data_root = norm_cfg, crop, _data_root(d.root)  # the recipe's own variables
    mc.model.decode_head.update(in_channels=channels["res5"], in_index=3, channels=m.channels,
                                num_classes=d.num_classes, dropout_ratio=m.dropout, norm_cfg=norm_cfg)
    if m.aux_weight > 0:
        mc.model.auxiliary_head.update(in_channels=channels["res4"], in_index=2, channels=m.aux_channels,
                                       num_classes=d.num_classes, dropout_ratio=m.dropout, norm_cfg=norm_cfg)
        mc.model.auxiliary_head.loss_decode.loss_weight = m.aux_weight
    else:
        mc.model.auxiliary_head = None
    if cfg.eval.mode == "slide":
        mc.model.test_cfg = dict(mode="slide", crop_size=tuple(cfg.eval.crop_size), stride=tuple(cfg.eval.stride))
    else:
        mc.model.test_cfg = dict(mode="whole")

    train_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations"),  # reduce_zero_label: from the dataset
        dict(type="RandomResize", scale=tuple(d.scale), ratio_range=tuple(d.ratio_range), keep_ratio=True),
        dict(type="RandomCrop", crop_size=crop, cat_max_ratio=d.cat_max_ratio),
        dict(type="RandomFlip", prob=d.hflip),
        *([dict(type="PhotoMetricDistortion")] if d.photometric else []),
        dict(type="PackSegInputs"),
    ]
    test_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=tuple(d.scale), keep_ratio=True),
        dict(type="LoadAnnotations"),  # reduce_zero_label: from the dataset
        dict(type="PackSegInputs"),
    ]
    mc.train_pipeline, mc.test_pipeline = train_pipeline, test_pipeline
    mc.train_dataloader = _loader(cfg, mc.train_dataloader, _dataset(cfg, d.train_split, train_pipeline), t.batch_size)
    mc.val_dataloader = _loader(cfg, mc.val_dataloader, _dataset(cfg, d.val_split, test_pipeline), 1)
    mc.test_dataloader = mc.val_dataloader
    mc.val_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"], ignore_index=255)
    mc.test_evaluator = mc.val_evaluator

    global_batch = t.batch_size * world * t.accum_steps
    lr, min_lr = scale_lr(o.lr, global_batch, REFERENCE_BATCH), scale_lr(o.min_lr, global_batch, REFERENCE_BATCH)
    mc.optimizer = dict(type="SGD", lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    mc.optim_wrapper = _optim_wrapper(cfg, lr, on_cuda)
    # The schedules count optimizer steps (OptimizerStepParamSchedulerHook); mmengine's loop counts
    # micro-batches, accum_steps per optimizer step: its max_iters and intervals are scaled by accum_steps.
    poly = dict(type="PolyLR", eta_min=min_lr, power=o.power, begin=o.warmup_iters, end=t.max_iter, by_epoch=False)
    # runtime.schedules' warm-up: lr * s / warmup_iters at step s, reaching lr where poly begins. mmengine's
    # LinearLR reaches end_factor at step end - begin - 1 (with end = warmup_iters it would stop one step
    # short, and the chained PolyLR would decay from there): its end is one step later; at that step it
    # sets the full lr and PolyLR (begin = warmup_iters) starts from it. start_factor > 0: mmengine's rule.
    warmup = [dict(type="LinearLR", start_factor=1e-6, begin=0, end=o.warmup_iters + 1, by_epoch=False)] \
        if o.warmup_iters > 0 else []
    mc.param_scheduler = [*warmup, poly]
    k = t.accum_steps
    mc.train_cfg = dict(type="IterBasedTrainLoop", max_iters=t.max_iter * k,
                        val_interval=(t.eval_every if t.eval_every > 0 else t.max_iter) * k)
    mc.default_hooks.param_scheduler = dict(type="OptimizerStepParamSchedulerHook")
    mc.default_hooks.checkpoint.update(by_epoch=False, interval=t.checkpoint_every * k, save_last=True)
    mc.default_hooks.logger.interval = t.log_every * k
    mc.randomness = dict(seed=t.seed)
    if t.compile:
        mc.compile = True  # mmengine's Runner: torch.compile of the model's train_step (evaluation stays eager)
    mc.env_cfg.dist_cfg = dict(backend="nccl" if on_cuda else "gloo")
    mc.launcher = "pytorch" if world > 1 else "none"
    if world > 1 and not on_cuda:
        # mmengine's default wrapper passes device_ids=[LOCAL_RANK], which DDP refuses for a CPU module;
        # under gloo on CPUs it runs with none (otherwise mmengine's defaults).
        mc.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False,
                                    find_unused_parameters=False)
    mc.work_dir = cfg.output_dir
    # The visualizer (which writes the run's scalars.json) is a process-wide singleton looked up by name; the
    # recipe's fixed name would make a second run in the same process log into the first run's folder.
    # Without it, the Runner names it after the run (config name + timestamp).
    mc.visualizer.pop("name", None)
    mc.resume, mc.load_from = _resume(cfg)
    return mc


def _resume(cfg: SegmentationConfig) -> tuple[bool, Optional[str]]:
    """(resume, load_from) for mmengine: ``auto`` = the work dir's last checkpoint, if any."""
    resume = cfg.train.resume
    if resume is None:
        return False, None
    if resume == "auto":
        return True, None  # mmengine finds <work_dir>/last_checkpoint itself (and starts afresh without it)
    if not Path(resume).is_file():
        raise UserPathError(f"train.resume={resume!r}: no such checkpoint (use 'auto' or a .pth of this engine)")
    return True, resume


# ---------------------------------------------------------------------------------------------- checkpoints
@contextlib.contextmanager
def _trusted_checkpoints(*trusted: str | os.PathLike | None):
    """Let mmengine load its own checkpoints (in or below the ``trusted`` folders / files) on torch>=2.6.

    torch>=2.6 ``torch.load`` is weights_only by default and refuses mmengine's checkpoints ("Unsupported
    global ... HistoryBuffer"). Allow-listing globals is no fix: a HistoryBuffer pickles bound methods through
    ``builtins.getattr``, which would open weights_only loading to arbitrary calls. So, while this context is
    active, mmengine's local-file loader passes ``weights_only=False`` for the run's own files (its work dir,
    the checkpoint the caller named) and keeps torch's default for every other file. torch.load itself and
    every other caller are untouched.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    roots = [Path(t).resolve() for t in trusted if t is not None]
    default_loader = CheckpointLoader._schemes[""]

    def load_from_local_run(filename, map_location):  # mmengine logs the name after "load_from_"
        path = Path(os.path.expanduser(filename)).resolve()
        if not any(path == root or root in path.parents for root in roots):
            return default_loader(filename, map_location)
        if not path.is_file():
            raise FileNotFoundError(f"{filename} can not be found.")
        return torch.load(path, map_location=map_location, weights_only=False)

    CheckpointLoader.register_scheme("", load_from_local_run, force=True)
    try:
        yield
    finally:
        CheckpointLoader.register_scheme("", default_loader, force=True)


# ---------------------------------------------------------------------------------------------- runs
def _runner(cfg: SegmentationConfig):
    """mmengine's Runner for ``cfg`` and a hook that keeps the last validation metrics."""
    mc = build_mmseg_config(cfg)
    if mc.launcher == "pytorch" and not torch.cuda.is_available():
        # mmengine's init_dist calls torch.cuda.set_device whatever the backend; on CPUs the group is joined
        # here (gloo), and the Runner, finding it initialised, uses it.
        init_distributed("cpu")
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    class LastMetrics(Hook):
        priority = "LOWEST"

        def __init__(self):
            self.metrics: Optional[dict] = None

        def after_val_epoch(self, runner, metrics=None):
            self.metrics = dict(metrics or {})

        def after_test_epoch(self, runner, metrics=None):
            self.metrics = dict(metrics or {})

    runner = Runner.from_cfg(mc)
    recorder = LastMetrics()
    runner.register_hook(recorder)
    return runner, recorder


def _summary(metrics: dict) -> dict[str, float]:
    missing = [k for k in ("mIoU", "mAcc", "aAcc") if k not in metrics]
    if missing:
        raise RuntimeError(f"mmseg's evaluation returned {sorted(metrics)}, without {missing}")
    # IoUMetric rounds to 0.01 (percent).
    return {k: float(metrics[k]) for k in ("mIoU", "mAcc", "aAcc")}


def train(cfg: SegmentationConfig) -> dict[str, float]:
    """Train with mmengine's Runner and return the final validation ``{"mIoU", "mAcc", "aAcc"}`` (percent).

    Writes ``<output_dir>/config.yaml`` (our config) and mmengine's work dir: ``iter_N.pth`` checkpoints,
    ``last_checkpoint``, logs and its resolved config. ``train.resume`` = ``auto`` (the work dir's last
    checkpoint) or a checkpoint path continues at its saved iteration; a finished run is only evaluated.
    """
    if cfg.engine != "mmseg":
        raise ValueError(f"engine={cfg.engine!r}: the mmseg engine runs configs with engine: mmseg")
    check_bounds(cfg)
    check_data(cfg)  # both splits, before mmengine builds anything
    train_images = len(ADE20K(cfg.data.root, cfg.data.train_split, max_images=cfg.data.max_images))
    recipe = cfg  # config.yaml keeps the recipe's numbers
    cfg = schedule_for_batch(cfg, cfg.train.batch_size * world_size() * cfg.train.accum_steps, REFERENCE_BATCH,
                             train_images)  # train.scale_schedule
    runner, recorder = _runner(cfg)  # joins the process group under torchrun
    from mmengine.dist import is_main_process
    if is_main_process():
        dump_config(recipe, Path(cfg.output_dir) / "config.yaml")
    with _trusted_checkpoints(cfg.output_dir, _resume(cfg)[1]):
        runner.train()
        if recorder.metrics is None:  # resumed at max_iter: no iteration ran, so no validation either
            runner.val()
    return _summary(recorder.metrics)


# The torch engine's FCN (segmentation/model.py) and mmseg's EncoderDecoder around TricksBackbone hold the
# same modules under other names; the heads' own names are mmseg's (tested equal).
TORCH_TO_MMSEG = (("backbone.", "backbone.body."), ("classifier.", "decode_head."),
                  ("aux_classifier.", "auxiliary_head."))


def torch_engine_state_to_mmseg(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A torch-engine FCN state dict (``model_final.pth`` or ``last.pth["model"]``) renamed for mmseg's
    EncoderDecoder with ``TricksBackbone``: the same weights, evaluated by the other engine."""
    renamed = {}
    for key, value in state.items():
        prefix = next((p for p in TORCH_TO_MMSEG if key.startswith(p[0])), None)
        if prefix is None:
            raise KeyError(f"{key!r}: not a torch-engine FCN key (expected one of "
                           f"{', '.join(p for p, _ in TORCH_TO_MMSEG)})")
        renamed[prefix[1] + key[len(prefix[0]):]] = value
    return renamed


def _torch_engine_state(path: Path) -> Optional[dict[str, Tensor]]:
    """The FCN state dict of a torch-engine file (plain tensors: loadable with weights_only=True, FCN key
    names), or None for anything else (mmengine's checkpoints hold HistoryBuffers: not weights-only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    state = state.get("model", state) if isinstance(state, dict) else state
    return state if isinstance(state, dict) and any(k.startswith("classifier.") for k in state) else None


def evaluate(cfg: SegmentationConfig, checkpoint: str) -> dict[str, float]:
    """``{"mIoU", "mAcc", "aAcc"}`` (percent) of ``checkpoint`` on ``data.val_split`` through mmengine's test loop.

    ``checkpoint``: one this engine wrote (mmengine's ``iter_N.pth``: EncoderDecoder with ``TricksBackbone``),
    or the torch engine's ``model_final.pth`` / ``last.pth`` of the same model (renamed by
    ``torch_engine_state_to_mmseg``): both are loaded strictly.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise UserPathError(f"checkpoint {checkpoint!r} not found")
    # Without resume (and load_from), Runner.test() loads nothing itself: the strict load here is the only one.
    runner, recorder = _runner(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=None)))
    state = _torch_engine_state(path)
    what = f"the mmseg engine's FCN ({cfg.model.backbone}, {cfg.data.num_classes} classes)"
    if state is not None:
        from mmengine.model import is_model_wrapper
        # under torchrun the Runner has wrapped the model in DDP: the weights load into the module inside
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        state = torch_engine_state_to_mmseg(state)
        check_fits(model, state, path, what)
        model.load_state_dict(state, strict=True)
        metrics = runner.test()
    else:
        with _trusted_checkpoints(cfg.output_dir, checkpoint):
            try:
                runner.load_checkpoint(str(checkpoint), strict=True)
            except (RuntimeError, KeyError, ValueError, OSError, EOFError, pickle.UnpicklingError) as e:
                # mmengine's strict load (keys or shapes differ), or a file that is no checkpoint at all
                raise CheckpointError(f"checkpoint {path} cannot be loaded into {what}: {one_line(e)}; evaluate it "
                                      "with the config (engine, model, classes) it was trained with") from None
            metrics = runner.test()
    return _summary(metrics if metrics else recorder.metrics)
