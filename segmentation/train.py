"""The plain-PyTorch segmentation engine: dilated FCN on a registry backbone, trained on a dataset in the
ADE20K layout and evaluated with mmseg's mIoU/mAcc/aAcc, top to bottom.

``train(cfg)`` is one readable function in the shape of the classification trainer, iteration-based as
mmseg runs it: set-up (devices, data, model, SGD, poly schedule, AMP, DDP, resume) once, then the loop.
Linear lr scaling per 16 images (``runtime.schedules.scale_lr``), poly decay per iteration, AMP,
SyncBN under DDP on CUDA, atomic checkpoints, and ``train.resume=auto`` that continues exactly (model,
optimizer, schedule, scaler, non-finite streak, every rank's RNG, the batch inside the epoch).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from runtime.checkpoint import (gather_rng_states, load_training_checkpoint, resolve_resume, restore_rng_states,
                                restore_training_state, save_checkpoint, training_state)
from runtime.config import ConfigError, check_bounds, dump_config, to_dict
from runtime.data import EpochStream, SeededDataset, SeededSampler, SkipBatches, default_workers
from runtime.data import normalization as resolve_normalization
from runtime.distributed import DistInfo, ShardSampler, all_reduce_sum, cleanup_distributed, init_distributed
from runtime.logger import LossMeter, Progress, RunLogger, plot_run
from runtime.optim import build_optimizer
from runtime.precision import autocast_for, cudnn_benchmark_off, memory_format_for, setup_precision
from runtime.schedules import build_scheduler, scale_lr, schedule_for_batch
from runtime.step import OptimizerStep, TrainingDiverged
from runtime.strict import check_fits, load_model_strictly

from .ade20k import ADE20K, IGNORE_INDEX, palette
from .config import REFERENCE_BATCH, SegmentationConfig
from .inference import predict
from .metrics import SegmentationMetric
from .model import FCN, build_fcn
from .transforms import (SpatialSteps, build_eval_transform, draw_photometric_params, pad_batch,
                         photometric_distortion_batch)

log = logging.getLogger("segmentation")


__all__ = ["train", "evaluate", "evaluate_checkpoint", "build_model", "TrainingDiverged", "REFERENCE_BATCH"]


# ---- pieces ---------------------------------------------------------------------------------------------

def build_model(cfg: SegmentationConfig, dist_info: Optional[DistInfo] = None, pretrained: bool = True) -> FCN:
    """The FCN of ``cfg.model`` (backbone weights loaded unless ``pretrained=False``); SyncBN when the
    run is DDP on CUDA and ``model.sync_bn`` (torch's SyncBatchNorm has no CPU kernel: BN there)."""
    m = cfg.model
    sync = m.sync_bn and dist_info is not None and dist_info.distributed and dist_info.device.type == "cuda"
    return build_fcn(m.backbone, cfg.data.num_classes, weights=m.weights if pretrained else None, head=m.head,
                     channels=m.channels, aux_channels=m.aux_channels, aux=m.aux_weight > 0, dropout=m.dropout,
                     output_stride=m.output_stride, frozen_stages=m.frozen_stages,
                     norm_layer="syncbatchnorm" if sync else None, in_chans=m.in_chans, **m.kwargs)


def normalization(cfg: SegmentationConfig) -> tuple[list[float], list[float]]:
    """``data.mean``/``data.std`` (0-1 scale), or those ``model.weights`` were trained with, or the backbone's
    defaults (``runtime.data.normalization``)."""
    return resolve_normalization(cfg.data.mean, cfg.data.std, cfg.model.backbone, cfg.model.in_chans,
                                 cfg.model.kwargs, weights=cfg.model.weights)


class Normalize(nn.Module):
    """uint8 images [N, C, H, W] -> float ``(x / 255 - mean) / std`` on the device (the workers ship uint8:
    a quarter of float32's bytes). With ``sizes`` ([N, 2], each image's (height, width) before
    ``transforms.pad_batch`` padded it), everything outside an image's own size is set to 0 after
    normalising: the mean colour, as mmseg's ``SegDataPreProcessor`` pads."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor, sizes: Optional[Tensor] = None) -> Tensor:
        x = (images.float() / 255 - self.mean) / self.std
        if sizes is None:
            return x
        sizes = sizes.to(x.device, non_blocking=True)
        rows = torch.arange(x.shape[-2], device=x.device) < sizes[:, :1]  # [N, H]
        cols = torch.arange(x.shape[-1], device=x.device) < sizes[:, 1:]  # [N, W]
        return x * (rows[:, None, :, None] & cols[:, None, None, :])


def class_names(cfg: SegmentationConfig) -> list[str]:
    names = cfg.data.class_names
    if names is None:
        return [f"class_{i}" for i in range(cfg.data.num_classes)]
    if len(names) != cfg.data.num_classes:
        raise ConfigError(f"data.class_names has {len(names)} names but data.num_classes is {cfg.data.num_classes}: "
                          "give one name per class")
    return list(names)


def _dataset(cfg: SegmentationConfig, split: str, transforms=None, check: bool = False) -> ADE20K:
    d = cfg.data
    return ADE20K(d.root, split, transforms, num_classes=d.num_classes, reduce_zero_label=d.reduce_zero_label,
                  max_images=d.max_images, check=check)


def check_data(cfg: SegmentationConfig) -> None:
    """Before the first iteration: the class names against ``data.num_classes``, and both splits' images
    and masks decoded and checked (worker processes): errors name the key or the file."""
    class_names(cfg)
    for split in (cfg.data.train_split, cfg.data.val_split):
        _dataset(cfg, split, check=True)


class _TrainSamples(Dataset):
    """``(uint8 crop, mask, photometric draws or None)``: the geometric steps of mmseg's pipeline per sample,
    then the photometric draws, in the order the whole pipeline draws them (``transforms.build_train_transform``
    gives the same images); ``_collate_train`` applies the photometric step to the batch at once."""

    def __init__(self, dataset: ADE20K, data_cfg):
        self.dataset, self.transform, self.photometric = dataset, SpatialSteps(data_cfg), data_cfg.photometric

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, mask = self.dataset.load(index)  # uint8 masks where the annotations are 8-bit (ADE20K.load)
        image, mask = self.transform(image, mask)
        return image, mask, draw_photometric_params() if self.photometric else None


def _collate_train(batch: list, crop_size: Sequence[int], photometric: bool = True) -> tuple:
    """``(uint8 images, labels, sizes, draws)``: crops padded to ``crop_size`` (``transforms.pad_batch``; the
    image padding is set to the mean colour after normalisation, on the device, by ``Normalize``), the
    photometric distortion applied to the whole batch (``transforms.photometric_distortion_batch``: per pixel,
    so the padding does not change the crops' pixels) and ``draws`` None; or, with ``photometric=False``
    (``data.photometric_on=device``), the batch as it is and its draws, which the training loop applies on the
    device."""
    images, masks, draws = zip(*batch)
    images, labels, sizes = pad_batch(images, masks, crop_size)
    if not photometric:
        return images, _compact(labels), sizes, list(draws)
    if any(d is not None for d in draws):
        images = photometric_distortion_batch(images, draws)
    return images, _compact(labels), sizes, None


def _compact(labels: Tensor) -> Tensor:
    """uint8 through the workers where the classes fit (0..254 and 255 = ignore): 8-bit annotations are already."""
    if labels.dtype != torch.uint8 and labels.numel() and labels.max() <= 255 and labels.min() >= 0:
        return labels.to(torch.uint8)
    return labels


def photometric_on_device(cfg: SegmentationConfig, device: torch.device) -> bool:
    """Whether the training batches get the photometric distortion on ``device`` rather than in the loader
    workers (``data.photometric_on``; auto: on CUDA, where the colour conversions of a batch take a fraction
    of a millisecond instead of tens of milliseconds of a worker's CPU per 512x512 crop). The pixels are the
    same either way: the steps are integer arithmetic and single float32 roundings, the draws come from the
    workers' seeded samples."""
    where = cfg.data.photometric_on
    return cfg.data.photometric and (where == "device" or (where == "auto" and device.type == "cuda"))


class _EvalImages(Dataset):
    """``(network-size image, label, original image)`` of the validation split: the eval transform resizes
    the image only; the label keeps its size (predictions are resized back to it)."""

    def __init__(self, dataset: ADE20K, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, mask = self.dataset[index]
        resized, _ = self.transform(image, mask)
        return resized.as_subclass(Tensor), mask.as_subclass(Tensor), image.as_subclass(Tensor)


def _first(batch: list):
    return batch[0]


def build_train_loader(cfg: SegmentationConfig, dist_info: DistInfo) -> tuple[DataLoader, SeededSampler]:
    """The training loader (batches ``(uint8 images, labels, sizes, draws)``, see ``_collate_train``) and its sampler.

    The order is a ``DistributedSampler``'s (a function of seed and epoch, also for one process), each
    sample is augmented under its own seed (``SeededDataset``), and ``loader.batch_sampler.skip`` leaves
    out the batches a resumed run already used: so a resumed run sees the same batches. The loader has its
    own generator: starting it draws nothing from the (checkpointed) training RNG. ``runtime.data.EpochStream``
    runs it across epochs.
    """
    t = cfg.train
    dataset = _TrainSamples(_dataset(cfg, cfg.data.train_split), cfg.data)
    sampler = SeededSampler(DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                               shuffle=True, seed=t.seed, drop_last=True), t.seed, dist_info.rank)
    workers = default_workers(cfg.data.workers)
    loader = DataLoader(SeededDataset(dataset), batch_sampler=SkipBatches(
                            torch.utils.data.BatchSampler(sampler, t.batch_size, drop_last=True)),
                        num_workers=workers, collate_fn=functools.partial(
                            _collate_train, crop_size=tuple(cfg.data.crop_size),
                            photometric=not photometric_on_device(cfg, dist_info.device)),
                        pin_memory=dist_info.device.type == "cuda",
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(t.seed))
    return loader, sampler


def _overlay(image: Tensor, pred: Tensor, label: Tensor, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """[H, 2W, 3] uint8: the prediction colour-blended over the image | the ground truth, blended the same
    way (ignored pixels left as the image)."""
    rgb = image.permute(1, 2, 0).cpu().numpy().astype(np.float32)
    panels = []
    for classes in (pred.cpu().numpy(), label.cpu().numpy()):
        valid = classes != IGNORE_INDEX
        colour = colours[np.where(valid, classes, 0)].astype(np.float32)
        blended = np.where(valid[..., None], (1 - alpha) * rgb + alpha * colour, rgb)
        panels.append(blended.round().clip(0, 255).astype(np.uint8))
    return np.concatenate(panels, axis=1)


@torch.no_grad()
def evaluate(model: nn.Module, cfg: SegmentationConfig, dist_info: DistInfo, autocast=None,
             overlays_dir: Optional[Path] = None) -> dict[str, Any]:
    """mIoU, mAcc, aAcc (%) and per-class IoU of ``model`` on ``data.val_split``.

    One image at a time (sizes differ) through the eval transform and ``inference.predict`` with
    ``cfg.eval`` (whole/slide, scales, flip); images are sharded over ranks and the confusion matrix is
    summed over them, so every rank returns the same result. ``eval.scales`` are factors of the image as
    the eval transform sized it (into ``data.scale``). PNG overlays of the first ``eval.overlays`` images
    go to ``overlays_dir``.
    """
    from PIL import Image

    device, e = dist_info.device, cfg.eval
    autocast = autocast or autocast_for(cfg.train.precision, device, model)
    dataset = _EvalImages(_dataset(cfg, cfg.data.val_split), build_eval_transform(cfg.data))
    indices = list(ShardSampler(len(dataset), dist_info.rank, dist_info.world_size))
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=1, collate_fn=_first,
                        num_workers=default_workers(cfg.data.workers), pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(0))  # never draws from the training RNG
    normalize = Normalize(*normalization(cfg)).to(device)
    memory_format = memory_format_for(cfg.model.channels_last)
    colours = palette(cfg.data.num_classes)
    if overlays_dir is not None and e.overlays > 0:
        overlays_dir.mkdir(parents=True, exist_ok=True)
    metric = SegmentationMetric(cfg.data.num_classes, IGNORE_INDEX)
    was_training = model.training
    model.eval()
    # whole-image evaluation sees every image's own size: cuDNN's autotuner would re-tune for each; slide
    # windows are crop-sized, and keep the training's setting
    benchmark = cudnn_benchmark_off() if e.mode == "whole" else contextlib.nullcontext()
    try:
        with benchmark:
            for index, (image, label, original) in zip(indices, loader):
                x = normalize(image[None].to(device, non_blocking=True)).contiguous(memory_format=memory_format)
                with autocast():
                    scores = predict(model, x, label.shape[-2:], mode=e.mode, crop_size=e.crop_size,
                                     stride=e.stride, scales=e.scales, flip=e.flip, num_classes=cfg.data.num_classes)
                pred = scores[0].argmax(0)
                label = label.to(device)
                metric.update(pred, label)
                if overlays_dir is not None and index < e.overlays:
                    Image.fromarray(_overlay(original, pred, label, colours)).save(overlays_dir / f"{index:05d}.png")
    finally:
        model.train(was_training)
    k = cfg.data.num_classes
    confusion = metric.confusion if metric.confusion is not None else torch.zeros(k, k, dtype=torch.int64, device=device)
    metric.confusion = all_reduce_sum(confusion)
    result = metric.compute()
    return {"mIoU": result["mIoU"], "mAcc": result["mAcc"], "aAcc": result["aAcc"],
            "IoU": dict(zip(class_names(cfg), result["IoU"])), "images": len(dataset)}


def iou_table(metrics: dict[str, Any]) -> str:
    """Per-class IoU as a text table (absent classes: "-"), then the summary line."""
    width = max([len(name) for name in metrics["IoU"]] + [5])
    rows = [f"{'class':<{width}}  IoU (%)"]
    rows += [f"{name:<{width}}  " + ("      -" if math.isnan(v) else f"{v:7.2f}") for name, v in metrics["IoU"].items()]
    rows.append(f"mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}  aAcc {metrics['aAcc']:.2f}  "
                f"({metrics['images']} images)")
    return "\n".join(rows)


def _val_record(metrics: dict[str, Any]) -> dict[str, Any]:
    record = {k: metrics[k] for k in ("mIoU", "mAcc", "aAcc", "images")}
    record.update({f"IoU/{name}": v for name, v in metrics["IoU"].items() if not math.isnan(v)})
    return record


# ---- training -------------------------------------------------------------------------------------------

def train(cfg: SegmentationConfig) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.data`` for ``train.max_iter`` iterations; returns the final evaluation
    ``{"mIoU", "mAcc", "aAcc", "IoU": {class: %}, "images"}``. Writes config.yaml, metrics.jsonl,
    last.pth, model_final.pth, overlays/ and plots under ``output_dir``."""
    dist_info = init_distributed()
    try:
        return _train(cfg, dist_info)
    finally:
        cleanup_distributed()


def _train(cfg: SegmentationConfig, dist_info: DistInfo) -> dict[str, Any]:
    t, o = cfg.train, cfg.optim
    device, is_main, out = dist_info.device, dist_info.is_main, Path(cfg.output_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    check_bounds(cfg)
    check_data(cfg)
    torch.manual_seed(t.seed + dist_info.rank)

    # ---- data -------------------------------------------------------------------------------------------
    loader, sampler = build_train_loader(cfg, dist_info)
    cfg = schedule_for_batch(cfg, t.batch_size * dist_info.world_size * t.accum_steps, REFERENCE_BATCH,
                             len(loader.dataset))  # train.scale_schedule (config.yaml keeps the recipe's)
    t, o = cfg.train, cfg.optim
    batches_per_epoch = len(loader)
    if batches_per_epoch == 0:
        raise ConfigError(f"the training split ({len(sampler)} images per process) is smaller than one batch "
                         f"({t.batch_size} images): lower train.batch_size or add data")
    normalize = Normalize(*normalization(cfg)).to(device)
    memory_format = memory_format_for(cfg.model.channels_last)

    # ---- model, optimizer, schedule ------------------------------------------------------------------
    model = build_model(cfg, dist_info).to(device, memory_format=memory_format)
    precision = setup_precision(t.precision, device, channels_last=cfg.model.channels_last, model=model,
                                cudnn_benchmark=True)  # fixed crops (padded to crop_size)
    global_batch = t.batch_size * dist_info.world_size * t.accum_steps
    base_lr = scale_lr(o.lr, global_batch, REFERENCE_BATCH)  # linear scaling, mmseg's 16-image reference
    min_lr = scale_lr(o.min_lr, global_batch, REFERENCE_BATCH)
    optimizer = build_optimizer(model, lr=base_lr, momentum=o.momentum, nesterov=False,  # mmseg's plain SGD
                                weight_decay=o.weight_decay, no_bias_decay=o.no_bias_decay)
    scheduler = build_scheduler(optimizer, base_lr=base_lr, total_steps=t.max_iter, warmup_steps=o.warmup_iters,
                                schedule="poly", power=o.power, min_lr=min_lr)
    stepper = OptimizerStep(optimizer, scheduler, precision.scaler, accum_steps=t.accum_steps,
                            max_nonfinite=t.max_nonfinite)

    def criterion(outputs: dict[str, Tensor], labels: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-entropy on "out" + aux_weight x the same on "aux" (255 ignored); returns (total, aux)."""
        loss = F.cross_entropy(outputs["out"].float(), labels, ignore_index=IGNORE_INDEX)
        aux = F.cross_entropy(outputs["aux"].float(), labels, ignore_index=IGNORE_INDEX) if "aux" in outputs \
            else torch.zeros((), device=labels.device)
        return loss + cfg.model.aux_weight * aux, aux

    # ---- resume: weights, optimizer, schedule, scaler, streak, every rank's RNG, the iteration --------
    step = 0
    metrics: dict[str, Any] = {}
    resume_path = resolve_resume(t.resume, out)
    if resume_path is not None:
        ckpt = load_training_checkpoint(resume_path, to_dict(cfg))
        check_fits(model, ckpt["model"], resume_path, f"this run's FCN ({cfg.data.num_classes} classes)", ckpt)
        restore_training_state(ckpt, model, stepper)
        step = ckpt["iteration"]
        metrics = dict(ckpt.get("metrics") or {})  # a finished run resumed again reports its result
        restore_rng_states(ckpt["rng"], dist_info.rank, dist_info.world_size)
        if is_main:
            log.info("resumed from %s at iteration %d", resume_path, step)

    train_model: nn.Module = model
    if t.compile:  # the training forward only: evaluation sees every image's own size and stays eager
        train_model = torch.compile(model)
    if dist_info.distributed:
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    logger = RunLogger(out, enabled=is_main, resumed_step=step if resume_path is not None else None,
                       resume=t.resume)
    if is_main:
        log.info("FCN-%s on %s: %d train images, %d classes, %d process(es) x %d images x %d accumulation = %d "
                 "global batch, lr %.4g (poly to %.4g), %d iterations", cfg.model.backbone, cfg.data.root,
                 len(sampler) * dist_info.world_size, cfg.data.num_classes, dist_info.world_size, t.batch_size,
                 t.accum_steps, global_batch, base_lr, min_lr, t.max_iter)

    def checkpoint() -> None:
        """last.pth: every rank gathers its RNG state, rank 0 writes (atomically)."""
        stepper.check_diverged(f"iteration {step}", str(out / "last.pth"))  # never a checkpoint after divergence
        rngs = gather_rng_states()
        if is_main:
            save_checkpoint(training_state(model, stepper, iteration=step, metrics=metrics, rng=rngs,
                                           config=to_dict(cfg)), out / "last.pth")

    def run_eval() -> dict[str, Any]:
        stepper.check_diverged(f"iteration {step}", str(out / "last.pth"))
        result = evaluate(model, cfg, dist_info, precision.autocast, out / "overlays" if is_main else None)
        logger.log("val", step, **_val_record(result))
        if is_main:
            log.info("iteration %d: mIoU %.2f%%, mAcc %.2f%%, aAcc %.2f%% (%d images)", step, result["mIoU"],
                     result["mAcc"], result["aAcc"], result["images"])
        return result

    # ---- the loop: iterations; a new epoch (same order as an uninterrupted run) when the loader ends ----
    batches_done = step * t.accum_steps  # resuming inside an epoch: its first batches are skipped
    batches = EpochStream(loader, sampler, batches_done // batches_per_epoch, batches_done % batches_per_epoch)
    progress = Progress(t.max_iter, step, enabled=is_main, logger=log)
    meter = LossMeter(device)
    train_model.train()
    while step < t.max_iter:
        step_loss, step_aux = torch.zeros((), device=device), torch.zeros((), device=device)
        for micro in range(t.accum_steps):
            images, labels, sizes, draws = next(batches)
            images = images.to(device, non_blocking=True)
            if draws is not None:  # data.photometric_on=device
                images = photometric_distortion_batch(images, draws)
            images = normalize(images, sizes).contiguous(memory_format=memory_format)
            labels = labels.to(device, non_blocking=True).long()
            with stepper.no_sync(train_model, micro):
                with precision.autocast():
                    outputs = train_model(images)
                loss, aux = criterion(outputs, labels)
                stepper.backward(loss)
            step_loss += loss.detach() / t.accum_steps
            step_aux += aux.detach() / t.accum_steps
        lr = optimizer.param_groups[0]["lr"]  # the lr this step uses (lr_at(step)); logged below
        stepped = stepper.step(step_loss)
        step += 1
        progress.update(global_batch)
        meter.add(stepped, loss=step_loss, aux_loss=step_aux)
        if step % t.log_every == 0 or step == t.max_iter:
            # The only host syncs of the loop: here, every log_every iterations (and at evaluations and checkpoints).
            stepper.check_diverged(f"iteration {step}", str(out / "last.pth"))
            means = meter.mean()
            shown = progress.report(step, loss=means["loss"], aux_loss=means["aux_loss"], lr=lr)
            logger.log("train", step, epoch=step * t.accum_steps / batches_per_epoch, lr=lr,
                       img_per_s=shown["img_per_s"], **means)
        if step == t.max_iter:  # the trained model is on disk before the final evaluation can fail
            checkpoint()
        if (t.eval_every and step % t.eval_every == 0) or step == t.max_iter:
            metrics = run_eval()
            train_model.train()
        if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.max_iter:
            checkpoint()  # after the evaluation: a finished run's checkpoint holds its result
    progress.close()
    if not metrics:  # resumed at the end from a checkpoint written before its evaluation
        metrics = run_eval()

    if is_main:
        log.info("per-class IoU at iteration %d:\n%s", step, iou_table(metrics))
        save_checkpoint(model.state_dict(), out / "model_final.pth")  # atomic, as last.pth
        plot_run(out, val_metrics=(("mIoU", "mIoU"),), val_x="step", val_title="validation mIoU (%)")
        log.info("wrote %s, %s, overlays and plots", out / "model_final.pth", out / "metrics.jsonl")
    logger.close()
    return metrics


def evaluate_checkpoint(cfg: SegmentationConfig, checkpoint: str) -> dict[str, Any]:
    """mIoU/mAcc/aAcc and per-class IoU of a saved FCN (``model_final.pth``, or ``last.pth`` whose state
    dict is under "model"); overlays go to ``<output_dir>/overlays``."""
    dist_info = init_distributed()
    try:
        model = build_model(cfg, pretrained=False)  # every weight comes from the checkpoint
        load_model_strictly(model, checkpoint, f"a torch-engine FCN ({cfg.model.backbone}, "
                            f"{cfg.data.num_classes} classes)")
        model = model.to(dist_info.device, memory_format=memory_format_for(cfg.model.channels_last))
        metrics = evaluate(model, cfg, dist_info,
                           overlays_dir=Path(cfg.output_dir) / "overlays" if dist_info.is_main else None)
        if dist_info.is_main:
            log.info("%s:\n%s", checkpoint, iou_table(metrics))
        return metrics
    finally:
        cleanup_distributed()
