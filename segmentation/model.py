"""Dilated FCN around a registry backbone (the plain-PyTorch segmentation model).

``build_fcn("resnet50d", num_classes=150, weights=...)`` runs the backbone at output stride 8 (the
FCN-D8 layout: dilation 2 and 4 in the last two stages) with one of two heads, both upsampled bilinearly
to the input:

* ``head="fcn"`` (default): mmsegmentation's ``FCNHead`` as ``fcn_r50-d8.py`` configures it: on ``res5``
  two 3x3 conv-BN-ReLU of ``channels`` (512), the input concatenated to their output and fused by a
  3x3 ``conv_cat``, dropout 0.1, a 1x1 ``conv_seg``; the auxiliary head on ``res4`` has one 3x3 conv of
  ``aux_channels`` (256) and no concatenation. Inside the head the module names are mmseg's
  (``convs.0.conv``, ``convs.0.bn``, ``conv_cat``, ``conv_seg``), so its state dict copies into
  ``mmseg.models.decode_heads.FCNHead`` key for key (tested: same logits).
* ``head="torchvision"``: torchvision's single-conv ``FCNHead``; module names equal torchvision's
  ``fcn_resnet50`` (``backbone``, ``classifier``, ``aux_classifier``), so with ``resnet50b`` its state
  dicts load with ``strict=True`` and give the same logits (tested).
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.segmentation.fcn import FCNHead as TorchvisionFCNHead

from backbones import Backbone, create_backbone


@functools.lru_cache(maxsize=64)
def bilinear_matrix(out_size: int, in_size: int, device: torch.device = torch.device("cpu"),
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """``[out_size, in_size]``: the weights of ``F.interpolate(mode="bilinear", align_corners=False)`` along one
    axis, PyTorch's rule (source ``(i + 0.5) * in / out - 0.5`` clamped at 0, the two neighbours, the last
    clamped). Cached per size, device and dtype (no host-to-device copy per iteration)."""
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
    low = src.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    frac = src - low
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    m.index_put_((rows, low), 1 - frac, accumulate=True)
    m.index_put_((rows, high), frac, accumulate=True)
    return m.to(device=device, dtype=dtype)


def resize_logits(x: Tensor, size: Sequence[int]) -> Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` of ``[N, K, h, w]`` logits. In training (x
    requires grad) as two matmuls, ``A_h @ x @ A_w^T``: the same values to float rounding, and their backward is two
    matmuls too where ``upsample_bilinear2d``'s scatters; upsampling plus cross-entropy, forward and backward, took
    0.48-0.65x the time on a CPU (bf16, one thread; 11 classes 12 -> 96 px, 21 classes 65 -> 520, 150 classes
    64 -> 512). Without grad (inference) ``F.interpolate``, which was faster there for large outputs, and under
    ``torch.compile``."""
    out_h, out_w = int(size[0]), int(size[1])
    if tuple(x.shape[-2:]) == (out_h, out_w):
        return x
    if not (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling():
        # (compiled, train.compile=true: dynamo would trace the matrices' construction into every step, past the
        # cache; inductor generates its own kernel for the interpolation)
        return F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False)
    a_h = bilinear_matrix(out_h, x.shape[-2], x.device, x.dtype)
    a_w = bilinear_matrix(out_w, x.shape[-1], x.device, x.dtype)
    return a_h @ x.contiguous() @ a_w.T


