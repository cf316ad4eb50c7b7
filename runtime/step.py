"""The optimizer step every trainer shares: gradient accumulation, loss scaling, the schedule, and one
policy for non-finite losses.

A loop reads::

    stepper = OptimizerStep(optimizer, scheduler, precision.scaler, accum_steps=4, max_nonfinite=20)
    for micro in range(4):
        with stepper.no_sync(ddp_model, micro):          # DDP all-reduces on the last micro-batch only
            stepper.backward(loss)                       # (loss / accum_steps), scaled in fp16
    stepped = stepper.step(loss_sum)                     # optimizer + scheduler; skipped if non-finite
    loss_total += torch.where(stepped, loss_sum, 0.0)    # a device tensor: no host sync
    if step % log_every == 0:                            # where the loop syncs anyway (and before every
        stepper.check_diverged(where, "last.pth")        # evaluation and checkpoint)

Non-finite policy, the same in every task: a step whose loss is not finite on any rank is skipped on
every rank (fp16: GradScaler finds the inf/nan gradients and lowers the scale; fp32/bf16: the loss is
checked, one scalar per step), weights and optimizer state untouched; the schedule still advances (it
counts iterations), and ``max_nonfinite`` skipped steps in a row raise ``TrainingDiverged`` before
anything is written, so the last checkpoint stays the last good one.

No host sync per step: the skip decision stays on the device. An optimizer that takes it there
(``_step_supports_amp_scaling``: ``build_optimizer``'s fused SGD) gets it as ``found_inf``, the tensor
through which GradScaler drives fused optimizers, and its kernel leaves the parameters and the momentum
untouched. The streak of skipped steps is a device tensor too; ``check_diverged`` reads it, so a loop
calls it where it syncs anyway: at log steps, and before every evaluation and checkpoint (the run then
stops at the first of those after the streak reached ``max_nonfinite``, before writing). Any other
optimizer (foreach or single-tensor SGD, one with ``dampening``) keeps a host check per step: the loss
is read (fp32/bf16) or GradScaler reads its inf flag (fp16) and ``optimizer.step()`` is not called.
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


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours ``optimizer.found_inf`` (a 0-dim float tensor: 1 skips the
    update in the kernel). SGD with ``dampening`` is left out: its fused kernel starts the momentum as the
    first gradient, which a zero buffer (``_zero_momentum_buffers``) reproduces only without dampening."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    return not (isinstance(optimizer, torch.optim.SGD)
                and any(g["momentum"] and g["dampening"] for g in optimizer.param_groups))


def _zero_momentum_buffers(optimizer: torch.optim.Optimizer) -> None:
    """Give every SGD parameter about to step a zero momentum buffer if it has none yet.

    Fused SGD allocates missing buffers with ``torch.empty_like`` and fills them in the kernel; when
    ``found_inf`` skips that first step they stay uninitialised memory, which the next step would use.
    With ``dampening=0`` a zero buffer gives exactly torch's first step (``buf = momentum * 0 + grad``).
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if group["momentum"]:
            for p in group["params"]:
                if p.grad is not None and optimizer.state[p].get("momentum_buffer") is None:
                    optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class OptimizerStep:
    def __init__(self, optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler, *,
                 accum_steps: int = 1, max_nonfinite: int = 20):
        if accum_steps < 1 or max_nonfinite < 1:
            raise ValueError(f"accum_steps ({accum_steps}) and max_nonfinite ({max_nonfinite}) must be >= 1")
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.accum_steps, self.max_nonfinite = accum_steps, max_nonfinite
        self.on_device = skips_on_device(optimizer)
        # Skipped steps in a row, the longest such streak since the start, all skipped steps: device
        # tensors, made on the loss's device at the first step (Python ints until then).
        self._streak: torch.Tensor | int = 0
        self._longest: torch.Tensor | int = 0
        self._skipped: torch.Tensor | int = 0

    def no_sync(self, model: nn.Module, micro: int) -> ContextManager:
        """DDP's ``no_sync`` on every micro-batch but the last of a step (a no-op without DDP)."""
        if micro == self.accum_steps - 1 or not hasattr(model, "no_sync"):
            return nullcontext()
        return model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss, averaged over the accumulation."""
        self.scaler.scale(loss / self.accum_steps).backward()

    def step(self, loss: torch.Tensor) -> torch.Tensor:
        """Optimizer step (unless non-finite), zero the gradients, advance the schedule. ``loss`` is this
        step's loss (any rank's non-finite value skips the step everywhere). Returns whether it stepped,
        as a 0-dim bool tensor on the loss's device (no host sync: see the module docstring)."""
        if self.on_device:
            _zero_momentum_buffers(self.optimizer)
        if self.scaler.is_enabled():
            # GradScaler lowers the scale exactly when it skips the step (inf/nan gradients): compare the
            # scale tensors. get_scale() would return a float, a host sync; _get_scale_async() is the tensor.
            scale = self.scaler._get_scale_async().clone()
            self.scaler.step(self.optimizer)  # fused: found_inf goes to the kernel; else a host check
            self.scaler.update()
            skipped = (self.scaler._get_scale_async() < scale).to(loss.device)
        else:
            skipped = 1.0 - all_reduce_min(torch.isfinite(loss.detach()).float())
            if self.on_device:
                self.optimizer.grad_scale, self.optimizer.found_inf = None, skipped
                try:
                    self.optimizer.step()
                finally:
                    del self.optimizer.grad_scale, self.optimizer.found_inf
            elif not skipped.item():  # an optimizer without found_inf: a host sync per step
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # A skipped first step makes torch warn that the schedule runs ahead of the optimizer (when
            # optimizer.step() was not called at all); it is meant to: the schedule counts iterations.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        skipped = skipped.long()
        self._streak = (self._streak + 1) * skipped
        self._longest = torch.maximum(torch.as_tensor(self._longest, device=loss.device), self._streak)
        self._skipped = self._skipped + skipped
        return skipped == 0

    def _counts(self) -> tuple[int, int, int]:
        """(streak, longest streak, skipped steps) as Python ints: a host sync."""
        values = [self._streak, self._longest, self._skipped]
        if isinstance(self._streak, torch.Tensor):
            values = torch.stack(values).tolist()
        return values[0], values[1], values[2]

    @property
    def nonfinite_streak(self) -> int:
        """Skipped steps in a row up to the last step (a host sync)."""
        return self._counts()[0]

    @property
    def skipped_steps(self) -> int:
        """Steps skipped since the start of the run, resumes included (a host sync)."""
        return self._counts()[2]

    def check_diverged(self, where: str, last_good: str) -> None:
        """Raise ``TrainingDiverged`` if ``max_nonfinite`` steps in a row were skipped at any point. A host
        sync: call it where the loop syncs anyway (log steps), and before every evaluation and checkpoint."""
        _, longest, _ = self._counts()
        if longest >= self.max_nonfinite:
            raise TrainingDiverged(
                f"the loss was non-finite for {longest} steps in a row (train.max_nonfinite={self.max_nonfinite}; "
                f"seen at {where}); stopped. The last good checkpoint is {last_good}. Lower optim.lr, lengthen the "
                "warm-up, or train in fp32")

    def state_dict(self) -> dict:
        streak, _, skipped = self._counts()
        return {"nonfinite_streak": streak, "skipped_steps": skipped}

    def load_state_dict(self, state: dict) -> None:
        """Also reads the older ``{"nonfinite_streak": int}`` (no ``skipped_steps``) and ``{}``."""
        self._streak = self._longest = int(state.get("nonfinite_streak", 0))
        self._skipped = int(state.get("skipped_steps", 0))
