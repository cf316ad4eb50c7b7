"""Training and evaluation of a classifier with the paper's refinements, top to bottom.

``train(cfg)`` is one readable function: set-up (devices, data, model, optimizer, schedule, AMP,
DDP, resume) once, then the epoch loop. Every refinement is a config value (see ``config.py``):
linear LR scaling and warmup (``schedules``), zero-gamma (``model.zero_init_last``), no bias decay
(``optim``), FP16/BF16 (``train.precision``), cosine (``optim.schedule``), label smoothing, mixup
and distillation (``losses``).
"""
from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from backbones import Backbone, BackboneArgumentError, create_backbone, save_weights
from runtime.config import ConfigError, dump_config, to_dict

from .checkpoint import (load_checkpoint, resolve_resume, restore_training_state, rng_state, save_checkpoint,
                         set_rng_state)
from .config import Config
from .batch_transforms import BatchAugment
from .data import TensorLoader, build_datasets, build_loader, build_tensors, resolve_pipeline
from .distributed import DistInfo, ShardSampler, all_reduce_min, all_reduce_sum, cleanup_distributed, init_distributed
from .logger import RunLogger, plot_run
from .losses import ClassificationLoss, mixup, smooth_labels
from .optim import build_optimizer
from .schedules import build_scheduler, scale_lr

log = logging.getLogger("classification")