class ConvModule(nn.Module):
    """conv (no bias) -> BN -> ReLU, with mmcv ``ConvModule``'s attribute names and initialisation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=(kernel_size // 2) * dilation,
                              dilation=dilation, bias=False)
        self.bn = norm_layer(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")  # mmcv kaiming_init

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.bn(self.conv(x)))


class FCNHead(nn.Module):
    """mmseg's ``FCNHead``: ``num_convs`` conv modules, optionally ``conv_cat`` over [input, their output],
    then ``Dropout2d`` and the 1x1 classifier ``conv_seg`` (initialised N(0, 0.01), bias 0, as mmseg)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, num_convs: int = 2,
                 concat_input: bool = True, dropout: float = 0.1, kernel_size: int = 3, dilation: int = 1,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        if num_convs == 0 and in_channels != channels:
            raise ValueError(f"FCNHead with num_convs=0 needs in_channels == channels, got {in_channels} "
                             f"and {channels}")
        convs = [ConvModule(in_channels if i == 0 else channels, channels, kernel_size, dilation, norm_layer)
                 for i in range(num_convs)]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        self.conv_cat = ConvModule(in_channels + channels, channels, kernel_size, 1, norm_layer) \
            if concat_input else None
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, x: Tensor) -> Tensor:
        feats = self.convs(x)
        if self.conv_cat is not None:
            feats = self.conv_cat(torch.cat([x, feats], dim=1))
        return self.conv_seg(self.dropout(feats))


class FCN(nn.Module):
    """Backbone + decode head on ``res5`` (``classifier``) + optional auxiliary head on ``res4``."""

    def __init__(self, backbone: Backbone, classifier: nn.Module, aux_classifier: Optional[nn.Module] = None):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        """``{"out": [N, K, H, W] logits, "aux": the same from res4 (with an auxiliary head)}``."""
        size = x.shape[-2:]
        features = self.backbone.forward_features(x)
        result = OrderedDict(out=resize_logits(self.classifier(features["res5"]), size))
        if self.aux_classifier is not None:
            result["aux"] = resize_logits(self.aux_classifier(features["res4"]), size)
        return result


def build_fcn(backbone: str, num_classes: int = 150, *, weights: Optional[str] = None, head: str = "fcn",
              channels: int = 512, aux_channels: int = 256, aux: bool = True, dropout: float = 0.1,
              output_stride: int = 8, frozen_stages: int = -1,
              norm_layer: Union[None, str, Callable[[int], nn.Module]] = None, in_chans: int = 3,
              **backbone_kwargs) -> FCN:
    """FCN on registry backbone ``backbone`` (pretrained ``weights`` loaded, classifier dropped).

    ``head``: "fcn" (mmseg's FCNHead, ``channels`` / ``aux_channels`` wide, ``dropout`` before the
    classifier) or "torchvision" (its FCNHead: fixed width in_channels/4, dropout 0.1; ``channels``,
    ``aux_channels`` and ``dropout`` do not apply). ``norm_layer="syncbatchnorm"`` for multi-GPU training
    (mmseg's default) converts backbone and heads; ``None`` keeps BN.
    """
    body = create_backbone(backbone, weights=weights, num_classes=0, output_stride=output_stride, new_head=True, adapt_input=True,
                           frozen_stages=frozen_stages, norm_layer=norm_layer, in_chans=in_chans,
                           **backbone_kwargs)
    widths = {f.name: f.channels for f in body.feature_info}
    if head == "torchvision":
        classifier = TorchvisionFCNHead(widths["res5"], num_classes)
        aux_classifier = TorchvisionFCNHead(widths["res4"], num_classes) if aux else None
    elif head == "fcn":
        head_norm = norm_layer if callable(norm_layer) else nn.BatchNorm2d
        classifier = FCNHead(widths["res5"], channels, num_classes, num_convs=2, concat_input=True,
                             dropout=dropout, norm_layer=head_norm)
        aux_classifier = FCNHead(widths["res4"], aux_channels, num_classes, num_convs=1, concat_input=False,
                                 dropout=dropout, norm_layer=head_norm) if aux else None
    else:
        raise ValueError(f"FCN head {head!r}: choose 'fcn' (mmseg's FCNHead) or 'torchvision'")
    model = FCN(body, classifier, aux_classifier)
    if norm_layer == "syncbatchnorm":  # the heads too (the backbone was converted by create_backbone)
        model.classifier = nn.SyncBatchNorm.convert_sync_batchnorm(model.classifier)
        if model.aux_classifier is not None:
            model.aux_classifier = nn.SyncBatchNorm.convert_sync_batchnorm(model.aux_classifier)
    return model
