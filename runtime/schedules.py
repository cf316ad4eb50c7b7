"""Learning-rate schedules as pure functions of the optimizer step (He et al. 2019, §3.1 and §5.1; the poly
decay of DeepLab/mmsegmentation for segmentation).

Steps count optimizer updates from 0. ``lr_at`` is the single definition; ``build_scheduler`` wraps it in
a ``LambdaLR`` so the position in the schedule is saved and restored with ``state_dict``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

__all__ = ["SCHEDULES", "scale_lr", "scale_schedule", "schedule_for_batch", "lr_at", "build_scheduler"]

log = logging.getLogger("runtime.schedules")
C = TypeVar("C")

SCHEDULES = ("step", "cosine", "poly")


def scale_lr(lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """Linear scaling rule (§3.1): ``lr * global_batch / reference_batch``.

    Each task declares its reference batch: 256 images for classification (the paper: 0.1 per 256, so 0.4
    at 1024), 16 for detection and segmentation (detectron2's and mmsegmentation's recipes are written for
    16 images per step)."""
    if global_batch <= 0:
        raise ValueError(f"scale_lr: global_batch must be > 0 images, got {global_batch}")
    if reference_batch <= 0:
        raise ValueError(f"scale_lr: reference_batch must be > 0 images, got {reference_batch}")
    return lr * global_batch / reference_batch


def scale_schedule(global_batch: int, reference_batch: int, *, max_iter: int, milestones: Sequence[int] = (),
                   warmup_iters: int = 0, eval_every: int = 0, checkpoint_every: int = 0) -> dict[str, Any]:
    """An iteration schedule written for ``reference_batch`` images per step, rescaled for ``global_batch``
    so that the run sees the same number of epochs: detectron2's ``REFERENCE_WORLD_SIZE`` semantics
    (``DefaultTrainer.auto_scale_workers``): with ``scale = global_batch / reference_batch``, every length
    in iterations becomes ``int(round(n / scale))``. The lr is not touched here (``scale_lr`` scales it).

    Returns ``{"max_iter", "milestones", "warmup_iters", "eval_every", "checkpoint_every"}``. Where
    detectron2 would round a positive length to 0 (a period of 0 breaks its hooks; a run of 0 iterations
    trains nothing), it is kept at 1; 0 stays 0 (``eval_every=0``: only at the end)."""
    if global_batch <= 0 or reference_batch <= 0:
        raise ValueError(f"scale_schedule: global_batch ({global_batch}) and reference_batch ({reference_batch}) "
                         "must be > 0 images")
    scale = global_batch / reference_batch

    def scaled(n: int) -> int:
        return max(int(round(n / scale)), 1) if n > 0 else n

    return {"max_iter": scaled(max_iter), "milestones": [scaled(m) for m in milestones],
            "warmup_iters": scaled(warmup_iters), "eval_every": scaled(eval_every),
            "checkpoint_every": scaled(checkpoint_every)}


def schedule_for_batch(cfg: C, global_batch: int, reference_batch: int, train_images: int) -> C:
    """``cfg`` (a detection or segmentation config: ``train.max_iter``, ``train.eval_every``,
    ``train.checkpoint_every``, ``train.scale_schedule``, ``optim.warmup_iters`` and, for step decay,
    ``optim.milestones``) for a run at ``global_batch`` images per step.

    A recipe's schedule is written for the task's reference batch (``REFERENCE_BATCH``: the 16 images per
    step of detectron2's and mmsegmentation's recipes, the batch its ``optim.lr`` is given for). When the
    global batch differs, one line is logged (main rank) naming the epochs of ``train_images`` the run will
    see and the recipe's; with ``train.scale_schedule=true`` the schedule is rescaled (``scale_schedule``)
    so that the run sees the recipe's epochs, and the copy returned holds the scaled lengths. ``cfg`` itself
    is not changed (its saved ``config.yaml`` stays the recipe plus the flag)."""
    t, o = cfg.train, cfg.optim
    if global_batch == reference_batch:
        return cfg
    epochs = lambda iterations, batch: iterations * batch / max(train_images, 1)
    recipe = epochs(t.max_iter, reference_batch)
    scaled = scale_schedule(global_batch, reference_batch, max_iter=t.max_iter,
                            milestones=getattr(o, "milestones", ()), warmup_iters=o.warmup_iters,
                            eval_every=t.eval_every, checkpoint_every=t.checkpoint_every)
    head = (f"global batch {global_batch} differs from the recipe's {reference_batch} (the schedule is written "
            f"for {reference_batch} images per step)")
    if t.scale_schedule:
        message = (f"{head}: train.scale_schedule=true runs {scaled['max_iter']} iterations instead of {t.max_iter} "
                   f"(milestones, warm-up, eval and checkpoint periods alike): "
                   f"{epochs(scaled['max_iter'], global_batch):.2f} epochs of {train_images} training images, "
                   f"the recipe's {recipe:.2f}")
        train = dataclasses.replace(t, **{k: scaled[k] for k in ("max_iter", "eval_every", "checkpoint_every")})
        optim = dataclasses.replace(o, warmup_iters=scaled["warmup_iters"],
                                    **({"milestones": scaled["milestones"]} if hasattr(o, "milestones") else {}))
        cfg = dataclasses.replace(cfg, train=train, optim=optim)
    else:
        message = (f"{head}: {t.max_iter} iterations are {epochs(t.max_iter, global_batch):.2f} epochs of "
                   f"{train_images} training images, the recipe's {recipe:.2f}; set train.scale_schedule=true "
                   f"to run {scaled['max_iter']} iterations for the recipe's epochs")
    if int(os.environ.get("RANK", 0)) == 0:
        log.warning(message)
    return cfg


def _validate(base_lr: float, total_steps: int, warmup_steps: int, schedule: str,
              milestones: Sequence[int], gamma: float, power: float = 1.0, min_lr: float = 0.0) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r} (optim.schedule); valid: "
                         + ", ".join(repr(s) for s in SCHEDULES))
    if base_lr < 0:
        raise ValueError(f"base_lr must be >= 0, got {base_lr}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps} "
                         "(a warm-up longer than the run? optim.warmup_epochs in classification, "
                         "optim.warmup_iters in detection and segmentation)")
    if any(m < 0 for m in milestones) or list(milestones) != sorted(milestones):
        raise ValueError(f"milestones must be non-negative and increasing (in steps), got {list(milestones)}")
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma} (optim.gamma)")
    if power <= 0:
        raise ValueError(f"power must be > 0, got {power} (optim.power)")
    if not 0 <= min_lr <= base_lr:
        raise ValueError(f"min_lr must be in [0, base_lr={base_lr}], got {min_lr} (optim.min_lr)")


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int = 0, schedule: str = "step",
          milestones: Sequence[int] = (), gamma: float = 0.1, power: float = 0.9, min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Warmup (``step < warmup_steps``): ``base_lr * step / warmup_steps``, linear from 0 as in the paper
    and in GluonCV's implementation (its batch index starts at 0), so step 0 has lr 0 and the ramp meets
    ``base_lr`` exactly where the main schedule begins. The paper's text writes ``i * lr / m`` for batch
    ``1 <= i <= m``; that is the same line shifted by one step.

    After warmup:
      * ``"step"``: ``base_lr * gamma ** (number of milestones <= step)``; milestones are in steps,
        counted from 0 like ``step`` (warmup included); one inside the warm-up multiplies its ramp, as
        detectron2's ``WarmupMultiStepLR``.
      * ``"cosine"``: ``0.5 * (1 + cos(pi * t / T)) * base_lr`` with ``t = step - warmup_steps``,
        ``T = total_steps - warmup_steps``; it reaches 0 at ``total_steps`` and stays there.
        ``milestones`` and ``gamma`` are ignored.
      * ``"poly"``: ``(base_lr - min_lr) * (1 - t / (T - 1)) ** power + min_lr`` with the same ``t``, ``T``:
        mmengine's ``PolyLR`` (``eta_min=min_lr``, by iteration; power 0.9, min 1e-4 in mmseg's recipes),
        whose span ends one step early, so the last iteration runs at ``min_lr``.
    """
    _validate(base_lr, total_steps, warmup_steps, schedule, milestones, gamma, power, min_lr)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    warmup = step / warmup_steps if step < warmup_steps else 1.0
    if schedule == "step":  # a milestone inside the warm-up scales it too (detectron2's WarmupMultiStepLR)
        return base_lr * warmup * gamma ** sum(1 for m in milestones if m <= step)
    if step < warmup_steps:
        return base_lr * warmup
    decay_steps = total_steps - warmup_steps
    # Clamped: past the end the cosine would rise again; with no decay steps the run is already over.
    progress = min((step - warmup_steps) / decay_steps, 1.0) if decay_steps > 0 else 1.0
    if schedule == "poly":  # mmengine's span: the last iteration (total_steps - 1) runs at min_lr
        progress = min((step - warmup_steps) / (decay_steps - 1), 1.0) if decay_steps > 1 else 1.0
        return (base_lr - min_lr) * (1.0 - progress) ** power + min_lr
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * base_lr


