"""Inception-V3 (Szegedy et al. 2016) at 299 px, built from torchvision's Inception blocks.

Module names equal torchvision's ``Inception3`` (and timm's ``inception_v3``), so their weights load
strictly. torchvision is imported when the network is built, keeping ``import backbones`` torch-only.
The auxiliary classifier is off by default: the paper's reference (GluonCV) trains without it;
``aux_logits=True`` keeps it so checkpoints that contain it load strictly (it is not used in forward).

``width_mult`` scales every width (a narrower network for small inputs, as ResNet's and MobileNet's). Every
published width is a multiple of 16, so a multiplier in steps of 1/16 keeps each branch, and so each
concatenation, exact; 1.0 builds torchvision's shapes. The blocks stay torchvision's: their ``conv_block`` hook
receives the published widths and builds each conv at the scaled ones.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor

from ._base import IMAGENET_MEAN, IMAGENET_STD, Backbone, FeatureInfo, init_weights
from ._registry import register_backbone


class InceptionV3(Backbone):
    def __init__(
        self,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        output_stride: int = 32,
        zero_init_last: bool = False,
        norm_layer=None,
        norm_eval: bool = False,
        aux_logits: bool = False,
        transform_input: bool = False,
        drop_rate: float = 0.5,
        init: Literal["xavier", "kaiming"] = "xavier",
        width_mult: float = 1.0,
    ):
        super().__init__(norm_eval=norm_eval)
        from torchvision.models import inception as tv  # lazy: see the module docstring

        if output_stride != 32:
            raise ValueError("inception_v3 supports output_stride=32 only (its valid-padding convs do not dilate cleanly)")
        if zero_init_last:
            raise ValueError("zero_init_last (zero-gamma) applies to residual blocks; inception_v3 has none")
        if norm_layer is not None:
            raise ValueError("inception_v3 builds torchvision's BasicConv2d (BN, eps 1e-3): pass norm_layer as a "
                             "string ('frozenbatchnorm', 'syncbatchnorm') to convert after building")
        if width_mult <= 0 or abs(width_mult * 16 - round(width_mult * 16)) > 1e-9:
            raise ValueError(f"inception_v3 width_mult={width_mult}: use a multiple of 1/16 (0.25, 0.5, 0.75, ...), "
                             "which keeps every published width (all multiples of 16) an integer")
        if aux_logits and width_mult != 1.0:
            raise ValueError("aux_logits=True needs width_mult=1.0 (the auxiliary head's 768-wide fc is fixed in "
                             "torchvision's InceptionAux; it exists to load published checkpoints)")
        self.num_classes = num_classes
        # torchvision's trick to feed its ImageNet-normalised inputs to weights trained on [-1, 1] inputs.
        self.transform_input = transform_input
        self.variant = dict(aux_logits=aux_logits)
        if transform_input:  # changes what the network computes without changing a weight: exports must know
            self.variant["transform_input"] = True
        if width_mult != 1.0:
            self.variant["width_mult"] = width_mult

        def w(channels: int) -> int:  # exact for multiples of 1/16: see the module docstring
            return int(round(channels * width_mult))

        block = None if width_mult == 1.0 else _scaled_conv(w)
        conv = block or tv.BasicConv2d
        self.Conv2d_1a_3x3 = tv.BasicConv2d(in_chans, w(32), kernel_size=3, stride=2)  # image channels unscaled
        self.Conv2d_2a_3x3 = conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = conv(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = conv(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = tv.InceptionA(192, pool_features=32, conv_block=block)
        self.Mixed_5c = tv.InceptionA(256, pool_features=64, conv_block=block)
        self.Mixed_5d = tv.InceptionA(288, pool_features=64, conv_block=block)
        self.Mixed_6a = tv.InceptionB(288, conv_block=block)
        self.Mixed_6b = tv.InceptionC(768, channels_7x7=128, conv_block=block)
        self.Mixed_6c = tv.InceptionC(768, channels_7x7=160, conv_block=block)
        self.Mixed_6d = tv.InceptionC(768, channels_7x7=160, conv_block=block)
        self.Mixed_6e = tv.InceptionC(768, channels_7x7=192, conv_block=block)
        self.AuxLogits = tv.InceptionAux(768, num_classes) if aux_logits else None
        self.Mixed_7a = tv.InceptionD(768, conv_block=block)
        self.Mixed_7b = tv.InceptionE(1280, conv_block=block)
        self.Mixed_7c = tv.InceptionE(2048, conv_block=block)
        self.feature_info = [FeatureInfo("res2", w(192), 4), FeatureInfo("res3", w(288), 8),
                             FeatureInfo("res4", w(768), 16), FeatureInfo("res5", w(2048), 32)]
        self.num_features = w(2048)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes)
        self.default_cfg = dict(input_size=(in_chans, 299, 299), mean=IMAGENET_MEAN, std=IMAGENET_STD)
        init_weights(self, init)

    def stages(self) -> list[list[nn.Module]]:
        return [
            [self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3],
            [self.Conv2d_3b_1x1, self.Conv2d_4a_3x3],
            [self.Mixed_5b, self.Mixed_5c, self.Mixed_5d],
            [self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e],
            [self.Mixed_7a, self.Mixed_7b, self.Mixed_7c],
        ]

    def _transform(self, x: Tensor) -> Tensor:
        if not self.transform_input:
            return x
        # Same arithmetic as torchvision, channel by channel, so results match bit for bit.
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        return torch.cat([x[:, c : c + 1] * (std[c] / 0.5) + (mean[c] - 0.5) / 0.5 for c in range(3)], dim=1)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(self._transform(x))))
        res2 = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(self.maxpool1(x)))
        res3 = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(self.maxpool2(res2))))
        res4 = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(res3)))))
        res5 = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(res4)))
        return {"res2": res2, "res3": res3, "res4": res4, "res5": res5}

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.global_pool(x).flatten(1)))


def _scaled_conv(w):
    """torchvision's BasicConv2d at scaled widths, for the blocks' ``conv_block`` hook (which passes published ones)."""
    from torchvision.models.inception import BasicConv2d

    def conv_block(in_channels: int, out_channels: int, **kwargs) -> nn.Module:
        return BasicConv2d(w(in_channels), w(out_channels), **kwargs)

    return conv_block


@register_backbone
def inception_v3(**kwargs) -> InceptionV3:
    """Inception-V3 (299 px input; ``width_mult`` for a narrower network)."""
    return InceptionV3(**kwargs)
