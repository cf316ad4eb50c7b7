"""The torchvision detection engine: Faster R-CNN + FPN on a registry backbone, trained on a VOC-layout
dataset (PASCAL VOC, or your own classes through ``data.classes``) and evaluated with the devkit's mAP, or
on a COCO-format dataset (``data.format: coco``) evaluated with pycocotools' COCOeval.

One loop, top to bottom, on the shared runtime: iteration-based (detectron2's convention), linear lr
scaling per 16 images, warm-up then step decay, AMP, DDP (torchrun), the common non-finite policy, atomic
checkpoints and ``train.resume=auto`` that continues exactly (model, optimizer, schedule, scaler, every
rank's RNG and position in its epoch). Images stay uint8 through the DataLoader workers, are flipped there
by torchvision.transforms.v2 (boxes move with them) under a per-sample seed, and batches are grouped by
aspect ratio as torchvision's references and detectron2 do.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from runtime.checkpoint import (gather_per_rank, gather_rng_states, load_training_checkpoint, resolve_resume,
                                restore_rng_states, restore_training_state, save_checkpoint, training_state)
from runtime.config import ConfigError, check_bounds, dump_config, to_dict
from runtime.data import (EpochStream, GroupedBatchSampler, SeededDataset, SeededSampler, SkipBatches, default_workers,
                          normalization)
from runtime.distributed import DistInfo, ShardSampler, cleanup_distributed, init_distributed
from runtime.logger import LossMeter, Progress, RunLogger, plot_run
from runtime.optim import build_optimizer
from runtime.precision import autocast_for, setup_precision
from runtime.schedules import build_scheduler, scale_lr, schedule_for_batch
from runtime.step import OptimizerStep
from runtime.strict import check_fits, load_model_strictly

from .config import REFERENCE_BATCH, DetectionConfig, check_sync_bn, rpn_topk
from .model import build_faster_rcnn
from .visualize import save_detection_pictures
from .coco import build_detection_set, check_checkpoint_classes, dataset_classes
from .coco_eval import describe_metrics
from .voc_eval import VOCBoxes, evaluate_voc, evaluate_voc_iou_range

log = logging.getLogger("detection")



class TrainTransform:
    """``(uint8 image, VOC target)`` -> the same uint8 image, randomly mirrored by torchvision.transforms.v2
    (the boxes move with it), and ``{"boxes", "labels"}`` with label 0 the background, as torchvision's
    detection models take them. Conversion to float happens on the device."""

    def __init__(self, hflip: float):
        from torchvision.transforms import v2

        self.flip = v2.RandomHorizontalFlip(hflip) if hflip > 0 else None

    def __call__(self, image, target):
        boxes = target["boxes"]
        if self.flip is not None:
            image, boxes = self.flip(image, boxes)
        return image.as_subclass(torch.Tensor), {"boxes": boxes.as_subclass(torch.Tensor).float(),
                                                 "labels": target["labels"] + 1}


def _collate(batch):
    return tuple(zip(*batch))


def build_model(cfg: DetectionConfig, num_classes: int):
    """Faster R-CNN + FPN with ``num_classes`` object classes (+1 background)."""
    m = cfg.model
    if m.arch != "fpn":
        raise ConfigError(f"model.arch={m.arch!r}: the torchvision engine builds Faster R-CNN + FPN; C4 runs on "
                         "engine=detectron2")
    mean, std = normalization(cfg.data.mean, cfg.data.std, m.backbone, 3, m.kwargs, weights=m.weights)  # as d2's
    pre_train, post_train, pre_test, post_test = rpn_topk(m)
    return build_faster_rcnn(m.backbone, num_classes=num_classes + 1, weights=m.weights,
                             frozen_stages=m.frozen_stages,
                             norm_layer="frozenbatchnorm" if m.norm == "frozenbatchnorm" else None,
                             backbone_kwargs=m.kwargs, fpn_channels=m.fpn_channels, box_fc_dim=m.box_fc_dim,
                             image_mean=mean, image_std=std,
                             min_size=tuple(m.min_size_train), max_size=m.max_size, anchor_sizes=m.anchor_sizes,
                             rpn_pre_nms_top_n_train=pre_train, rpn_post_nms_top_n_train=post_train,
                             rpn_pre_nms_top_n_test=pre_test, rpn_post_nms_top_n_test=post_test,
                             box_batch_size_per_image=m.roi_batch_per_image, box_score_thresh=m.score_thresh_test,
                             box_detections_per_img=m.detections_per_image, channels_last=m.channels_last,
                             roi_align=m.roi_align)


def sync_batchnorm(model: nn.Module, cfg: DetectionConfig, dist_info: DistInfo) -> nn.Module:
    """``model`` with its BN as SyncBatchNorm when ``model.sync_bn`` and the run is distributed, else as is."""
    if cfg.model.sync_bn and dist_info.distributed:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


@torch.no_grad()
def evaluate_detector(model, cfg: DetectionConfig, dist_info: DistInfo, dataset=None) -> dict[str, Any]:
    """VOC07 11-point mAP (%) of ``model`` on ``data.test_splits``, per-class AP included, and the
    ``detections`` per image id (for the VOC results format). Images are sharded over ranks; every rank
    returns the same result. ``dataset``: the test set, if already built
    (its annotations are parsed once per run, not at every evaluation)."""
    if dataset is None:
        dataset = build_test_set(cfg)
    indices = list(ShardSampler(len(dataset), dist_info.rank, dist_info.world_size))
    # Its own generator: evaluation never draws from the training RNG stream (exact resume).
    loader = DataLoader(Subset(dataset, indices), batch_size=cfg.train.batch_size,
                        num_workers=default_workers(cfg.data.workers), collate_fn=_collate,
                        generator=torch.Generator().manual_seed(0))
    core = model.module if isinstance(model, DistributedDataParallel) else model
    if dist_info.distributed:
        # DDP broadcasts rank 0's buffers at the start of each training forward, which then updates every rank's
        # BN running statistics with its own batch: each shard is evaluated with rank 0's, the checkpoint's.
        for buffer in core.buffers():
            torch.distributed.broadcast(buffer, src=0)
    train_sizes, core.transform.min_size = core.transform.min_size, (cfg.model.min_size_test,)
    was_training = core.training
    core.eval()
    autocast = autocast_for(cfg.train.precision, dist_info.device, core)
    predictions: dict[int, VOCBoxes] = {}
    position = 0
    try:
        for images, _ in loader:
            with autocast():
                outputs = core([im.to(dist_info.device).float().div(255) for im in images])
            for out in outputs:
                predictions[indices[position]] = VOCBoxes(out["boxes"].float().cpu().numpy(),
                                                          out["labels"].cpu().numpy() - 1,
                                                          scores=out["scores"].float().cpu().numpy())
                position += 1
    finally:
        core.transform.min_size = train_sizes
        core.train(was_training)
    predictions = {k: v for part in gather_per_rank(predictions) for k, v in part.items()}
    if getattr(cfg.data, "format", "voc") == "coco":  # COCOeval on the JSON's own records
        from .coco_eval import engine_metrics, evaluate_dataset

        detections = {dataset.image_id(i): predictions[i] for i in range(len(dataset))}
        result = evaluate_dataset(dataset, detections)
        return {**engine_metrics(result, len(dataset)), "detections": detections, "results": result["results"]}
    truth = []
    for i in range(len(dataset)):
        ann = dataset.annotation(i)
        truth.append(VOCBoxes(ann.boxes, ann.labels, difficult=ann.difficult))
    classes = dataset.classes
    ranked = [predictions[i] for i in range(len(dataset))]
    result = evaluate_voc(ranked, truth, len(classes), use_07_metric=True)
    iou_range = evaluate_voc_iou_range(ranked, truth, len(classes), use_07_metric=True)  # detectron2's AP, AP75
    return {"mAP": 100 * result["mAP"], "ap": 100 * iou_range["AP"], "ap75": 100 * iou_range["AP75"],
            "images": len(dataset),
            "AP": {name: 100 * float(ap) for name, ap in zip(classes, result["ap"])},
            "detections": {dataset.image_id(i): predictions[i] for i in range(len(dataset))}}


def build_test_set(cfg: DetectionConfig):
    # The training set's classes (a COCO test JSON may list its categories otherwise); every image decoded now.
    return build_detection_set(cfg.data, train=False, classes=dataset_classes(cfg.data), check_images=True)


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
        raise ConfigError("model.norm=frozenbatchnorm with model.weights unset freezes randomly initialised BN, and "
                         "Faster R-CNN then diverges: set model.weights to a pretrained backbone (model.safetensors "
                         "of a classification run) or use model.norm=batchnorm")
    check_sync_bn(cfg.model, device.type == "cuda")
    check_bounds(cfg)
    torch.manual_seed(t.seed + dist_info.rank)

    # Workers decode, mirror (v2, per-sample seed) and keep uint8; batches share an aspect-ratio group.
    dataset = build_detection_set(cfg.data, train=True, transforms=TrainTransform(cfg.data.hflip), check_images=True)
    classes = dataset.classes
    test_set = build_test_set(cfg)
    cfg = schedule_for_batch(cfg, t.batch_size * dist_info.world_size, REFERENCE_BATCH, len(dataset))
    t, o = cfg.train, cfg.optim
    sampler = SeededSampler(DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                               shuffle=True, seed=t.seed, drop_last=True), t.seed, dist_info.rank)
    groups = [int(ann.width > ann.height) for ann in (dataset.annotation(i) for i in range(len(dataset)))]
    batches = SkipBatches(GroupedBatchSampler(sampler, groups, t.batch_size))
    workers = default_workers(cfg.data.workers)
    loader = DataLoader(SeededDataset(dataset), batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                        persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(t.seed))  # never draws from the training RNG
    if len(sampler) < t.batch_size:
        raise ConfigError(f"{cfg.data.train_splits} has {len(dataset)} images: fewer than one batch per process "
                         f"({t.batch_size} x {dist_info.world_size})")

    model = sync_batchnorm(build_model(cfg, len(classes)).to(device), cfg, dist_info)
    precision = setup_precision(t.precision, device, channels_last=cfg.model.channels_last, model=model,
                                cudnn_benchmark=False)  # image sizes vary (multi-scale)
    train_model = model
    if dist_info.distributed:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    global_batch = t.batch_size * dist_info.world_size
    base_lr = scale_lr(o.lr, global_batch, REFERENCE_BATCH)
    optimizer = build_optimizer(model, lr=base_lr, momentum=o.momentum, nesterov=False,
                                weight_decay=o.weight_decay, no_bias_decay=o.no_bias_decay)
    scheduler = build_scheduler(optimizer, base_lr=base_lr, total_steps=t.max_iter, warmup_steps=o.warmup_iters,
                                schedule="step", milestones=o.milestones, gamma=o.gamma)
    stepper = OptimizerStep(optimizer, scheduler, precision.scaler, max_nonfinite=t.max_nonfinite)

    # Position: every rank keeps its own (epoch, batches used in it): aspect grouping gives ranks
    # different numbers of batches per epoch.
    start, epoch, used = 0, 0, 0
    resume = resolve_resume(t.resume, out)
    if resume is not None:
        ckpt = load_training_checkpoint(resume, to_dict(cfg))
        check_fits(model, ckpt["model"], resume, f"this run's Faster R-CNN ({len(classes)} classes)", ckpt)
        restore_training_state(ckpt, model, stepper)
        start = ckpt["iteration"]
        restore_rng_states(ckpt["rng"], dist_info.rank, dist_info.world_size)
        positions = ckpt["positions"]
        epoch, used = positions[dist_info.rank] if len(positions) == dist_info.world_size else (positions[0][0] + 1, 0)
        if is_main:
            log.info("resumed from %s at iteration %d", resume, start)
    logger = RunLogger(out, enabled=is_main, resumed_step=start if resume is not None else None,
                       resume=t.resume)
    stream = EpochStream(loader, sampler, epoch, used)

    def checkpoint(iteration: int) -> None:
        stepper.check_diverged(f"iteration {iteration}", str(out / "last.pth"))  # never after divergence
        rngs = gather_rng_states()
        positions = gather_per_rank((stream.epoch, stream.used))
        if is_main:
            save_checkpoint(training_state(model, stepper, iteration=iteration, rng=rngs, positions=positions,
                                           config=to_dict(cfg)), out / "last.pth")

    train_model.train()
    progress = Progress(t.max_iter, start, enabled=is_main, logger=log)
    metrics: dict[str, Any] = {}
    meter = LossMeter(device)
    for iteration in range(start, t.max_iter):
        images, targets = next(stream)
        images = [im.to(device, non_blocking=True).float().div_(255) for im in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in tg.items()} for tg in targets]
        with precision.autocast():
            losses = train_model(images, targets)
        loss = sum(losses.values())
        stepper.backward(loss)
        lr = optimizer.param_groups[0]["lr"]  # the lr this step uses (logged below)
        stepped = stepper.step(loss)
        done = iteration + 1
        progress.update(global_batch)
        meter.add(stepped, loss=loss, **losses)
        if done % t.log_every == 0 or done == t.max_iter:
            # The only host syncs of the loop: here, every log_every iterations (and at evaluations and checkpoints).
            stepper.check_diverged(f"iteration {done}", str(out / "last.pth"))
            values = meter.mean()  # over steps and ranks
            shown = progress.report(done, loss=values.get("loss", float("nan")), lr=lr)
            logger.log("train", done, lr=lr, img_per_s=shown["img_per_s"], **values)
        if done == t.max_iter:  # the trained model is on disk before the final evaluation can fail
            checkpoint(done)
        if (t.eval_every and done % t.eval_every == 0) or done == t.max_iter:
            stepper.check_diverged(f"iteration {done}", str(out / "last.pth"))
            metrics = evaluate_detector(model, cfg, dist_info, test_set)
            logger.log("val", done, **{k: v for k, v in metrics.items() if isinstance(v, float)},
                       **{f"AP/{k}": v for k, v in metrics["AP"].items()})
            if is_main:
                log.info("iter %d: %s (%d images)", done, describe_metrics(metrics), metrics["images"])
            train_model.train()
        if t.checkpoint_every and done % t.checkpoint_every == 0 and done != t.max_iter:
            checkpoint(done)
    progress.close()
    if not metrics:  # a finished run resumed again: report its result
        metrics = evaluate_detector(model, cfg, dist_info, test_set)
    if is_main:
        save_checkpoint(model.state_dict(), out / "model_final.pth")  # atomic, as last.pth
        headline = "COCO AP" if metrics.get("format") == "coco" else "VOC07 mAP"
        plot_run(out, val_metrics=((headline, "mAP"),), val_x="step", val_title=f"{headline} (%)")
        save_detection_pictures(test_set, metrics["detections"], out / "detections", t.visualize, t.visualize_thresh)
    logger.close()
    return metrics


def evaluate_checkpoint(cfg: DetectionConfig, checkpoint: str) -> dict[str, Any]:
    """VOC07 mAP of a saved detector (``model_final.pth`` or ``last.pth`` of a run); pictures of the first
    ``train.visualize`` test images go to ``<output_dir>/detections``."""
    dist_info = init_distributed()
    try:
        test_set = build_test_set(cfg)
        model = build_model(cfg, len(test_set.classes))
        loaded = load_model_strictly(model, checkpoint, f"a torchvision-engine Faster R-CNN with "
                                     f"{len(test_set.classes)} classes")
        check_checkpoint_classes(loaded, checkpoint, test_set.classes)
        metrics = evaluate_detector(model.to(dist_info.device), cfg, dist_info, test_set)
        if dist_info.is_main:
            save_detection_pictures(test_set, metrics["detections"], Path(cfg.output_dir) / "detections",
                                    cfg.train.visualize, cfg.train.visualize_thresh)
        return metrics
    finally:
        cleanup_distributed()