def build_scheduler(optimizer: torch.optim.Optimizer, *, base_lr: float, total_steps: int, warmup_steps: int = 0,
                    schedule: str = "step", milestones: Sequence[int] = (), gamma: float = 0.1,
                    power: float = 0.9, min_lr: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following ``lr_at``; call ``scheduler.step()`` after every ``optimizer.step()``.

    ``LambdaLR`` multiplies each group's initial lr by the lambda, so build the optimizer with
    ``lr=base_lr``. The lambda is a closure, not a callable object, so ``state_dict`` stores only the
    step count: a resumed run rebuilds the schedule from its config and continues at the saved step.
    """
    if base_lr <= 0:
        raise ValueError(f"build_scheduler: base_lr must be > 0 (the lambda returns lr / base_lr), got {base_lr}")
    milestones = tuple(milestones)
    _validate(base_lr, total_steps, warmup_steps, schedule, milestones, gamma, power, min_lr)  # fail now, not at step()
    late = [m for m in milestones if m >= total_steps]
    if schedule == "step" and late and int(os.environ.get("RANK", 0)) == 0:
        log.warning("optim.milestones: %d of %d step decay(s) fall at or after the run's last step (steps %s of %d): "
                    "they never take effect, so the lr stays at %s of the base lr; set milestones inside the run "
                    "(or train.scale_schedule=true where the task has it)", len(late), len(milestones),
                    list(late), total_steps, f"{gamma ** (len(milestones) - len(late)):.3g}x")

    def factor(step: int) -> float:
        return lr_at(step, base_lr=base_lr, total_steps=total_steps, warmup_steps=warmup_steps,
                     schedule=schedule, milestones=milestones, gamma=gamma, power=power, min_lr=min_lr) / base_lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
