"""MobileNet (v1, Howard et al. 2017), the third network of the paper's Tables 2, 3 and 6.

A 3x3 stride-2 conv followed by 13 depthwise-separable blocks; ``width_mult`` scales every width.
Stages are cut where the stride doubles so the feature contract (res2..res5 at strides 4..32) holds;
``output_stride`` 16/8 dilates the depthwise convs of the last stages.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch.nn as nn
from torch import Tensor

from ._base import (IMAGENET_MEAN, IMAGENET_STD, Backbone, FeatureInfo, NormLayer, check_output_stride, init_weights,
                    resolve_norm)
from ._registry import register_backbone

# (output channels, stride) of the 13 depthwise-separable blocks, grouped by stage.
_STAGES = (
    ((64, 1),),                                   # stem (with the first conv): stride 2
    ((128, 2), (128, 1)),                         # res2: stride 4
    ((256, 2), (256, 1)),                         # res3: stride 8
    ((512, 2),) + ((512, 1),) * 5,                # res4: stride 16
    ((1024, 2), (1024, 1)),                       # res5: stride 32
)


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class DepthwiseSeparable(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, dilation: int, norm_layer: NormLayer):
        super().__init__()
        self.conv_dw = nn.Conv2d(in_chs, in_chs, 3, stride, padding=dilation, dilation=dilation, groups=in_chs, bias=False)
        self.bn1 = norm_layer(in_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn2 = norm_layer(out_chs)
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv_dw(x)))
        return self.act2(self.bn2(self.conv_pw(x)))


class MobileNet(Backbone):
    """MobileNet v1 with a width multiplier."""

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        width_mult: float = 1.0,
        output_stride: int = 32,
        zero_init_last: bool = False,
        norm_layer: Optional[NormLayer] = None,
        norm_eval: bool = False,
        init: Literal["xavier", "kaiming"] = "xavier",
    ):
        super().__init__(norm_eval=norm_eval)
        check_output_stride(output_stride)
        if zero_init_last:
            raise ValueError("zero_init_last (zero-gamma) applies to residual blocks; mobilenet has none")
        norm_layer = resolve_norm(norm_layer)
        self.num_classes = num_classes
        self.variant = dict(width_mult=width_mult)

        chs = _make_divisible(32 * width_mult)
        self.conv_stem = nn.Conv2d(in_chans, chs, 3, 2, 1, bias=False)
        self.bn1 = norm_layer(chs)
        self.act1 = nn.ReLU(inplace=True)

        self.feature_info = []
        net_stride, dilation = 2, 1
        for i, stage in enumerate(_STAGES):
            blocks = []
            for out, stride in stage:
                if net_stride * stride > output_stride:
                    dilation *= stride
                    stride = 1
                net_stride *= stride
                out = _make_divisible(out * width_mult)
                blocks.append(DepthwiseSeparable(chs, out, stride, dilation, norm_layer))
                chs = out
            # "stem_blocks" for the first group, layer1..layer4 for res2..res5.
            self.add_module("stem_blocks" if i == 0 else f"layer{i}", nn.Sequential(*blocks))
            if i > 0:
                self.feature_info.append(FeatureInfo(f"res{i + 1}", chs, net_stride))

        self.num_features = chs
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.reset_classifier(num_classes)
        self.default_cfg = dict(input_size=(in_chans, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD)
        init_weights(self, init)

    def stages(self) -> list[list[nn.Module]]:
        return [[self.conv_stem, self.bn1, self.stem_blocks], [self.layer1], [self.layer2], [self.layer3], [self.layer4]]

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.stem_blocks(self.act1(self.bn1(self.conv_stem(x))))


@register_backbone
def mobilenet(**kwargs) -> MobileNet:
    """MobileNet v1 (width 1.0 by default; pass ``width_mult`` for 0.25/0.5/0.75)."""
    return MobileNet(**kwargs)