EpochCallback = Callable[[int, dict], None]


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for ``train.max_nonfinite`` steps in a row."""


def autocast_for(precision: str, device: torch.device):
    """A zero-argument factory of the autocast context for ``precision`` on ``device``."""
    if precision == "fp32":
        return nullcontext
    if precision == "fp16" and device.type == "cpu":
        # It works (autocast + GradScaler exist on CPU, which is how the tests cover the fp16 path), but
        # few CPUs compute in fp16 natively.
        log.warning("train.precision=fp16 on CPU is slow on most processors; train.precision=bf16 is the CPU choice")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return lambda: torch.autocast(device.type, dtype=dtype)


def model_kwargs(cfg: Config) -> dict[str, Any]:
    """Builder arguments from ``cfg.model`` beyond the common ones (only what differs from the default)."""
    kwargs = {"width_mult": cfg.model.width_mult} if cfg.model.width_mult != 1.0 else {}
    return {**kwargs, **cfg.model.kwargs}


def build_model(cfg: Config, num_classes: int) -> Backbone:
    m = cfg.model
    try:
        return create_backbone(m.name, weights=m.weights, num_classes=num_classes, in_chans=m.in_chans,
                               zero_init_last=m.zero_init_last, init=m.init, norm_eval=m.norm_eval,
                               **model_kwargs(cfg))
    except BackboneArgumentError as e:
        if not m.kwargs:
            raise
        raise ConfigError(f"model.kwargs {m.kwargs}: {e}") from None


def normalization(cfg: Config) -> tuple[list[float], list[float]]:
    """``data.mean``/``data.std``, or the backbone's defaults (read from a copy built on the meta device:
    no memory, no random numbers drawn)."""
    mean, std = cfg.data.mean, cfg.data.std
    if mean is None or std is None:
        with torch.device("meta"):
            probe = create_backbone(cfg.model.name, num_classes=0, in_chans=cfg.model.in_chans, **model_kwargs(cfg))
        mean, std = mean or probe.default_cfg["mean"], std or probe.default_cfg["std"]
    mean, std = list(mean), list(std)
    if not len(mean) == len(std) == cfg.model.in_chans:
        raise ValueError(f"data.mean ({len(mean)} values) and data.std ({len(std)} values) must have one value "
                         f"per input channel (model.in_chans={cfg.model.in_chans})")
    return mean, std


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast, channels_last: bool,
             prepare: Callable[[torch.Tensor], torch.Tensor] = nn.Identity(),
             hflip_tta: bool = False) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and cross-entropy over the whole loader, summed over ranks.

    ``prepare`` turns a loaded batch (on the device) into network input (the batched pipeline's
    resize/crop/normalise; identity for the per-sample pipeline). ``hflip_tta`` averages the class
    probabilities of each image and its mirror image (test-time augmentation)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    for images, labels, _ in loader:
        if labels.numel() == 0:
            continue
        images = prepare(images.to(device, non_blocking=True))
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with autocast():
            logits = model(images).float()
            if hflip_tta:  # log of the mean probability: top-k and the loss below read it like logits
                flipped = model(images.flip(-1)).float()
                logits = torch.logsumexp(torch.stack([logits.log_softmax(1), flipped.log_softmax(1)]), 0) - math.log(2)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        totals += torch.stack([hits[:, 0].sum(), hits.any(1).sum(),
                               nn.functional.cross_entropy(logits, labels, reduction="sum"),
                               torch.tensor(labels.numel(), device=device)]).double()
    all_reduce_sum(totals)
    c1, c5, loss, n = totals.tolist()
    n = max(n, 1)
    return {"top1": 100 * c1 / n, "top5": 100 * c5 / n, "loss": loss / n, "images": int(n)}


def build_data(cfg: Config, mean: list[float], std: list[float], dist_info: DistInfo):
    """Loaders and device-side preparation for ``data.pipeline``.

    Returns ``(train_loader, val_loader, train_prepare, val_prepare, sampler, num_classes)``. Batches
    are ``(images, labels, n_skipped)``; ``*_prepare`` maps loaded images on the device to network
    input. The train order comes from a ``DistributedSampler`` also for one process: it is a function
    of (seed, epoch), so a resumed run sees the same batches; drop_last keeps ranks in step.
    """
    t, d = cfg.train, cfg.data
    if resolve_pipeline(d) == "tensor":
        (x_train, y_train), (x_val, y_val), num_classes, _ = build_tensors(d)
        sampler = DistributedSampler(range(len(y_train)), num_replicas=dist_info.world_size, rank=dist_info.rank,
                                     shuffle=True, seed=t.seed, drop_last=True)
        train_loader = TensorLoader(x_train, y_train, t.batch_size, sampler, drop_last=True)
        val_loader = TensorLoader(x_val, y_val, t.batch_size,
                                  ShardSampler(len(y_val), dist_info.rank, dist_info.world_size))
        train_prepare = BatchAugment(d, mean, std, cfg.model.in_chans, train=True).to(dist_info.device)
        val_prepare = BatchAugment(d, mean, std, cfg.model.in_chans, train=False).to(dist_info.device)
        return train_loader, val_loader, train_prepare, val_prepare, sampler, num_classes
    train_ds, val_ds, num_classes, _ = build_datasets(d, mean, std, cfg.model.in_chans)
    sampler = DistributedSampler(train_ds, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                 shuffle=True, seed=t.seed, drop_last=True)
    # persistent_workers=False: workers are re-seeded from the (checkpointed) torch RNG every epoch.
    train_loader = build_loader(train_ds, batch_size=t.batch_size, sampler=sampler, workers=d.workers,
                                drop_last=True, persistent_workers=False)
    # Its own generator: validation never draws from the training RNG stream (exact resume).
    val_loader = build_loader(val_ds, batch_size=t.batch_size, workers=d.workers,
                              sampler=ShardSampler(len(val_ds), dist_info.rank, dist_info.world_size),
                              generator=torch.Generator().manual_seed(t.seed))
    return train_loader, val_loader, nn.Identity(), nn.Identity(), sampler, num_classes


def _gather_rng(dist_info: DistInfo) -> list[dict]:
    """RNG states of every rank (rank order), so a resumed DDP run continues every stream exactly."""
    state = rng_state()
    if not dist_info.distributed:
        return [state]
    states: list[Any] = [None] * dist_info.world_size
    torch.distributed.all_gather_object(states, state)
    return states


def train(cfg: Config, callbacks: Sequence[EpochCallback] = ()) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.data``; returns the final metrics. ``callbacks(epoch, metrics)`` run
    on every rank after each epoch's checkpoint is written."""
    dist_info = init_distributed()
    try:
        return _train(cfg, dist_info, callbacks)
    finally:
        cleanup_distributed()


