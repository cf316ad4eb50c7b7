"""Faster R-CNN with FPN around a registry backbone, on torchvision's detection modules.

``build_faster_rcnn("resnet50d", num_classes=21, weights="runs/.../model.safetensors")`` is
torchvision's ``fasterrcnn_resnet50_fpn`` with our backbone in place of torchvision's ResNet-50: same
module names (``backbone.body``, ``backbone.fpn``, ``rpn``, ``roi_heads``), so with ``resnet50b`` (=
torchvision's ``resnet50``) torchvision's Faster R-CNN state dicts load with ``strict=True`` and give the
same detections (tested). Any registered backbone works: the FPN reads its declared ``res2..res5``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from backbones import Backbone, create_backbone
from runtime.config import ConfigError

from .config import check_fpn_anchor_sizes
from .roi_align import FastMultiScaleRoIAlign


class FPNBackbone(nn.Module):
    """A registry backbone (``body``) and an FPN (``fpn``) over its ``in_features``; returns the
    ``OrderedDict`` "0".."3" + "pool" that torchvision's detection heads expect. ``channels_last``: the
    batched images enter in NHWC (convert the module's weights too: ``model.to(memory_format=...)``)."""

    def __init__(self, body: Backbone, out_channels: int = 256,
                 in_features: Sequence[str] = ("res2", "res3", "res4", "res5"), channels_last: bool = False):
        super().__init__()
        channels = {f.name: f.channels for f in body.feature_info}
        missing = [name for name in in_features if name not in channels]
        if missing:
            raise ValueError(f"backbone {getattr(body, 'arch', type(body).__name__)} has no feature(s) {missing}; "
                             f"it declares {list(channels)}")
        self.body = body
        self.in_features = tuple(in_features)
        self.fpn = FeaturePyramidNetwork([channels[name] for name in in_features], out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.body.forward_features(x)
        return self.fpn(OrderedDict((str(i), features[name]) for i, name in enumerate(self.in_features)))


def shortest_edge_size(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2's ``ResizeShortestEdge.get_output_shape``: the shorter side to ``short``, the longer one capped at
    ``max_size``, each rounded to the nearest integer (torchvision's transform rounds down: 375x500 at 800 would be
    800x1066 where detectron2 gives 800x1067)."""
    scale = short / min(height, width)
    new_h, new_w = (short, scale * width) if height < width else (scale * height, short)
    if max(new_h, new_w) > max_size:
        cap = max_size / max(new_h, new_w)
        new_h, new_w = new_h * cap, new_w * cap
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


class DetectronResize(GeneralizedRCNNTransform):
    """torchvision's ``GeneralizedRCNNTransform`` (normalise, resize, batch with padding to a multiple of 32) with
    detectron2's resize: ``shortest_edge_size`` (a size drawn per image from ``min_size`` in training, the last at
    test), bilinear with antialiasing as PIL's resize of detectron2's ``ResizeTransform`` (torchvision's omits it:
    a 2000 px photo shrunk to 1067 px aliased), boxes scaled per axis. Detections are mapped back to the original
    image by the parent's ``postprocess``."""

    def resize(self, image: Tensor, target: Optional[dict[str, Tensor]] = None):
        height, width = image.shape[-2:]
        if self.training and self._skip_resize:
            return image, target
        short = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        size = shortest_edge_size(height, width, short, self.max_size)
        if size != (height, width):
            image = nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False,
                                              antialias=True)[0]
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], (height, width), size)
        return image, target


def build_faster_rcnn(backbone: str, num_classes: int = 21, *, weights: Optional[str] = None,
                      frozen_stages: int = 1, norm_layer: Optional[str] = "frozenbatchnorm",
                      fpn_channels: int = 256, anchor_sizes: Optional[Sequence[int]] = None,
                      backbone_kwargs: Optional[dict] = None, box_fc_dim: int = 1024,
                      channels_last: bool = False, roi_align: str = "auto", **detector_kwargs) -> FasterRCNN:
    """Faster R-CNN + FPN on registry backbone ``backbone``.

    Args:
        num_classes: including the background (VOC: 20 + 1).
        weights: pretrained backbone (the suite's ``model.safetensors``, timm or torchvision files); its
            classifier is dropped.
        frozen_stages: stem and first ``k`` stages frozen (1 = torchvision's ``trainable_backbone_layers=3``,
            detectron2's ``FREEZE_AT=2``).
        norm_layer: ``"frozenbatchnorm"`` (fine-tuning a pretrained backbone, as torchvision and detectron2)
            or ``None`` for trainable BN (needed without pretrained weights: random init with frozen BN
            diverges).
        box_fc_dim: width of the box head's two fully connected layers (torchvision and detectron2: 1024).
        channels_last: NHWC weights and backbone input (the runtime's ``model.channels_last``).
        roi_align: the box head's RoI pooler, torchvision's ``MultiScaleRoIAlign`` arguments and numbers either
            way. ``"gather"``: :class:`detection.roi_align.FastMultiScaleRoIAlign` on every device (all levels
            in one gather, a backward several times faster on CPU); ``"auto"``: the gather on CPU and
            torchvision's kernel on CUDA; ``"torchvision"``: torchvision's kernel everywhere.
        backbone_kwargs: further ``create_backbone`` arguments (``width_mult``, ...).
        anchor_sizes: one anchor size (px) per FPN level P2..P6, aspect ratios 0.5/1/2 (torchvision's
            default: 32..512).
        **detector_kwargs: torchvision ``FasterRCNN`` arguments (``min_size``, ``max_size``,
            ``box_score_thresh``, ...). ``image_mean``/``image_std`` default to the backbone's.
    """
    body = create_backbone(backbone, weights=weights, num_classes=0, frozen_stages=frozen_stages, new_head=True,
                           adapt_input=True, norm_layer=norm_layer, **(backbone_kwargs or {}))
    if anchor_sizes is not None:
        check_fpn_anchor_sizes(anchor_sizes)
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        detector_kwargs["rpn_anchor_generator"] = AnchorGenerator(tuple((int(s),) for s in anchor_sizes),
                                                                  ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    if box_fc_dim != 1024 and "box_head" not in detector_kwargs:  # torchvision's TwoMLPHead is 1024 wide
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

        detector_kwargs["box_head"] = TwoMLPHead(fpn_channels * 7 * 7, box_fc_dim)
        detector_kwargs["box_predictor"] = FastRCNNPredictor(box_fc_dim, num_classes)
        num_classes = None  # torchvision takes either num_classes or a box_predictor
    if roi_align not in ("auto", "gather", "torchvision"):
        raise ConfigError(f"model.roi_align={roi_align!r}: choose auto (the gather on CPU, torchvision's kernel on "
                         "CUDA), gather or torchvision")
    if roi_align != "torchvision" and "box_roi_pool" not in detector_kwargs:  # torchvision's default arguments
        detector_kwargs["box_roi_pool"] = FastMultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2,
                                                                 on_cuda=roi_align == "gather")
    detector_kwargs.setdefault("image_mean", list(body.default_cfg["mean"]))
    detector_kwargs.setdefault("image_std", list(body.default_cfg["std"]))
    model = FasterRCNN(FPNBackbone(body, fpn_channels, channels_last=channels_last), num_classes=num_classes,
                       **detector_kwargs)
    t = model.transform  # the same settings, detectron2's resize
    model.transform = DetectronResize(t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible,
                                      t.fixed_size, _skip_resize=t._skip_resize)
    return model.to(memory_format=torch.channels_last) if channels_last else model
