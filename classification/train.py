"""Training and evaluation of a classifier with the paper's refinements, top to bottom.

``train(cfg)`` is one readable function: set-up (devices, data, model, optimizer, schedule, AMP,
DDP, resume) once, then the epoch loop. Every refinement is a config value (see ``config.py``):
linear LR scaling and warmup (``schedules``), zero-gamma (``model.zero_init_last``), no bias decay
(``optim``), FP16/BF16 (``train.precision``), cosine (``optim.schedule``), label smoothing, mixup
and distillation (``losses``). Beyond the paper: an EMA of the weights (``train.ema_decay``) and
data-dependent initialisation (a backbone's ``data_init_images``, airbench's patch whitening).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from backbones import Backbone, create_backbone, save_weights
from backbones.weights import WeightsError
from runtime.checkpoint import (gather_rng_states, load_training_checkpoint, resolve_resume, restore_rng_states,
                                restore_training_state, save_checkpoint, training_state)
from runtime.config import ConfigError, check_bounds, dump_config, to_dict
from runtime.data import SeededDataset, SeededSampler, SkipBatches, backbone_config_errors, default_workers
from runtime.data import normalization as resolve_normalization
from runtime.distributed import DistInfo, ShardSampler, all_reduce_sum, cleanup_distributed, init_distributed
from runtime.errors import DataError
from runtime.ema import WeightEMA
from runtime.logger import LossMeter, Progress, RunLogger, plot_run
from runtime.optim import build_optimizer
from runtime.precision import autocast_for, memory_format_for, setup_precision
from runtime.schedules import build_scheduler, scale_lr
from runtime.step import OptimizerStep, TrainingDiverged
from runtime.strict import check_fits

from .batch_transforms import BatchAugment
from .config import REFERENCE_BATCH, Config
from .data import TensorLoader, build_datasets, build_loader, build_tensors, collate_skip_none, resolve_pipeline
from .losses import ClassificationLoss, mixup, smooth_labels

log = logging.getLogger("classification")

EpochCallback = Callable[[int, dict], None]

__all__ = ["train", "evaluate", "evaluate_checkpoint", "TrainingDiverged", "REFERENCE_BATCH"]


def model_kwargs(cfg: Config) -> dict[str, Any]:
    """Builder arguments from ``cfg.model`` beyond the common ones (only what differs from the default)."""
    kwargs = {"width_mult": cfg.model.width_mult} if cfg.model.width_mult != 1.0 else {}
    return {**kwargs, **cfg.model.kwargs}


def build_model(cfg: Config, num_classes: int) -> Backbone:
    m = cfg.model
    with backbone_config_errors("model.name", m.kwargs):
        # model.weights starts a fine-tuning run: a classifier of another size is replaced by a new head
        return create_backbone(m.name, weights=m.weights, num_classes=num_classes, in_chans=m.in_chans, new_head=True,
                               zero_init_last=m.zero_init_last, init=m.init, norm_eval=m.norm_eval,
                               **model_kwargs(cfg))


def epochs_to_steps(epochs: float, steps_per_epoch: int, at_least_one: bool = False) -> int:
    """Optimizer steps of a (fractional) number of epochs, rounded half up (Python's ``round`` goes to even: 0.5
    of an epoch of 5 steps would be 2, 1.5 epochs 8); ``at_least_one``: a positive number is never 0 steps (a
    warm-up asked for is not dropped)."""
    steps = math.floor(epochs * steps_per_epoch + 0.5)
    return max(steps, 1) if at_least_one and epochs > 0 else steps


def normalization(cfg: Config, weights: Optional[str] = None) -> tuple[list[float], list[float]]:
    """``data.mean``/``data.std``, or those ``weights`` (default ``model.weights``) were trained with, or the
    backbone's defaults (``runtime.data.normalization``)."""
    return resolve_normalization(cfg.data.mean, cfg.data.std, cfg.model.name, cfg.model.in_chans, model_kwargs(cfg),
                                 key="model.name", weights=weights or cfg.model.weights)


