"""Parameter and multiply-add counts, measured by torch's own FLOP counter."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: Optional[tuple[int, int, int]] = None) -> int:
    """Multiply-adds of one eval-mode forward pass of one image (what the paper's tables call FLOPs).

    ``torch.utils.flop_counter`` counts 2 FLOPs per multiply-add; we halve it. The input goes to the
    model's device: a model on the ``meta`` device is counted without doing any arithmetic.
    """
    input_size = input_size or model.default_cfg["input_size"]
    device = next(model.parameters()).device
    was_training = model.training
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model.eval()(torch.empty(1, *input_size, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def profile_backbone(name: str, input_size: Optional[tuple[int, int, int]] = None, **kwargs) -> dict:
    """``{"params", "macs", "input_size"}`` of a registered backbone, built on the meta device (instant)."""
    from ._registry import create_backbone

    with torch.device("meta"):
        model = create_backbone(name, **kwargs)
    input_size = input_size or tuple(model.default_cfg["input_size"])
    return {"params": count_params(model), "macs": count_macs(model, input_size), "input_size": input_size}
