"""The torchvision detection engine: Faster R-CNN + FPN on a registry backbone, trained on PASCAL VOC
and evaluated with the devkit's VOC07 mAP.

One loop, top to bottom, as the classification trainer: iteration-based (detectron2's convention),
linear lr scaling per 16 images, warm-up then step decay, AMP, DDP (torchrun), atomic checkpoints and
``train.resume=auto`` that continues exactly (model, optimizer, schedule, scaler, RNG, iteration).
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler, Subset

from classification.checkpoint import (load_checkpoint, resolve_resume, restore_training_state, rng_state,
                                       save_checkpoint, set_rng_state)
from classification.distributed import DistInfo, ShardSampler, cleanup_distributed, init_distributed
from classification.logger import RunLogger
from classification.optim import build_optimizer
from classification.schedules import build_scheduler
from classification.train import autocast_for
from runtime.config import dump_config

from .config import DetectionConfig
from .model import build_faster_rcnn
from .voc import VOC_CLASSES, build_voc
from .voc_eval import VOCBoxes, evaluate_voc

log = logging.getLogger("detection")


class _ToModelInput:
    """``(uint8 image, VOC target)`` -> ``(float image in 0-1, {"boxes", "labels"})`` with label 0 the
    background, as torchvision's detection models take them."""

    def __call__(self, image, target):
        return image.float().div(255), {"boxes": target["boxes"].as_subclass(torch.Tensor).float(),
                                        "labels": target["labels"] + 1}


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """Mirror an image [C, H, W] and its XYXY boxes (continuous coordinates: x -> W - x)."""
    width = image.shape[-1]
    boxes = target["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([width, 0, width, 0])
    return image.flip(-1), {**target, "boxes": boxes.to(target["boxes"].dtype)}


class _SkipSampler(Sampler[int]):
    """The wrapped sampler's order without its first ``skip`` items (resuming inside an epoch without
    loading what the interrupted run already used)."""

    def __init__(self, sampler: Sampler[int]):
        self.sampler, self.skip = sampler, 0

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return len(self.sampler) - self.skip


def _collate(batch):
    return tuple(zip(*batch))


def build_model(cfg: DetectionConfig):
    m = cfg.model
    return build_faster_rcnn(m.backbone, num_classes=len(VOC_CLASSES) + 1, weights=m.weights,
                             frozen_stages=m.frozen_stages,
                             norm_layer="frozenbatchnorm" if m.norm == "frozenbatchnorm" else None,
                             min_size=tuple(m.min_size_train), max_size=m.max_size)


@torch.no_grad()
def evaluate_detector(model, cfg: DetectionConfig, dist_info: DistInfo) -> dict[str, Any]:
    """VOC07 11-point mAP (%) of ``model`` on ``data.test_splits``, per-class AP included. Images are
    sharded over ranks; every rank returns the same result."""
    dataset = build_voc(cfg.data.root, cfg.data.test_splits, keep_difficult=True)
    indices = list(ShardSampler(len(dataset), dist_info.rank, dist_info.world_size))
    # Its own generator: evaluation never draws from the training RNG stream (exact resume).
    loader = DataLoader(Subset(dataset, indices), batch_size=cfg.train.batch_size, num_workers=cfg.data.workers,
                        collate_fn=_collate, generator=torch.Generator().manual_seed(0))
    core = model.module if isinstance(model, DistributedDataParallel) else model
    train_sizes, core.transform.min_size = core.transform.min_size, (cfg.model.min_size_test,)
    was_training = core.training
    core.eval()
    autocast = autocast_for(cfg.train.precision, dist_info.device)
    predictions: dict[int, VOCBoxes] = {}
    position = 0
    try:
        for images, _ in loader:
            with autocast():
                outputs = core([im.float().div(255).to(dist_info.device) for im in images])
            for out in outputs:
                predictions[indices[position]] = VOCBoxes(out["boxes"].float().cpu().numpy(),
                                                          out["labels"].cpu().numpy() - 1,
                                                          scores=out["scores"].float().cpu().numpy())
                position += 1
    finally:
        core.transform.min_size = train_sizes
        core.train(was_training)
    if dist_info.distributed:
        gathered: list[Any] = [None] * dist_info.world_size
        torch.distributed.all_gather_object(gathered, predictions)
        predictions = {k: v for part in gathered for k, v in part.items()}
    truth = []
    for i in range(len(dataset)):
        ann = dataset.annotation(i)
        truth.append(VOCBoxes(ann.boxes, ann.labels, difficult=ann.difficult))
    result = evaluate_voc([predictions[i] for i in range(len(dataset))], truth, len(VOC_CLASSES),
                          use_07_metric=True)
    return {"mAP": 100 * result["mAP"], "images": len(dataset),
            "AP": {name: 100 * float(ap) for name, ap in zip(VOC_CLASSES, result["ap"])}}


def train_detector(cfg: DetectionConfig) -> dict[str, Any]:
    """Train on ``data.train_splits``, evaluate on ``data.test_splits``; returns the final metrics."""
    dist_info = init_distributed()
    try:
        return _train(cfg, dist_info)
    finally:
        cleanup_distributed()


def _train(cfg: DetectionConfig, dist_info: DistInfo) -> dict[str, Any]:
    t, o = cfg.train, cfg.optim
    device, out, is_main = dist_info.device, Path(cfg.output_dir), dist_info.is_main
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    if cfg.model.norm == "frozenbatchnorm" and cfg.model.weights is None:
        raise ValueError("model.norm=frozenbatchnorm with model.weights unset freezes randomly initialised BN, and "
                         "Faster R-CNN then diverges: set model.weights to a pretrained backbone (model.safetensors "
                         "of a classification run) or use model.norm=batchnorm")
    torch.manual_seed(t.seed + dist_info.rank)

    # Workers only decode (deterministic); the random flip is drawn in the loop from the checkpointed
    # RNG, and the loader has its own generator, so a resumed run continues the same random stream.
    dataset = build_voc(cfg.data.root, cfg.data.train_splits, keep_difficult=False, transforms=_ToModelInput())
    sampler = DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True,
                                 seed=t.seed, drop_last=True)
    resumable = _SkipSampler(sampler)
    loader = DataLoader(dataset, batch_size=t.batch_size, sampler=resumable, num_workers=cfg.data.workers,
                        collate_fn=_collate, drop_last=True, generator=torch.Generator().manual_seed(t.seed))
    per_epoch = len(sampler) // t.batch_size
    if per_epoch == 0:
        raise ValueError(f"{cfg.data.train_splits} has {len(dataset)} images: fewer than one batch per process "
                         f"({t.batch_size} x {dist_info.world_size})")

    model = build_model(cfg).to(device)
    train_model = model
    if dist_info.distributed:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    global_batch = t.batch_size * dist_info.world_size
    base_lr = o.lr * global_batch / 16  # linear scaling, detectron2's reference batch of 16
    optimizer = build_optimizer(model, lr=base_lr, momentum=o.momentum, nesterov=False,
                                weight_decay=o.weight_decay, no_bias_decay=o.no_bias_decay)
    scheduler = build_scheduler(optimizer, base_lr=base_lr, total_steps=t.max_iter, warmup_steps=o.warmup_iters,
                                schedule="step", milestones=o.milestones, gamma=o.gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    autocast = autocast_for(t.precision, device)
    logger = RunLogger(out, enabled=is_main)

    start = 0
    resume = resolve_resume(t.resume, out)
    if resume is not None:
        ckpt = load_checkpoint(resume)
        restore_training_state(ckpt, model, optimizer, scheduler, scaler)
        start = ckpt["iteration"]
        set_rng_state(ckpt["rng"][dist_info.rank])
        log.info("resumed from %s at iteration %d", resume, start)

    def checkpoint(iteration: int) -> None:
        states: list[Any] = [rng_state()]
        if dist_info.distributed:
            states = [None] * dist_info.world_size
            torch.distributed.all_gather_object(states, rng_state())
        if is_main:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                             "iteration": iteration, "rng": states}, out / "last.pth")

    # The data order is a function of (seed, epoch): a resumed run draws the same batches.
    epoch = start // per_epoch
    sampler.set_epoch(epoch)
    resumable.skip = (start % per_epoch) * t.batch_size
    batches = iter(loader)
    metrics: dict[str, Any] = {}
    train_model.train()
    tic, window = time.perf_counter(), 0
    for iteration in range(start, t.max_iter):
        try:
            images, targets = next(batches)
        except StopIteration:
            epoch += 1
            sampler.set_epoch(epoch)
            resumable.skip = 0
            batches = iter(loader)
            images, targets = next(batches)
        if cfg.data.hflip > 0:
            flips = (torch.rand(len(images)) < cfg.data.hflip).tolist()
            pairs = [hflip(im, tg) if f else (im, tg) for im, tg, f in zip(images, targets, flips)]
            images, targets = [p[0] for p in pairs], [p[1] for p in pairs]
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in tg.items()} for tg in targets]
        with autocast():
            losses = train_model(images, targets)
        loss = sum(losses.values())
        total = float(loss.detach())  # also the sync point that makes img/s honest on CUDA
        if not math.isfinite(total) and not scaler.is_enabled():
            raise FloatingPointError(
                f"non-finite loss at iteration {iteration} ({ {k: float(v) for k, v in losses.items()} }); "
                f"stopped. The last good checkpoint is {out / 'last.pth'}. Lower optim.lr or raise optim.warmup_iters")
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # fp16: skipped when the gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        window += global_batch
        done = iteration + 1
        if done % t.log_every == 0 or done == t.max_iter:
            rate = window / max(time.perf_counter() - tic, 1e-9)
            values = {k: float(v.detach()) for k, v in losses.items()}
            logger.log("train", done, loss=total, lr=optimizer.param_groups[0]["lr"], img_per_s=rate, **values)
            if is_main:
                eta = (t.max_iter - done) * global_batch / max(rate, 1e-9)
                log.info("iter %d/%d  loss %.4f  lr %.4g  %.1f img/s  ETA %s", done, t.max_iter, total,
                         optimizer.param_groups[0]["lr"], rate, time.strftime("%H:%M:%S", time.gmtime(eta)))
            tic, window = time.perf_counter(), 0
        if done % t.checkpoint_every == 0 or done == t.max_iter:
            checkpoint(done)
        if (t.eval_every and done % t.eval_every == 0) or done == t.max_iter:
            metrics = evaluate_detector(model, cfg, dist_info)
            logger.log("val", done, mAP=metrics["mAP"], **{f"AP/{k}": v for k, v in metrics["AP"].items()})
            if is_main:
                log.info("iter %d: VOC07 mAP %.2f%% (%d images)", done, metrics["mAP"], metrics["images"])
            train_model.train()
    if not metrics:  # a finished run resumed again: nothing to train, report its result
        metrics = evaluate_detector(model, cfg, dist_info)
    if is_main:
        torch.save(model.state_dict(), out / "model_final.pth")
    logger.close()
    return metrics


def evaluate_checkpoint(cfg: DetectionConfig, checkpoint: str) -> dict[str, Any]:
    """VOC07 mAP of a saved detector (``model_final.pth`` or ``last.pth`` of a run)."""
    dist_info = init_distributed()
    try:
        model = build_model(cfg)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        return evaluate_detector(model.to(dist_info.device), cfg, dist_info)
    finally:
        cleanup_distributed()