def _tta_views(images: torch.Tensor, hflip: bool, translate: int) -> list[tuple[torch.Tensor, float]]:
    """The test-time views of a batch and their weights (summing to 1)."""
    views = [(images, 1.0)]
    h, w = images.shape[-2:]
    if not 0 <= translate < min(h, w):
        raise ConfigError(f"data.val_translate_tta={translate}: a shift in pixels, 0 (off) up to less than the "
                         f"validation crop ({h}x{w} px)")
    if translate > 0:
        padded = nn.functional.pad(images, (translate,) * 4, mode="reflect")
        views = [(images, 0.5), (padded[..., :h, :w], 0.25), (padded[..., 2 * translate:, 2 * translate:], 0.25)]
    if hflip:
        views = [(v.flip(-1) if mirrored else v, weight / 2) for v, weight in views for mirrored in (False, True)]
    return views


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast, channels_last: bool,
             prepare: Callable[[torch.Tensor], torch.Tensor] = nn.Identity(),
             hflip_tta: bool = False, translate_tta: int = 0) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and cross-entropy over the whole loader, summed over ranks.

    ``prepare`` turns a loaded batch (on the device) into network input (the batched pipeline's
    resize/crop/normalise; identity for the per-sample pipeline). ``hflip_tta`` averages the class
    probabilities of each image and its mirror image (test-time augmentation); ``translate_tta=d`` (airbench's
    TTA) gives weight 1/2 to the image and 1/4 to each of its two diagonal shifts by ``d`` px (reflect-padded),
    each with its mirror image when ``hflip_tta``."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    for images, labels, _ in loader:
        if labels.numel() == 0:
            continue
        images = prepare(images.to(device, non_blocking=True))
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        views = _tta_views(images, hflip_tta, translate_tta)
        with autocast():
            if len(views) == 1:
                logits = model(images).float()
            else:  # log of the weighted mean probability: top-k and the loss below read it like logits
                logits = torch.logsumexp(torch.stack([model(v).float().log_softmax(1) + math.log(w) for v, w in views]), 0)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        totals += torch.stack([hits[:, 0].sum(), hits.any(1).sum(),
                               nn.functional.cross_entropy(logits, labels, reduction="sum"),
                               torch.tensor(labels.numel(), device=device)]).double()
    all_reduce_sum(totals)
    c1, c5, loss, n = totals.tolist()
    n = max(n, 1)
    return {"top1": 100 * c1 / n, "top5": 100 * c5 / n, "loss": loss / n, "images": int(n)}


def _resizer(size: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The teacher's view of a batch: resized to ``size`` (bilinear, antialiased when shrinking), or as it is."""
    if size is None:
        return lambda images: images

    def resize(images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] == (size, size):
            return images
        return nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                                         antialias=True)

    return resize


def build_data(cfg: Config, mean: list[float], std: list[float], dist_info: DistInfo, with_train: bool = True):
    """Loaders and device-side preparation for ``data.pipeline``.

    Returns ``(train_loader, val_loader, train_prepare, val_prepare, sampler, num_classes)``. Batches
    are ``(images, labels, n_skipped)``; ``*_prepare`` maps loaded images on the device to network input.
    The train order comes from a ``DistributedSampler`` also for one process: it is a function of (seed,
    epoch), and each sample is augmented under its own seed, so a resumed run sees the same batches; drop_last
    keeps ranks in step. Both train loaders take ``.skip`` (batches to leave out: resuming inside an epoch).
    ``with_train=False`` (evaluation) builds no training data (train_loader and sampler are None).
    """
    t, d = cfg.train, cfg.data
    if resolve_pipeline(d) == "tensor":
        (x_train, y_train), (x_val, y_val), num_classes, _ = build_tensors(d)
        # augmented per batch on the device from the (checkpointed) training RNG: no per-sample seeds
        sampler = DistributedSampler(range(len(y_train)), num_replicas=dist_info.world_size, rank=dist_info.rank,
                                     shuffle=True, seed=t.seed, drop_last=True)
        train_loader = TensorLoader(x_train, y_train, t.batch_size, sampler, drop_last=True)
        val_loader = TensorLoader(x_val, y_val, t.batch_size,
                                  ShardSampler(len(y_val), dist_info.rank, dist_info.world_size))
        train_prepare = BatchAugment(d, mean, std, cfg.model.in_chans, train=True).to(dist_info.device)
        val_prepare = BatchAugment(d, mean, std, cfg.model.in_chans, train=False).to(dist_info.device)
        return train_loader, val_loader, train_prepare, val_prepare, sampler, num_classes
    hybrid = resolve_pipeline(d) == "hybrid"  # uint8 from the workers; colour and normalisation per batch here
    train_ds, val_ds, num_classes, _ = build_datasets(d, mean, std, cfg.model.in_chans, with_train=with_train,
                                                      uint8=hybrid)
    train_prepare, val_prepare = nn.Identity(), nn.Identity()
    if hybrid:
        val_prepare = BatchAugment(d, mean, std, cfg.model.in_chans, train=False, geometry=False).to(dist_info.device)
        if with_train:
            train_prepare = BatchAugment(d, mean, std, cfg.model.in_chans, train=True, geometry=False).to(dist_info.device)
    workers = default_workers(d.workers)
    # Its own generator: validation never draws from the training RNG stream (exact resume).
    val_loader = build_loader(val_ds, batch_size=t.batch_size, workers=workers,
                              sampler=ShardSampler(len(val_ds), dist_info.rank, dist_info.world_size),
                              generator=torch.Generator().manual_seed(t.seed))
    if not with_train:
        return None, val_loader, train_prepare, val_prepare, None, num_classes
    sampler = SeededSampler(DistributedSampler(train_ds, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                               shuffle=True, seed=t.seed, drop_last=True), t.seed, dist_info.rank)
    batches = SkipBatches(torch.utils.data.BatchSampler(sampler, t.batch_size, drop_last=True))
    # Persistent workers: the augmentation of a sample depends only on (seed, epoch, rank, index).
    train_loader = torch.utils.data.DataLoader(
        SeededDataset(train_ds), batch_sampler=batches, num_workers=workers, collate_fn=collate_skip_none,
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
        # its own generator: starting the loader never draws from the (checkpointed) training RNG
        generator=torch.Generator().manual_seed(t.seed))
    return train_loader, val_loader, train_prepare, val_prepare, sampler, num_classes


