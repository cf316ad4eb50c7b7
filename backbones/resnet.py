"""ResNet in the variants of the paper (Fig. 2): original, B, C and D; depths 18 to 152.

One class; the variants are arguments:

* ``downsample_in="1x1"`` (original): the stride-2 of a downsampling bottleneck sits on its first
  1x1 conv; ``"3x3"`` (ResNet-B, torchvision / timm default) moves it to the 3x3 conv.
* ``stem="deep"`` (ResNet-C): three 3x3 convs (32, 32, 64 channels, the first with stride 2)
  replace the 7x7 conv.
* ``stem_pool=False`` (not in the paper) drops the stem's max-pool, for small images.
* ``avg_down=True`` (ResNet-D): the shortcut of a downsampling block is a 2x2 average pool with
  stride 2 followed by a stride-1 1x1 conv.

Module and parameter names equal timm's and torchvision's, so their state dicts load with
``strict=True`` (timm ``resnet50`` = torchvision ``resnet50`` = our ``resnet50b``).
"""
from __future__ import annotations

from typing import Literal, Optional

import torch.nn as nn
from torch import Tensor

from ._base import (IMAGENET_MEAN, IMAGENET_STD, Backbone, FeatureInfo, NormLayer, check_output_stride, init_weights,
                    resolve_norm)
from ._registry import register_backbone


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 dilation: int = 1, first_dilation: int = 1, downsample_in: str = "3x3",
                 norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        # A basic block has no 1x1 conv: original and B are the same network.
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=first_dilation, dilation=first_dilation, bias=False)
        self.bn1 = norm_layer(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 dilation: int = 1, first_dilation: int = 1, downsample_in: str = "3x3",
                 norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if downsample_in == "1x1" else (1, stride)
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, stride_1x1, bias=False)
        self.bn1 = norm_layer(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride_3x3, padding=first_dilation, dilation=first_dilation, bias=False)
        self.bn2 = norm_layer(width)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act3(x + shortcut)


def _shortcut(inplanes: int, outplanes: int, stride: int, avg_down: bool, norm_layer: NormLayer) -> nn.Sequential:
    if not avg_down:
        return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), norm_layer(outplanes))
    # ResNet-D path B. ceil_mode/count_include_pad as timm, so odd sizes give the same numbers.
    # A dilated stage has stride 1 here: no pooling (mmseg does the same; timm pools with 'same' padding).
    pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
    return nn.Sequential(pool, nn.Conv2d(inplanes, outplanes, 1, bias=False), norm_layer(outplanes))


