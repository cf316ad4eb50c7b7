"""Optimizer of the recipe: Nesterov SGD, optionally without weight decay on biases and norm layers (§3.1)."""
from __future__ import annotations

import torch
from torch import nn

from runtime.config import ConfigError

__all__ = ["NORM_LAYERS", "param_groups", "build_optimizer"]

# _NormBase covers BatchNorm*d, SyncBatchNorm, InstanceNorm*d and their lazy and user subclasses.
NORM_LAYERS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                                             *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def param_groups(model: nn.Module, weight_decay: float, no_bias_decay: bool) -> list[dict]:
    """Optimizer parameter groups, each with ``params``, ``param_names`` and ``weight_decay``.

    With ``no_bias_decay`` the paper's rule applies: every parameter named ``bias`` (or ``*_bias``) and every parameter
    of a normalization layer (``NORM_LAYERS``) gets ``weight_decay = 0``; all others, including 1-D
    weights of other layers, keep the decay. The choice is by module type and name, not by ``ndim``
    (timm's heuristic), so exactly those parameters are exempt. A tensor shared by several modules
    appears once, and is exempt if any of its uses is. Empty groups are left out. Frozen parameters
    are included: plain SGD skips tensors without a gradient.
    """
    if not no_bias_decay:
        named = list(model.named_parameters())
        return [{"params": [p for _, p in named], "param_names": [n for n, _ in named], "weight_decay": weight_decay}]

    # id -> [first name, parameter, exempt]; dicts keep first-seen order, so groups are deterministic.
    seen: dict[int, list] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        is_norm = isinstance(module, NORM_LAYERS)
        for param_name, param in module.named_parameters(recurse=False):
            exempt = is_norm or param_name.endswith("bias")  # bias, in_proj_bias (MultiheadAttention), ...
            entry = seen.setdefault(id(param), [f"{module_name}.{param_name}".lstrip("."), param, False])
            entry[2] = entry[2] or exempt
    groups = []
    for decay, exempt in ((weight_decay, False), (0.0, True)):
        chosen = [(name, param) for name, param, e in seen.values() if e == exempt]
        if chosen:
            groups.append({"params": [p for _, p in chosen], "param_names": [n for n, _ in chosen],
                           "weight_decay": decay})
    return groups


def build_optimizer(model: nn.Module, *, lr: float, momentum: float = 0.9, nesterov: bool = True,
                    weight_decay: float = 1e-4, no_bias_decay: bool = False) -> torch.optim.SGD:
    """SGD with (Nesterov) momentum over ``param_groups(model, weight_decay, no_bias_decay)``.

    ``lr`` is the already scaled rate (``schedules.scale_lr``); a ``build_scheduler`` built with the same
    value as ``base_lr`` then drives it. Where every parameter is a floating-point tensor on CPU or CUDA
    the optimizer is torch's fused SGD: one kernel per device and dtype (faster than the per-tensor loop),
    and it skips a non-finite step on the device (``found_inf``), so ``runtime.step.OptimizerStep``
    never waits for the host. Elsewhere torch's default implementation, with a host check per step.
    """
    if nesterov and momentum <= 0:
        raise ConfigError(f"optim.nesterov=true needs optim.momentum > 0 (got {momentum}): Nesterov's step is a "
                          "momentum step; set optim.nesterov=false for plain SGD")
    groups = param_groups(model, weight_decay, no_bias_decay)
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, fused=True if fused else None)