def _train(cfg: Config, dist_info: DistInfo, callbacks: Sequence[EpochCallback]) -> dict[str, Any]:
    device, is_main = dist_info.device, dist_info.is_main
    t = cfg.train
    out = Path(cfg.output_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    if t.epochs < 1 or t.batch_size < 1 or t.accum_steps < 1:
        raise ValueError("train.epochs, train.batch_size and train.accum_steps must be >= 1")
    if cfg.model.sync_bn and device.type != "cuda":
        raise ValueError("model.sync_bn=true needs CUDA: torch's SyncBatchNorm has no CPU kernel")
    if cfg.distill.teacher and not cfg.distill.teacher_weights:
        raise ValueError("distill.teacher is set but distill.teacher_weights is not: a randomly initialised "
                         "teacher teaches nothing. Point distill.teacher_weights at a trained checkpoint")
    torch.manual_seed(t.seed + dist_info.rank)
    autocast = autocast_for(t.precision, device)

    # ---- data -------------------------------------------------------------------------------------
    mean, std = normalization(cfg)
    train_loader, val_loader, train_prepare, val_prepare, sampler, num_classes = build_data(cfg, mean, std, dist_info)
    steps_per_epoch = len(train_loader) // t.accum_steps
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({len(sampler)} images per process) is smaller than one global batch "
                         f"({t.batch_size} x {dist_info.world_size} x {t.accum_steps})")
    total_steps = t.epochs * steps_per_epoch

    # ---- model, teacher, optimizer, schedule --------------------------------------------------------
    model = build_model(cfg, num_classes).to(device)
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if cfg.model.sync_bn and dist_info.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    teacher = None
    if cfg.distill.teacher:
        teacher = create_backbone(cfg.distill.teacher, weights=cfg.distill.teacher_weights, num_classes=num_classes,
                                  in_chans=cfg.model.in_chans).to(device, memory_format=memory_format).eval()
        teacher.requires_grad_(False)

    global_batch = t.batch_size * dist_info.world_size * t.accum_steps
    base_lr = scale_lr(cfg.optim.lr, global_batch)  # linear scaling: lr per 256 images x global / 256
    o = cfg.optim
    optimizer = build_optimizer(model, lr=base_lr, momentum=o.momentum, nesterov=o.nesterov,
                                weight_decay=o.weight_decay, no_bias_decay=o.no_bias_decay)
    scheduler = build_scheduler(optimizer, base_lr=base_lr, total_steps=total_steps,
                                warmup_steps=round(o.warmup_epochs * steps_per_epoch), schedule=o.schedule,
                                milestones=[m * steps_per_epoch for m in o.milestones], gamma=o.gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    criterion = ClassificationLoss(label_smoothing=t.label_smoothing, temperature=cfg.distill.temperature)

    # ---- resume -------------------------------------------------------------------------------------
    start_epoch, step, best_top1 = 0, 0, -1.0
    metrics: dict[str, Any] = {}
    resume_path = resolve_resume(t.resume, out)
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        restore_training_state(ckpt, model, optimizer, scheduler, scaler)
        start_epoch, step, best_top1 = ckpt["epoch"], ckpt["step"], ckpt["best_top1"]
        metrics = dict(ckpt["metrics"])  # a finished run resumed again just re-exports its result
        rngs = ckpt["rng"]
        if len(rngs) == dist_info.world_size:
            set_rng_state(rngs[dist_info.rank])
        else:
            log.warning("resuming with %d processes from a run with %d: RNG streams are not restored exactly",
                        dist_info.world_size, len(rngs))
        if is_main:
            log.info("resumed from %s at epoch %d (step %d)", resume_path, start_epoch, step)

    train_model: nn.Module = model
    if t.compile:
        train_model = torch.compile(model)
    if dist_info.distributed:
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    logger = RunLogger(out, enabled=is_main)
    if is_main:
        log.info("%s on %s: %d train / %d val images, %d classes, %d process(es) x %d images x %d accumulation "
                 "= %d global batch, lr %.4g, %d steps", cfg.model.name, cfg.data.name,
                 len(sampler) * dist_info.world_size, len(val_loader.sampler) * dist_info.world_size,
                 num_classes, dist_info.world_size, t.batch_size, t.accum_steps, global_batch, base_lr, total_steps)

    # ---- the loop -----------------------------------------------------------------------------------
    nonfinite_streak, skipped_images = 0, 0
    for epoch in range(start_epoch, t.epochs):
        sampler.set_epoch(epoch)
        use_mixup = t.mixup_alpha > 0 and epoch < t.epochs - t.mixup_off_epochs
        train_model.train()
        progress = _progress(steps_per_epoch, epoch, t.epochs, enabled=is_main)
        loss_sum = torch.zeros((), device=device)
        loss_count, tic, images_seen = 0, time.perf_counter(), 0
        window_tic, window_images = tic, 0  # img/s over the last log window, not since the epoch began
        batches = iter(train_loader)
        for i in range(steps_per_epoch):
            step_loss = torch.zeros((), device=device)
            for micro in range(t.accum_steps):
                images, labels, n_skipped = next(batches)
                skipped_images += n_skipped
                if labels.numel() == 0:
                    raise RuntimeError("a whole batch of unreadable images (data.skip_corrupt): check the dataset")
                images = train_prepare(images.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
                labels = labels.to(device, non_blocking=True)
                targets = smooth_labels(labels, num_classes, t.label_smoothing)
                if use_mixup:  # the teacher sees the same mixed images
                    images, targets, _ = mixup(images, targets, t.mixup_alpha)
                last_micro = micro == t.accum_steps - 1
                sync = nullcontext() if last_micro or not dist_info.distributed else train_model.no_sync()
                with sync:
                    with autocast():
                        logits = train_model(images)
                        with torch.no_grad():
                            teacher_logits = teacher(images) if teacher is not None else None
                    loss = criterion(logits, targets, teacher_logits)
                    scaler.scale(loss / t.accum_steps).backward()
                step_loss += loss.detach() / t.accum_steps
                images_seen += images.shape[0]
                window_images += images.shape[0]

            # A non-finite loss skips the step on every rank (fp16: GradScaler finds the inf/nan grads).
            if scaler.is_enabled():
                scale = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                skipped = scaler.get_scale() < scale
            else:
                finite = all_reduce_min(torch.isfinite(step_loss).float())
                skipped = not bool(finite.item())
                if not skipped:
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                # A skipped first step makes torch warn that the schedule runs ahead of the optimizer; it
                # is meant to: the schedule counts iterations, skipped or not.
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                scheduler.step()
            step += 1
            if skipped:
                nonfinite_streak += 1
                if nonfinite_streak >= t.max_nonfinite:
                    raise TrainingDiverged(
                        f"the loss was non-finite for {nonfinite_streak} steps in a row (epoch {epoch}, step {step}); "
                        f"stopped. The last good checkpoint is {out / 'last.pth'} (written at the end of the last "
                        "finished epoch). Lower optim.lr, raise optim.warmup_epochs, or train in fp32")
                continue
            nonfinite_streak = 0
            loss_sum += step_loss
            loss_count += 1
            if step % t.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                rate = window_images * dist_info.world_size / max(now - window_tic, 1e-9)
                window_tic, window_images = now, 0
                mean_loss = all_reduce_sum(loss_sum.clone()).item() / (loss_count * dist_info.world_size)
                lr = optimizer.param_groups[0]["lr"]
                logger.log("train", step, epoch=epoch + (i + 1) / steps_per_epoch, loss=mean_loss,
                           lr=lr, img_per_s=rate)
                progress.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
                if progress.disable and is_main:  # no terminal (log file, nohup): the same as a log line
                    eta = (min(total_steps, t.max_steps or total_steps) - step) * global_batch / max(rate, 1e-9)
                    log.info("epoch %d step %d/%d  loss %.4f  lr %.4g  %.0f img/s  ETA %s", epoch + 1, step,
                             total_steps, mean_loss, lr, rate, _hms(eta))
                loss_sum.zero_()
                loss_count = 0
            progress.update(1)
            if t.max_steps and step >= t.max_steps:
                break
        progress.close()
        train_time = time.perf_counter() - tic

        last_epoch = epoch == t.epochs - 1 or bool(t.max_steps and step >= t.max_steps)
        if (epoch + 1) % t.eval_every == 0 or last_epoch:
            metrics = evaluate(train_model, val_loader, device, autocast, cfg.model.channels_last, val_prepare,
                               cfg.data.val_hflip_tta)
            metrics.update(epoch=epoch + 1, train_time_s=train_time,
                           train_img_per_s=images_seen * dist_info.world_size / train_time)
            logger.log("val", step, **metrics)
            if is_main:
                log.info("epoch %d/%d: top-1 %.2f%%, top-5 %.2f%%, val loss %.4f, %.0f img/s", epoch + 1, t.epochs,
                         metrics["top1"], metrics["top5"], metrics["loss"], metrics["train_img_per_s"])
        skipped_total = int(all_reduce_sum(torch.tensor(skipped_images, device=device)).item())
        if skipped_total and is_main:
            log.warning("%d unreadable images skipped so far (data.skip_corrupt=true)", skipped_total)

        # Checkpoint: every rank takes part in gathering RNG states; rank 0 writes.
        rngs = _gather_rng(dist_info)
        if is_main:
            is_best = "top1" in metrics and metrics.get("epoch") == epoch + 1 and metrics["top1"] > best_top1
            best_top1 = max(best_top1, metrics.get("top1", best_top1))
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1,
                     "step": step, "best_top1": best_top1, "metrics": metrics, "rng": rngs, "config": to_dict(cfg)}
            save_checkpoint(state, out / "last.pth")
            if is_best:
                save_checkpoint(state, out / "best.pth")
        for callback in callbacks:
            callback(epoch, metrics)
        if last_epoch:
            break

    if is_main:
        metrics["skipped_images"] = skipped_images
        save_weights(model, out / "model.safetensors", metadata={
            "provenance": f"tricks train ({cfg.data.name}, {t.epochs} epochs)", "top1": metrics.get("top1"),
            "top5": metrics.get("top5"), "dataset": cfg.data.name, "config": to_dict(cfg)})
        plot_run(out)
        log.info("wrote %s, %s and plots", out / "model.safetensors", out / "metrics.jsonl")
    logger.close()
    return metrics


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _progress(total: int, epoch: int, epochs: int, enabled: bool):
    from tqdm import tqdm

    # tqdm shows the ETA; on a non-terminal (log files) it stays quiet and the log lines speak.
    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", disable=not enabled or not sys.stderr.isatty(),
                dynamic_ncols=True, leave=False)


def evaluate_checkpoint(cfg: Config, checkpoint: str) -> dict[str, float]:
    """``tricks eval``: top-1/top-5 of a checkpoint (suite ``.pth``/``.safetensors``, timm, torchvision)."""
    dist_info = init_distributed()
    try:
        device = dist_info.device
        mean, std = normalization(cfg)
        _, loader, _, prepare, _, num_classes = build_data(cfg, mean, std, dist_info)
        model = create_backbone(cfg.model.name, weights=checkpoint, num_classes=num_classes,
                                in_chans=cfg.model.in_chans, norm_eval=True, **model_kwargs(cfg))
        if model.fc.weight.shape[0] != num_classes:
            raise ValueError(f"{checkpoint} has no {num_classes}-class classifier for {cfg.data.name}")
        memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        model = model.to(device, memory_format=memory_format)
        return evaluate(model, loader, device, autocast_for(cfg.train.precision, device), cfg.model.channels_last,
                        prepare, cfg.data.val_hflip_tta)
    finally:
        cleanup_distributed()