class ResNet(Backbone):
    """ResNet with the paper's variants as arguments (see the module docstring)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        stem: Literal["plain", "deep"] = "plain",
        stem_width: int = 32,
        stem_pool: bool = True,
        downsample_in: Literal["1x1", "3x3"] = "3x3",
        avg_down: bool = False,
        width_mult: float = 1.0,
        output_stride: int = 32,
        zero_init_last: bool = False,
        norm_layer: Optional[NormLayer] = None,
        norm_eval: bool = False,
        init: Literal["xavier", "kaiming"] = "xavier",
    ):
        super().__init__(norm_eval=norm_eval)
        check_output_stride(output_stride)
        if downsample_in not in ("1x1", "3x3"):
            raise ValueError(f"downsample_in must be '1x1' or '3x3', got {downsample_in!r}")
        norm_layer = resolve_norm(norm_layer)
        self.num_classes = num_classes
        self.variant = dict(depth=_depth(block, layers), stem=stem, downsample_in=downsample_in, avg_down=avg_down)
        if width_mult != 1.0:  # a narrower network for small inputs; 1.0 keeps the published shapes
            self.variant["width_mult"] = width_mult
        if stem == "deep" and stem_width != 32:  # the published deep stems are 32 wide (exports refuse others)
            self.variant["stem_width"] = stem_width
        widths = [int(round(w * width_mult)) for w in (64, 128, 256, 512)]
        stem_width = int(round(stem_width * width_mult))

        inplanes = widths[0]
        if stem == "deep":
            self.conv1 = nn.Sequential(
                nn.Conv2d(in_chans, stem_width, 3, 2, 1, bias=False), norm_layer(stem_width), nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, stem_width, 3, 1, 1, bias=False), norm_layer(stem_width), nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, inplanes, 3, 1, 1, bias=False),
            )
        elif stem == "plain":
            self.conv1 = nn.Conv2d(in_chans, inplanes, 7, 2, 3, bias=False)
        else:
            raise ValueError(f"stem must be 'plain' or 'deep', got {stem!r}")
        self.bn1 = norm_layer(inplanes)
        self.act1 = nn.ReLU(inplace=True)
        # stem_pool=False drops the stride-2 max-pool (small images, e.g. 28-32 px): every stage runs at
        # twice the resolution, as for an input of twice the size, without upsampling the image.
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem_pool else nn.Identity()
        if not stem_pool:
            self.variant["stem_pool"] = False

        self.feature_info = []
        net_stride, dilation = (4 if stem_pool else 2), 1
        for i, (planes, num_blocks) in enumerate(zip(widths, layers)):
            stride = 1 if i == 0 else 2
            prev_dilation = dilation
            if net_stride * stride > output_stride:  # past the output stride: dilate instead
                dilation *= stride
                stride = 1
            net_stride *= stride
            outplanes = planes * block.expansion
            downsample = None
            if stride != 1 or inplanes != outplanes:
                downsample = _shortcut(inplanes, outplanes, stride, avg_down, norm_layer)
            blocks = [block(inplanes, planes, stride, downsample, dilation, prev_dilation, downsample_in, norm_layer)]
            blocks += [block(outplanes, planes, 1, None, dilation, dilation, downsample_in, norm_layer)
                       for _ in range(1, num_blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(FeatureInfo(f"res{i + 2}", outplanes, net_stride))
            inplanes = outplanes

        self.num_features = inplanes
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.reset_classifier(num_classes)
        self.default_cfg = dict(input_size=(in_chans, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD)

        init_weights(self, init)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_norm().weight)

    def stages(self) -> list[list[nn.Module]]:
        return [[self.conv1, self.bn1], [self.layer1], [self.layer2], [self.layer3], [self.layer4]]

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.act1(self.bn1(self.conv1(x))))


def _depth(block, layers) -> int:
    return sum(layers) * (3 if block is Bottleneck else 2) + 2


_LAYERS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}
# The paper's variants (Fig. 2) as data.
_VARIANTS = {
    "": dict(stem="plain", downsample_in="1x1", avg_down=False),
    "b": dict(stem="plain", downsample_in="3x3", avg_down=False),
    "c": dict(stem="deep", downsample_in="3x3", avg_down=False),
    "d": dict(stem="deep", downsample_in="3x3", avg_down=True),
}


def _register(depth: int, variant: str) -> None:
    block, layers = _LAYERS[depth]
    defaults = _VARIANTS[variant]

    def build(**kwargs) -> ResNet:
        return ResNet(block, layers, **{**defaults, **kwargs})

    original = "original = ResNet-B for basic blocks" if block is BasicBlock else "original (stride on the 1x1 conv)"
    kind = {"": original, "b": "ResNet-B (stride on the 3x3 conv)", "c": "ResNet-C (deep stem)",
            "d": "ResNet-D (deep stem, avg-pool shortcut)"}[variant]
    build.__doc__ = f"ResNet-{depth}, {kind}."
    register_backbone(build, name=f"resnet{depth}{variant}")


# resnet18 ... resnet152d: 5 depths x 4 variants. For 18/34 "" and "b" are the same network.
for _d in _LAYERS:
    for _v in _VARIANTS:
        _register(_d, _v)
