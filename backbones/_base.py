"""What every backbone shares: the feature contract, initialisation, freezing, norm handling."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn as nn
from torch import Tensor
from torchvision.ops import FrozenBatchNorm2d

# The paper's normalisation (section 2.1), on the 0-1 scale.
IMAGENET_MEAN = (123.68 / 255, 116.779 / 255, 103.939 / 255)
IMAGENET_STD = (58.393 / 255, 57.12 / 255, 57.375 / 255)

NormLayer = Callable[[int], nn.Module]


@dataclass(frozen=True)
class FeatureInfo:
    """One feature map of ``forward_features``: its key, channel count and nominal stride."""

    name: str
    channels: int
    stride: int


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm2d/SyncBatchNorm replaced by torchvision's ``FrozenBatchNorm2d``
    (detectron2's semantics: fixed statistics and affine parameters, BN's buffer names, so BatchNorm state
    dicts load into it; ``num_batches_tracked`` is accepted and dropped), holding the same values."""
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        frozen = FrozenBatchNorm2d(module.num_features, module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        if module.track_running_stats:
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = freeze_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def convert_norm(model: nn.Module, kind: str) -> nn.Module:
    """Convert the BatchNorm layers of ``model`` to ``kind``: batchnorm, syncbatchnorm, frozenbatchnorm."""
    if kind == "batchnorm":
        return model
    if kind == "syncbatchnorm":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if kind == "frozenbatchnorm":
        with torch.no_grad():
            return freeze_batchnorm(model)
    raise ValueError(f"unknown norm_layer {kind!r}: use 'batchnorm', 'syncbatchnorm' or 'frozenbatchnorm'")


_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, FrozenBatchNorm2d)


def init_weights(model: nn.Module, init: Literal["xavier", "kaiming"] = "xavier") -> None:
    """The paper's initialisation: Xavier-uniform conv/fc weights, zero biases, BN gamma 1 and beta 0.

    ``kaiming`` uses He-normal (fan_out, ReLU) for conv weights instead, as torchvision/timm do.
    """
    if init not in ("xavier", "kaiming"):
        raise ValueError(f"unknown init {init!r}: use 'xavier' or 'kaiming'")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if init == "xavier":
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._NormBase) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Backbone(nn.Module):
    """Base of every registered network.

    Contract (detectron2-like): ``forward_features(x)`` returns ``{"res2": ..., "res5": ...}`` at
    strides 4, 8, 16, 32 (less with dilation); ``feature_info`` lists those maps and is fixed when the
    model is built; ``forward(x)`` returns logits (or pooled features when ``num_classes == 0``).
    Subclasses set ``feature_info``, ``num_features``, ``default_cfg`` and implement
    ``forward_features`` and ``stages()``.
    """

    feature_info: list[FeatureInfo]
    num_features: int
    default_cfg: dict
    # > 0: the network initialises some weights from data (airbench's patch whitening); the trainer
    # passes this many normalised training images to ``init_from_data`` before the first step.
    data_init_images: int = 0

    def __init__(self, norm_eval: bool = False):
        super().__init__()
        self.norm_eval = norm_eval
        self.frozen_stages = -1

    def stages(self) -> list[list[nn.Module]]:
        """Modules of the stem and of each stage in order: ``[stem, res2, res3, res4, res5]``."""
        raise NotImplementedError

    def forward_stem(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def init_from_data(self, images: Tensor) -> None:
        """Data-dependent initialisation from ``data_init_images`` normalised training images (default: none)."""

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Default for networks built as a stem and stages ``layer1``..``layer4`` (res2..res5)."""
        x = self.forward_stem(x)
        feats = {}
        for i, info in enumerate(self.feature_info):
            x = feats[info.name] = getattr(self, f"layer{i + 1}")(x)
        return feats

    def forward_head(self, x: Tensor) -> Tensor:
        x = self.global_pool(x).flatten(1)
        return self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x)["res5"])

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier (Xavier init); 0 removes it."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.xavier_uniform_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def freeze_stages(self, frozen_stages: int) -> None:
        """Freeze the stem (0) and the first ``frozen_stages`` stages: no gradients, BN in eval mode."""
        stages = self.stages()
        if not -1 <= frozen_stages < len(stages):
            raise ValueError(f"frozen_stages must be in [-1, {len(stages) - 1}], got {frozen_stages}")
        self.frozen_stages = frozen_stages
        for stage in stages[: frozen_stages + 1]:
            for module in stage:
                module.eval()
                for p in module.parameters():
                    p.requires_grad_(False)

    def train(self, mode: bool = True) -> "Backbone":
        # Frozen stages and (with norm_eval) every norm layer stay in eval mode, as detectron2 and
        # mmseg do when fine-tuning with small per-device batches.
        super().train(mode)
        if mode:
            for stage in self.stages()[: self.frozen_stages + 1]:
                for module in stage:
                    module.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._NormBase):
                        m.eval()
        return self


def resolve_norm(norm_layer: Optional[NormLayer]) -> NormLayer:
    return norm_layer if norm_layer is not None else nn.BatchNorm2d


def check_output_stride(output_stride: int) -> None:
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
