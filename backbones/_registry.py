"""The backbone registry: a dict of builders, a decorator that refuses duplicates, a lookup."""
from __future__ import annotations

import difflib
from typing import Callable, Optional, Union

import torch.nn as nn

from ._base import Backbone, convert_norm
from .weights import load_weights

_BACKBONES: dict[str, Callable[..., Backbone]] = {}


def register_backbone(fn: Callable[..., Backbone], *, name: Optional[str] = None) -> Callable[..., Backbone]:
    """Register a builder under ``name`` (default: its function name); a duplicate name is an error.

    Use as a decorator, or call it with ``name=`` to register a builder made from a table.
    """
    name = name or fn.__name__
    if name in _BACKBONES:
        raise ValueError(f"backbone {name!r} is already registered (by {_BACKBONES[name].__module__})")
    _BACKBONES[name] = fn
    return fn


def list_backbones() -> list[str]:
    """Names of all registered backbones, sorted."""
    return sorted(_BACKBONES)


def get_builder(name: str) -> Callable[..., Backbone]:
    if name not in _BACKBONES:
        close = difflib.get_close_matches(name, _BACKBONES, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"unknown backbone {name!r}.{hint} Registered: {', '.join(list_backbones())}")
    return _BACKBONES[name]


class BackboneArgumentError(TypeError):
    """A builder was given an argument it does not take (the message names the backbone and the argument)."""


def create_backbone(
    name: str,
    *,
    weights: Optional[str] = None,
    num_classes: int = 1000,
    in_chans: int = 3,
    output_stride: int = 32,
    zero_init_last: bool = False,
    frozen_stages: int = -1,
    norm_layer: Union[None, str, Callable[[int], nn.Module]] = None,
    new_head: bool = False,
    adapt_input: bool = False,
    **overrides,
) -> Backbone:
    """Build a registered backbone.

    Args:
        name: registry name, e.g. ``resnet50d`` (see ``list_backbones()``).
        weights: path of a ``.safetensors`` or ``.pth`` file (the suite's, timm's or torchvision's
            state dict), loaded strictly: a classifier of another size is an error naming both sizes
            unless ``new_head``.
        new_head: fine-tuning: a classifier of another size (or none, ``num_classes=0``) is not loaded.
        adapt_input: a 1-channel stem in ``weights`` is spread over ``in_chans`` (see ``load_weights``).
        num_classes: classifier outputs; 0 builds no classifier (``forward`` returns pooled features).
        in_chans: input channels.
        output_stride: 32, 16 or 8; strides beyond it become dilation (segmentation).
        zero_init_last: zero-gamma: the last BN of each residual block starts at 0.
        frozen_stages: -1 freezes nothing, 0 the stem, k the stem and the first k stages.
        norm_layer: ``None``/"batchnorm", "syncbatchnorm", "frozenbatchnorm", or a callable
            ``(num_features) -> nn.Module`` (built into the network; string choices convert BN after build).
        **overrides: builder-specific arguments (``norm_eval``, ``init``, ``width_mult``, ...).
    """
    builder = get_builder(name)
    callable_norm = norm_layer if callable(norm_layer) else None
    try:
        model = builder(
            num_classes=num_classes,
            in_chans=in_chans,
            output_stride=output_stride,
            zero_init_last=zero_init_last,
            norm_layer=callable_norm,
            **overrides,
        )
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise BackboneArgumentError(f"backbone {name!r} does not take the argument(s) {sorted(overrides)} as given: "
                                    f"{e}") from None
    model.arch = name
    if weights is not None:
        load_weights(model, weights, new_head=new_head, adapt_input=adapt_input)
    if isinstance(norm_layer, str):
        model = convert_norm(model, norm_layer)
    model.freeze_stages(frozen_stages)
    return model
