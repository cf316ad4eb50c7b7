"""The optimizer step every trainer shares: gradient accumulation, loss scaling, the schedule, and one
policy for non-finite losses.

A loop reads::

    stepper = OptimizerStep(optimizer, scheduler, precision.scaler, accum_steps=4, max_nonfinite=20)
    for micro in range(4):
        with stepper.no_sync(ddp_model, micro):          # DDP all-reduces on the last micro-batch only
            stepper.backward(loss)                       # (loss / accum_steps), scaled in fp16
    stepper.step(loss_sum)                               # optimizer + scheduler; skip if non-finite

Non-finite policy, the same in every task: a step whose loss is not finite on any rank is skipped on
every rank (fp16: GradScaler finds the inf/nan gradients and lowers the scale; fp32/bf16: the loss is
checked, one scalar per step), the schedule still advances (it counts iterations), and
``max_nonfinite`` skipped steps in a row raise ``TrainingDiverged`` before anything is written, so the
last checkpoint stays the last good one.
"""
from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import ContextManager

import torch
from torch import nn

from .distributed import all_reduce_min


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for ``max_nonfinite`` steps in a row."""


class OptimizerStep:
    def __init__(self, optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler, *,
                 accum_steps: int = 1, max_nonfinite: int = 20):
        if accum_steps < 1 or max_nonfinite < 1:
            raise ValueError(f"accum_steps ({accum_steps}) and max_nonfinite ({max_nonfinite}) must be >= 1")
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.accum_steps, self.max_nonfinite = accum_steps, max_nonfinite
        self.nonfinite_streak = 0

    def no_sync(self, model: nn.Module, micro: int) -> ContextManager:
        """DDP's ``no_sync`` on every micro-batch but the last of a step (a no-op without DDP)."""
        if micro == self.accum_steps - 1 or not hasattr(model, "no_sync"):
            return nullcontext()
        return model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss, averaged over the accumulation."""
        self.scaler.scale(loss / self.accum_steps).backward()

    def step(self, loss: torch.Tensor) -> bool:
        """Optimizer step (unless non-finite), zero the gradients, advance the schedule. ``loss`` is this
        step's loss (any rank's non-finite value skips the step everywhere). Returns whether it stepped."""
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            stepped = self.scaler.get_scale() >= scale
        else:
            stepped = bool(all_reduce_min(torch.isfinite(loss.detach()).float()).item())
            if stepped:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # A skipped first step makes torch warn that the schedule runs ahead of the optimizer; it is
            # meant to: the schedule counts iterations, skipped or not.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        self.nonfinite_streak = 0 if stepped else self.nonfinite_streak + 1
        return stepped

    def check_diverged(self, where: str, last_good: str) -> None:
        """Raise ``TrainingDiverged`` once ``max_nonfinite`` steps in a row were skipped."""
        if self.nonfinite_streak >= self.max_nonfinite:
            raise TrainingDiverged(
                f"the loss was non-finite for {self.nonfinite_streak} steps in a row ({where}); stopped. The last "
                f"good checkpoint is {last_good}. Lower optim.lr, lengthen the warm-up, or train in fp32")

    def state_dict(self) -> dict:
        return {"nonfinite_streak": self.nonfinite_streak}

    def load_state_dict(self, state: dict) -> None:
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