def weight_ema(model: nn.Module, decay: float) -> WeightEMA:
    """``train.ema_decay``: ``ema = decay * ema + (1 - decay) * w`` of every parameter and buffer (BN
    statistics too) after each ``update_parameters(model)``, on the device without a host sync
    (``runtime.ema``); the first update copies the weights. ``.module`` is the averaged network."""
    if not 0.0 < decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in (0, 1) (0 = off), got {decay}")
    return WeightEMA(model, decay)


def data_init_images(loader, val_prepare: Callable[[torch.Tensor], torch.Tensor], count: int,
                     device: torch.device) -> torch.Tensor:
    """The first ``count`` training images as the network sees them, for a backbone's ``init_from_data``
    (airbench's patch whitening): unaugmented (``val_prepare``) from the in-memory pipeline, as airbench
    does; the per-sample pipelines' batches come augmented (``data.pipeline=hybrid``: geometrically, the colour
    jitter left out)."""
    if isinstance(loader, TensorLoader):
        return val_prepare(loader.images[:count].to(device))
    chunks, have = [], 0
    for images, _, _ in loader:
        chunks.append(val_prepare(images.to(device)))
        have += images.shape[0]
        if have >= count:
            break
    return torch.cat(chunks)[:count]


def _forward_kept(model: nn.Module, images: torch.Tensor, n_skipped: int, batch_size: int) -> torch.Tensor:
    """``model(images)``; a batch that ``data.skip_corrupt`` left with one image, where BatchNorm cannot train on
    one value per channel, is an error saying so (instead of BatchNorm's own)."""
    try:
        return model(images)
    except ValueError as e:
        if not (n_skipped and images.shape[0] == 1 and "Expected more than 1 value per channel" in str(e)):
            raise
        raise DataError(f"a training batch kept 1 of its {batch_size} images: data.skip_corrupt skipped "
                        f"{n_skipped} unreadable ones (the warnings above name them), and BatchNorm cannot train on "
                        "one image whose feature map is 1x1; fix or delete those files, or raise "
                        "train.batch_size") from e


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
    check_bounds(cfg)
    if cfg.model.sync_bn and device.type != "cuda":
        raise ConfigError("model.sync_bn=true needs CUDA: torch's SyncBatchNorm has no CPU kernel")
    if cfg.distill.teacher_img_size is not None and (cfg.distill.teacher_img_size < 1 or not cfg.distill.teacher):
        raise ConfigError(f"distill.teacher_img_size={cfg.distill.teacher_img_size}: give the teacher's input size "
                          "in pixels with distill.teacher set, or null (the student's batch as it is)")
    if not cfg.distill.teacher and (cfg.distill.teacher_weights or cfg.distill.teacher_kwargs):
        given = "distill.teacher_weights" if cfg.distill.teacher_weights else "distill.teacher_kwargs"
        raise ConfigError(f"{given} is set but distill.teacher is not, so nothing would be distilled: name the "
                          "teacher's backbone with distill.teacher (e.g. distill.teacher=resnet101d)")
    if cfg.distill.teacher and not cfg.distill.teacher_weights:
        raise ConfigError("distill.teacher is set but distill.teacher_weights is not: a randomly initialised "
                         "teacher teaches nothing. Point distill.teacher_weights at a trained checkpoint")
    torch.manual_seed(t.seed + dist_info.rank)

    # ---- data -------------------------------------------------------------------------------------
    mean, std = normalization(cfg)
    train_loader, val_loader, train_prepare, val_prepare, sampler, num_classes = build_data(cfg, mean, std, dist_info)
    steps_per_epoch = len(train_loader) // t.accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(f"the training set ({len(sampler)} images per process) is smaller than one global batch "
                         f"({t.batch_size} x {dist_info.world_size} x {t.accum_steps})")
    total_steps = t.epochs * steps_per_epoch

    # ---- model, teacher, optimizer, schedule --------------------------------------------------------
    memory_format = memory_format_for(cfg.model.channels_last)
    model = build_model(cfg, num_classes).to(device, memory_format=memory_format)
    precision = setup_precision(t.precision, device, channels_last=cfg.model.channels_last, model=model)
    if cfg.model.sync_bn and dist_info.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.model.weights is None and model.data_init_images > 0:  # (a resumed run loads its weights over it)
        model.init_from_data(data_init_images(train_loader, val_prepare, model.data_init_images, device))
    teacher = None
    if cfg.distill.teacher:
        with backbone_config_errors("distill.teacher", cfg.distill.teacher_kwargs, "distill.teacher_kwargs"):
            try:
                teacher = create_backbone(cfg.distill.teacher, weights=cfg.distill.teacher_weights,
                                          num_classes=num_classes, in_chans=cfg.model.in_chans,
                                          **cfg.distill.teacher_kwargs)
            except WeightsError as e:  # the teacher's file: say which key, and that it must know these classes
                raise WeightsError(f"distill.teacher_weights: {e} (the teacher is built with this run's "
                                   f"{num_classes} classes, data.num_classes: it must have been trained on them)") from None
        teacher = teacher.to(device, memory_format=memory_format).eval()
        teacher.requires_grad_(False)
    teacher_view = _resizer(cfg.distill.teacher_img_size)

    global_batch = t.batch_size * dist_info.world_size * t.accum_steps
    base_lr = scale_lr(cfg.optim.lr, global_batch, REFERENCE_BATCH)  # linear scaling rule
    o = cfg.optim
    optimizer = build_optimizer(model, lr=base_lr, momentum=o.momentum, nesterov=o.nesterov,
                                weight_decay=o.weight_decay, no_bias_decay=o.no_bias_decay)
    scheduler = build_scheduler(optimizer, base_lr=base_lr, total_steps=total_steps,
                                warmup_steps=epochs_to_steps(o.warmup_epochs, steps_per_epoch, at_least_one=True),
                                schedule=o.schedule, gamma=o.gamma,
                                milestones=[epochs_to_steps(m, steps_per_epoch) for m in o.milestones])
    stepper = OptimizerStep(optimizer, scheduler, precision.scaler, accum_steps=t.accum_steps,
                            max_nonfinite=t.max_nonfinite)
    criterion = ClassificationLoss(label_smoothing=t.label_smoothing, temperature=cfg.distill.temperature)
    ema = weight_ema(model, t.ema_decay) if t.ema_decay else None
    eval_model = ema.module if ema is not None else None  # None: the trained model (set below)

    # ---- resume: weights, optimizer, schedule, scaler, every rank's RNG, the step inside the epoch ----
    step, best_top1 = 0, -1.0
    metrics: dict[str, Any] = {}
    resume_path = resolve_resume(t.resume, out)
    if resume_path is not None:
        ckpt = load_training_checkpoint(resume_path, to_dict(cfg))
        check_fits(model, ckpt["model"], resume_path, f"this run's {cfg.model.name} ({num_classes} classes)", ckpt)
        restore_training_state(ckpt, model, stepper)
        if ema is not None:
            if "ema" not in ckpt:
                raise ConfigError(f"train.ema_decay={t.ema_decay} but {resume_path} holds no weight average (written "
                                  "without train.ema_decay): resume with train.ema_decay=0 or start a new run")
            ema.load_state_dict(ckpt["ema"])
        step, best_top1 = ckpt["step"], ckpt["best_top1"]
        metrics = dict(ckpt["metrics"])  # a finished run resumed again just re-exports its result
        restore_rng_states(ckpt["rng"], dist_info.rank, dist_info.world_size)
        if is_main:
            log.info("resumed from %s at step %d (epoch %d)", resume_path, step, step // steps_per_epoch)
    start_epoch = step // steps_per_epoch
    if resume_path is not None and step > total_steps and is_main:
        log.warning("train.epochs=%s ends at step %d but %s is at step %d (epoch %d): nothing is trained, and the "
                    "result is that checkpoint's; raise train.epochs to train on", t.epochs, total_steps, resume_path,
                    step, start_epoch)

    train_model: nn.Module = model
    if t.compile:
        train_model = torch.compile(model)
    if dist_info.distributed:
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    eval_model = eval_model if eval_model is not None else train_model

    logger = RunLogger(out, enabled=is_main, resumed_step=step if resume_path is not None else None,
                       resume=t.resume)
    if is_main:
        log.info("%s on %s: %d train / %d val images, %d classes, %d process(es) x %d images x %d accumulation "
                 "= %d global batch, lr %.4g, %d steps", cfg.model.name, cfg.data.name,
                 len(sampler) * dist_info.world_size, len(val_loader.sampler) * dist_info.world_size,
                 num_classes, dist_info.world_size, t.batch_size, t.accum_steps, global_batch, base_lr, total_steps)

    def checkpoint(epochs_done: int, best: bool = False) -> None:
        """last.pth (and best.pth): every rank gathers its RNG state, rank 0 writes (atomically)."""
        stepper.check_diverged(f"step {step}", str(out / "last.pth"))  # never a checkpoint after divergence
        rngs = gather_rng_states()
        if is_main:
            state = training_state(model, stepper, step=step, epoch=epochs_done, best_top1=best_top1,
                                   metrics=metrics, rng=rngs, config=to_dict(cfg),
                                   normalization={"mean": list(mean), "std": list(std)},  # as resolved
                                   **({"ema": ema.state_dict()} if ema is not None else {}))
            save_checkpoint(state, out / "last.pth")
            if best:
                save_checkpoint(state, out / "best.pth")

    # ---- the loop -----------------------------------------------------------------------------------
    end_step = min(total_steps, t.max_steps or total_steps)
    progress = Progress(end_step, step, enabled=is_main, logger=log)
    skipped_images = 0
    for epoch in range(start_epoch, t.epochs):
        sampler.set_epoch(epoch)
        first = step - epoch * steps_per_epoch  # > 0 when resuming inside this epoch
        _skip(train_loader, first * t.accum_steps)
        use_mixup = t.mixup_alpha > 0 and epoch < t.epochs - t.mixup_off_epochs
        train_model.train()
        meter = LossMeter(device)
        tic, images_seen = time.perf_counter(), 0
        batches = iter(train_loader)
        for _ in range(first, steps_per_epoch):
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
                with stepper.no_sync(train_model, micro):
                    with precision.autocast():
                        logits = _forward_kept(train_model, images, n_skipped, t.batch_size)
                        with torch.no_grad():
                            teacher_logits = teacher(teacher_view(images)) if teacher is not None else None
                    loss = criterion(logits, targets, teacher_logits)
                    stepper.backward(loss)
                step_loss += loss.detach() / t.accum_steps
                images_seen += images.shape[0]
            lr = optimizer.param_groups[0]["lr"]  # the lr this step uses (logged below)
            stepped = stepper.step(step_loss)
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            progress.update(t.batch_size * t.accum_steps * dist_info.world_size)
            meter.add(stepped, loss=step_loss)
            if step % t.log_every == 0 or step == end_step:
                # The only host syncs of the loop: here, every log_every steps (and at evaluations and checkpoints).
                stepper.check_diverged(f"epoch {epoch}, step {step}", str(out / "last.pth"))
                mean_loss = meter.mean()["loss"]
                shown = progress.report(step, loss=mean_loss, lr=lr)
                logger.log("train", step, epoch=step / steps_per_epoch, loss=mean_loss, lr=lr,
                           img_per_s=shown["img_per_s"])
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step % steps_per_epoch:
                checkpoint(epoch)  # inside the epoch; the epoch's end writes its own below
            if step >= end_step:
                break
        train_time = time.perf_counter() - tic
        stepper.check_diverged(f"end of epoch {epoch + 1}", str(out / "last.pth"))  # before evaluating

        last_epoch = epoch == t.epochs - 1 or step >= end_step
        is_best = False
        if last_epoch:  # the trained model is on disk before the final evaluation can fail
            metrics = {}  # without a result: resuming from this checkpoint evaluates (below the loop)
            checkpoint(epoch + 1)
        if (t.eval_every and (epoch + 1) % t.eval_every == 0) or last_epoch:
            metrics = evaluate(eval_model, val_loader, device, precision.autocast, cfg.model.channels_last,
                               val_prepare, cfg.data.val_hflip_tta, cfg.data.val_translate_tta)
            metrics.update(epoch=epoch + 1, train_time_s=train_time,
                           train_img_per_s=images_seen * dist_info.world_size / train_time)
            logger.log("val", step, **metrics)
            is_best = metrics["top1"] > best_top1
            best_top1 = max(best_top1, metrics["top1"])
            if is_main:
                log.info("epoch %d/%d: top-1 %.2f%%, top-5 %.2f%%, val loss %.4f, %.0f img/s", epoch + 1, t.epochs,
                         metrics["top1"], metrics["top5"], metrics["loss"], metrics["train_img_per_s"])
        skipped_total = int(all_reduce_sum(torch.tensor(skipped_images, device=device)).item())
        if skipped_total and is_main:
            log.warning("%d unreadable images skipped so far (data.skip_corrupt=true)", skipped_total)
        checkpoint(epoch + 1, best=is_best)
        for callback in callbacks:
            callback(epoch, metrics)
        if last_epoch:
            break
    progress.close()
    if "top1" not in metrics:  # resumed from the checkpoint written before a final evaluation that failed
        metrics = evaluate(eval_model, val_loader, device, precision.autocast, cfg.model.channels_last,
                           val_prepare, cfg.data.val_hflip_tta, cfg.data.val_translate_tta)

    if is_main:
        metrics["skipped_images"] = skipped_images
        # with train.ema_decay: the averaged weights, the ones evaluated
        save_weights(ema.module if ema is not None else model, out / "model.safetensors", metadata={
            # what the network was trained on (the backbone's defaults otherwise): exports print these
            "mean": list(mean), "std": list(std),
            "input_size": [cfg.model.in_chans, cfg.data.val_crop, cfg.data.val_crop],
            "provenance": f"tricks train ({cfg.data.name}, {t.epochs} epochs)", "top1": metrics.get("top1"),
            "top5": metrics.get("top5"), "dataset": cfg.data.name, "config": to_dict(cfg)})
        plot_run(out)
        log.info("wrote %s, %s and plots", out / "model.safetensors", out / "metrics.jsonl")
    logger.close()
    return metrics


def _skip(loader, batches: int) -> None:
    """Leave the first ``batches`` batches out of the loader's next pass (resuming inside an epoch)."""
    target = loader.batch_sampler if hasattr(loader, "batch_sampler") and hasattr(loader.batch_sampler, "skip") else loader
    target.skip = batches


def evaluate_checkpoint(cfg: Config, checkpoint: str) -> dict[str, float]:
    """``tricks eval``: top-1/top-5 of a checkpoint (suite ``.pth``/``.safetensors``, timm, torchvision)."""
    dist_info = init_distributed()
    try:
        device = dist_info.device
        mean, std = normalization(cfg, checkpoint)
        _, loader, _, prepare, _, num_classes = build_data(cfg, mean, std, dist_info, with_train=False)
        # strict: a classifier of another size is an error naming both sizes, not a random head
        model = create_backbone(cfg.model.name, weights=checkpoint, num_classes=num_classes,
                                in_chans=cfg.model.in_chans, norm_eval=True, **model_kwargs(cfg))
        model = model.to(device, memory_format=memory_format_for(cfg.model.channels_last))
        return evaluate(model, loader, device, autocast_for(cfg.train.precision, device, model), cfg.model.channels_last,
                        prepare, cfg.data.val_hflip_tta, cfg.data.val_translate_tta)
    finally:
        cleanup_distributed()
