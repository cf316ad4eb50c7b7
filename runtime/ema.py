"""An exponential moving average of a model's weights (``train.ema_decay``), updated without a host sync.

``ema = decay * ema + (1 - decay) * w`` for every floating-point parameter and buffer (BN statistics too),
one ``torch._foreach_lerp_`` per update, as timm's ``ModelEmaV3``; integer buffers (BN's
``num_batches_tracked``) are copied. The first update copies the weights, as torch's ``AveragedModel``.

torch's ``AveragedModel`` asks ``if self.n_averaged == 0`` of a device tensor at every update: one host
sync per optimizer step. Here the count is kept on the host too (read back once, at ``load_state_dict``).
The state dict is ``AveragedModel``'s (``module.*`` and ``n_averaged``), so checkpoints of either load.
"""
from __future__ import annotations

import copy
import itertools
from typing import Any, Mapping

import torch
import torch.nn as nn

from runtime.config import ConfigError


class WeightEMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in (0, 1) (0 = off), got {decay}")
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.decay = decay
        device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=device))
        self._updates = 0  # the host's copy of n_averaged

    def _tensors(self, model: nn.Module) -> list[torch.Tensor]:
        return [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (the first call copies them)."""
        ours, theirs = self._tensors(self.module), self._tensors(model)
        if len(ours) != len(theirs):
            raise ValueError(f"the EMA holds {len(ours)} tensors, the model {len(theirs)}: not the same network")
        floats = [(a, b) for a, b in zip(ours, theirs) if a.is_floating_point()]
        others = [(a, b) for a, b in zip(ours, theirs) if not a.is_floating_point()]
        if floats:
            a, b = map(list, zip(*floats))
            if self._updates == 0:
                torch._foreach_copy_(a, b)
            else:
                torch._foreach_lerp_(a, b, 1.0 - self.decay)
        for a, b in others:
            a.copy_(b)
        self.n_averaged += 1
        self._updates += 1

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._updates = int(self.n_averaged)
        return result
