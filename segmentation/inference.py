"""Test-time inference as mmsegmentation's ``EncoderDecoder`` and ``SegTTAModel`` run it.

``model(x)`` returns ``{"out": [N, K, h, w] logits at the input resolution}`` (``segmentation.model``).

* ``whole_inference``: the whole (normalised) image at once;
* ``slide_inference``: ``crop_size`` windows every ``stride`` px (the last window of a row/column is
  moved back to end at the border; windows larger than the image shrink to it), logits summed and
  divided by the per-pixel window count, exactly as ``EncoderDecoder.slide_inference``;
* ``predict``: each scale (x flip) is inferred, flipped back, resized bilinearly (align_corners=False)
  to the label size; one view returns those logits (mmseg's ``postprocess_result``), several views
  return the mean of their softmax probabilities (mmseg's ``SegTTAModel.merge_preds``). The argmax is the
  prediction either way.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.config import ConfigError

from .transforms import rescale_size


def whole_inference(model: nn.Module, image: Tensor, num_classes: Optional[int] = None) -> Tensor:
    """Logits [N, K, H, W] of the whole batch ``image`` [N, C, H, W] (K checked when given)."""
    logits = model(image)["out"]
    if (num_classes is not None and logits.shape[1] != num_classes) or logits.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"model returned logits {tuple(logits.shape)}; expected {num_classes} classes at the "
                         f"input size {tuple(image.shape[-2:])}")
    return logits


def slide_inference(model: nn.Module, image: Tensor, crop_size: Sequence[int], stride: Sequence[int],
                    num_classes: Optional[int] = None) -> Tensor:
    """mmseg's sliding-window inference: ``crop_size`` (h, w) windows every ``stride`` (h, w) px, logits
    averaged where windows overlap. Returns [N, K, H, W]."""
    (h_crop, w_crop), (h_stride, w_stride) = crop_size, stride
    if h_stride > h_crop or w_stride > w_crop:  # windows farther apart than their size: pixels without a prediction
        raise ConfigError(f"eval.stride={list(stride)}: must be <= eval.crop_size={list(crop_size)}")
    batch, _, h_img, w_img = image.shape
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = None  # allocated at the first window when num_classes is not given
    count = image.new_zeros((batch, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2, x2 = min(h_idx * h_stride + h_crop, h_img), min(w_idx * w_stride + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            logits = whole_inference(model, image[:, :, y1:y2, x1:x2], num_classes)
            if preds is None:
                preds = logits.new_zeros((batch, logits.shape[1], h_img, w_img))
            preds[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


@torch.no_grad()
def predict(model: nn.Module, image: Tensor, label_size: Sequence[int], *, mode: str = "whole", crop_size: Sequence[int] = (512, 512), stride: Sequence[int] = (341, 341),
            scales: Sequence[float] = (1.0,), flip: bool = False,
            base_scale: Optional[Sequence[int]] = None, num_classes: Optional[int] = None) -> Tensor:
    """Scores [N, K, *label_size] of the normalised batch ``image`` [N, C, H, W].

    ``scales`` are factors of ``base_scale`` (the (long, short) resize bound, e.g. (2048, 512): the image
    is resized into ``base_scale * s`` keeping its ratio) or, with ``base_scale=None``, of the image's own
    size. ``flip`` adds the horizontally mirrored image. One view: logits; several: mean softmax
    probabilities (as mmseg's test-time augmentation).
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"inference mode {mode!r}: choose 'whole' or 'slide'")
    height, width = image.shape[-2:]
    views = []
    for s in scales:
        if base_scale is not None:
            size = rescale_size(height, width, (int(base_scale[0] * s), int(base_scale[1] * s)))
        else:
            size = (int(height * s + 0.5), int(width * s + 0.5))
        scaled = image if size == (height, width) else F.interpolate(image, size=size, mode="bilinear",
                                                                      align_corners=False)
        for mirrored in ((False, True) if flip else (False,)):
            x = scaled.flip(-1) if mirrored else scaled
            logits = whole_inference(model, x, num_classes) if mode == "whole" else \
                slide_inference(model, x, crop_size, stride, num_classes)
            if mirrored:
                logits = logits.flip(-1)
            views.append(F.interpolate(logits, size=tuple(label_size), mode="bilinear", align_corners=False))
    if len(views) == 1:
        return views[0]
    return torch.stack([v.softmax(1) for v in views]).mean(0)
