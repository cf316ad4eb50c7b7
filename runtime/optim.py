"""Optimizer of the recipe: Nesterov SGD, optionally without weight decay on biases and norm layers (§3.1)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.optim.sgd import sgd

from runtime.config import ConfigError

__all__ = ["NORM_LAYERS", "param_groups", "SGD", "build_optimizer"]

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


def memory_order(t: torch.Tensor) -> tuple[int, ...]:
    """The permutation of ``t``'s dimensions from its largest stride to its smallest: ``t.permute(order)`` is
    contiguous where ``t`` is dense (a channels_last ``[O, I, kH, kW]`` weight: ``(0, 2, 3, 1)``)."""
    return tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), d)))


class SGD(torch.optim.SGD):
    """``torch.optim.SGD`` whose fused step hands the kernel each parameter, gradient and momentum buffer as the
    same view in the parameter's memory order (a channels_last weight as ``[O, kH, kW, I]``, contiguous).

    torch's fused CPU kernel (ATen ``FusedSGDKernel.cpp``, torch 2.14) walks the three tensors linearly. It
    copies every gradient that is not in the contiguous format (``grad.contiguous()``, a copy it then does not
    use): with channels_last weights, every convolution's gradient every step (a step over seven 3x3 weights of
    128-256 channels: 5.1 ms against 1.4 ms here, one thread). And it mixes up elements when a gradient or buffer
    is laid out otherwise than its parameter (a gradient assigned by hand, a buffer loaded from a run of the
    other memory format): here such a tensor is first copied into the parameter's layout. The arithmetic is the
    kernel's, element for element. Other configurations (not fused, dampening, sparse gradients) take
    torch's own step.
    """

    def _views(self, group: dict) -> Optional[tuple[list, list, list]]:
        """(parameters, gradients, momentum buffers) of ``group`` for the fused kernel: a tensor in the contiguous
        format as it is, any other as its memory-order view (the parameter's and its buffer's views cached: a
        step's Python work stays a few microseconds per tensor); a gradient or buffer laid out otherwise than
        its parameter copied into the parameter's layout, a missing buffer created (zero: the first step's
        equivalent without dampening) in ``self.state``. None where torch's own step applies."""
        if not group.get("fused") or group["dampening"] or group.get("differentiable"):
            return None
        cache = self.__dict__.setdefault("_memory_order_views", {})  # parameter -> (stride, order, view, buffer, view)
        momentum = group["momentum"]
        params, grads, buffers = [], [], []
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                return None
            state = self.state[p] if momentum else None
            buf = state.get("momentum_buffer") if momentum else None
            if p.is_contiguous():  # the common case, as torch's step takes it
                if not grad.is_contiguous():
                    grad = grad.contiguous()
                if momentum and (buf is None or not buf.is_contiguous()):
                    buf = state["momentum_buffer"] = torch.zeros_like(p) if buf is None else buf.contiguous()
                params.append(p)
                grads.append(grad)
                buffers.append(buf)
                continue
            entry = cache.get(p)
            if entry is None or entry[0] != p.stride() or entry[2].data_ptr() != p.data_ptr():
                order = memory_order(p)
                view = p.detach().permute(order)
                if not view.is_contiguous():  # not dense: torch's step
                    return None
                entry = cache[p] = [p.stride(), order, view, None, None]
            order = entry[1]
            grad_view = grad.permute(order)
            if not grad_view.is_contiguous():
                grad_view = torch.empty_like(p).copy_(grad).permute(order)
            params.append(entry[2])
            grads.append(grad_view)
            if momentum:
                if buf is None or buf is not entry[3]:
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.zeros_like(p)
                    elif not buf.permute(order).is_contiguous():
                        buf = state["momentum_buffer"] = torch.empty_like(p).copy_(buf)
                    entry[3], entry[4] = buf, buf.permute(order)
                buffers.append(entry[4])
            else:
                buffers.append(None)
        return params, grads, buffers

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        views = [self._views(group) for group in self.param_groups]
        if any(v is None for v in views):
            super().step()
            return loss
        for group, (params, grads, buffers) in zip(self.param_groups, views):
            if not params:
                continue
            sgd(params, grads, buffers,
                weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"], dampening=0.0,
                nesterov=group["nesterov"], maximize=group["maximize"], has_sparse_grad=False, foreach=False,
                fused=True, grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None))
        return loss


def build_optimizer(model: nn.Module, *, lr: float, momentum: float = 0.9, nesterov: bool = True,
                    weight_decay: float = 1e-4, no_bias_decay: bool = False) -> torch.optim.SGD:
    """SGD with (Nesterov) momentum over ``param_groups(model, weight_decay, no_bias_decay)``.

    ``lr`` is the already scaled rate (``schedules.scale_lr``); a ``build_scheduler`` built with the same
    value as ``base_lr`` then drives it. Where every parameter is a floating-point tensor on CPU or CUDA
    the optimizer is torch's fused SGD (``SGD``: each tensor given in its memory order): one kernel per
    device and dtype (faster than the per-tensor loop), and it skips a non-finite step on the device
    (``found_inf``), so ``runtime.step.OptimizerStep`` never waits for the host. Elsewhere torch's default
    implementation, with a host check per step.
    """
    if nesterov and momentum <= 0:
        raise ConfigError(f"optim.nesterov=true needs optim.momentum > 0 (got {momentum}): Nesterov's step is a "
                          "momentum step; set optim.nesterov=false for plain SGD")
    groups = param_groups(model, weight_decay, no_bias_decay)
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, fused=True if fused else None)
