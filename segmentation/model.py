"""Dilated FCN around a registry backbone (the plain-PyTorch segmentation model).

``build_fcn("resnet50d", num_classes=150, weights=...)`` runs the backbone at output stride 8 (the
FCN-D8 layout: dilation 2 and 4 in the last two stages), torchvision's ``FCNHead`` on ``res5`` and an
auxiliary ``FCNHead`` on ``res4``, both upsampled bilinearly to the input. Module names equal
torchvision's ``fcn_resnet50`` (``backbone``, ``classifier``, ``aux_classifier``), so with ``resnet50b``
its state dicts load with ``strict=True`` and give the same logits (tested).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.segmentation.fcn import FCNHead

from backbones import Backbone, create_backbone


class FCN(nn.Module):
    def __init__(self, backbone: Backbone, num_classes: int, aux: bool = True):
        super().__init__()
        channels = {f.name: f.channels for f in backbone.feature_info}
        self.backbone = backbone
        self.classifier = FCNHead(channels["res5"], num_classes)
        self.aux_classifier = FCNHead(channels["res4"], num_classes) if aux else None

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        """``{"out": [N, K, H, W] logits, "aux": the same from res4 (with ``aux``)}``."""
        size = x.shape[-2:]
        features = self.backbone.forward_features(x)
        result = OrderedDict(out=F.interpolate(self.classifier(features["res5"]), size=size, mode="bilinear",
                                               align_corners=False))
        if self.aux_classifier is not None:
            result["aux"] = F.interpolate(self.aux_classifier(features["res4"]), size=size, mode="bilinear",
                                          align_corners=False)
        return result


def build_fcn(backbone: str, num_classes: int = 150, *, weights: Optional[str] = None, output_stride: int = 8,
              aux: bool = True, frozen_stages: int = -1, norm_layer: Optional[str] = None) -> FCN:
    """FCN on registry backbone ``backbone`` (pretrained ``weights`` loaded, classifier dropped).

    ``norm_layer="syncbatchnorm"`` for multi-GPU training (mmseg's default), ``None`` keeps BN.
    """
    body = create_backbone(backbone, weights=weights, num_classes=0, output_stride=output_stride,
                           frozen_stages=frozen_stages, norm_layer=norm_layer)
    return FCN(body, num_classes, aux)
