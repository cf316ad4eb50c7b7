"""mmsegmentation's ADE20K training pipeline on ``(tv_tensors.Image uint8 [3, H, W], tv_tensors.Mask [H, W])``.

As ``mmseg/configs/_base_/datasets/ade20k.py`` runs it (after ``LoadAnnotations(reduce_zero_label=True)``,
which ``segmentation.ade20k`` already did):

1. ``RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)``: the scale times
   r ~ U[0.5, 2.0], truncated to ints, then mmcv's keep-ratio rule ``f = min(long / max(h, w),
   short / min(h, w))``, new size ``int(side * f + 0.5)``; bilinear for the image (no antialias, as
   cv2's ``INTER_LINEAR``), nearest for the mask;
2. ``RandomCrop(crop_size, cat_max_ratio=0.75)``: re-drawn up to 10 times while one class (255 left
   out) covers ``>= 0.75`` of the crop's labelled pixels or only one class is present;
3. ``RandomFlip(prob=0.5)``: torchvision's ``RandomHorizontalFlip``;
4. ``PhotoMetricDistortion``: on uint8 as mmseg (OpenCV's uint8 HSV conversions reproduced from its
   reference code; tested against mmseg on equal draws);
5. no padding here: mmseg's ``SegDataPreProcessor`` pads per batch, after normalisation (image 0 = the
   mean colour, mask 255); ``pad_batch`` stacks a batch and ``segmentation.train.Normalize`` does the rest.

Every random draw comes from torch's global generator (``torch.rand`` / ``torch.randint``), so seeding
torch before a call fixes the whole sample. Normalisation is left to the trainer (on the device).
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IGNORE_INDEX = 255


def rescale_size(height: int, width: int, scale: Sequence[float]) -> tuple[int, int]:
    """mmcv's ``rescale_size`` with a (long, short) bound: the largest ratio-keeping size inside it.
    Returns ``(new_height, new_width)``."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def _image_size(flat_inputs: list[Any]) -> tuple[int, int]:
    for inpt in flat_inputs:
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return tuple(inpt.shape[-2:])
    raise TypeError("segmentation transforms expect a tv_tensors.Image or tv_tensors.Mask in the sample")


@functools.lru_cache(maxsize=512)
def _nearest_index(dst: int, src: int) -> torch.Tensor:
    """The source row (or column) of each of ``dst`` output ones in cv2's ``INTER_NEAREST``:
    ``floor(i * (1 / (dst / src)))`` in float64, clamped to ``src - 1`` (torch's float32 ``i * src / dst`` lands one
    pixel apart where the product is an integer in exact arithmetic)."""
    scale = 1.0 / (dst / src)  # cached per size pair: read it, never write it
    return torch.floor(torch.arange(dst, dtype=torch.float64) * scale).long().clamp_(max=src - 1)


def _resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    # antialias=False: mmcv resizes with cv2 INTER_LINEAR, which does not low-pass when shrinking
    return F.resize_image(image, list(size), interpolation=v2.InterpolationMode.BILINEAR, antialias=False)


def _resize_mask(mask: Tensor | np.ndarray, size: tuple[int, int]) -> Tensor | np.ndarray:
    """Nearest, as cv2's INTER_NEAREST (mmcv's imresize of the label): the source rows, then the source columns,
    of a tensor or (the training loader's) a numpy array."""
    rows, cols = _nearest_index(size[0], mask.shape[-2]), _nearest_index(size[1], mask.shape[-1])
    if isinstance(mask, np.ndarray):
        rows, cols = rows.numpy(), cols.numpy()
    return mask[..., rows, :][..., cols]


def _resize(inpt: Any, size: tuple[int, int]) -> Any:
    if isinstance(inpt, tv_tensors.Mask):
        return tv_tensors.wrap(_resize_mask(inpt.as_subclass(Tensor), size), like=inpt)
    return tv_tensors.wrap(_resize_image(inpt.as_subclass(Tensor), size), like=inpt)


class RandomResize(v2.Transform):
    """mmcv ``RandomResize(scale, ratio_range, keep_ratio=True)``: image bilinear, mask nearest."""

    _transformed_types = (tv_tensors.Image, tv_tensors.Mask)

    def __init__(self, scale: Sequence[int] = (2048, 512), ratio_range: Sequence[float] = (0.5, 2.0)):
        super().__init__()
        self.scale, self.ratio_range = tuple(scale), tuple(ratio_range)

    def draw_size(self, height: int, width: int) -> tuple[int, int]:
        """The new ``(height, width)`` of an image of this size: one draw of the ratio."""
        lo, hi = self.ratio_range
        ratio = float(torch.rand(())) * (hi - lo) + lo
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        return rescale_size(height, width, target)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"size": self.draw_size(*_image_size(flat_inputs))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return _resize(inpt, params["size"])


class KeepRatioResize(v2.Transform):
    """mmcv ``Resize(scale, keep_ratio=True)`` of the image only (evaluation: labels keep their size)."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, scale: Sequence[int] = (2048, 512)):
        super().__init__()
        self.scale = tuple(scale)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"size": rescale_size(*_image_size(flat_inputs), self.scale)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return _resize(inpt, params["size"])


class CatMaxRatioCrop(v2.Transform):
    """mmseg ``RandomCrop(crop_size, cat_max_ratio, ignore_index)``: a ``crop_size`` (h, w) window (the
    whole side where the image is smaller), re-drawn up to 10 times unless more than one class is in it
    and the largest covers less than ``cat_max_ratio`` of its non-ignored pixels; after 10 failures the
    11th draw is kept unchecked, as mmseg does."""

    _transformed_types = (tv_tensors.Image, tv_tensors.Mask)

    def __init__(self, crop_size: Sequence[int] = (512, 512), cat_max_ratio: float = 0.75,
                 ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.crop_size, self.cat_max_ratio, self.ignore_index = tuple(crop_size), cat_max_ratio, ignore_index

    def _draw(self, height: int, width: int) -> tuple[int, int, int, int]:
        margin_h, margin_w = max(height - self.crop_size[0], 0), max(width - self.crop_size[1], 0)
        top = int(torch.randint(0, margin_h + 1, ()))
        left = int(torch.randint(0, margin_w + 1, ()))
        return top, min(top + self.crop_size[0], height), left, min(left + self.crop_size[1], width)

    def draw_box(self, height: int, width: int, mask: Tensor | np.ndarray | None = None) -> tuple[int, int, int, int]:
        """``(y1, y2, x1, x2)`` of the crop of an image of this size, re-drawn against ``mask`` ([..., H, W]) as
        mmseg does (in numpy, as mmseg: the class shares in float64)."""
        box = self._draw(height, width)
        if self.cat_max_ratio >= 1 or mask is None:
            return box
        labels = mask.numpy() if isinstance(mask, Tensor) else mask
        if labels.dtype.kind not in "iu":
            labels = labels.astype(np.int64)
        dominant = None  # the class that filled the last rejected window
        for _ in range(10):
            y1, y2, x1, x2 = box
            window = labels[..., y1:y2, x1:x2]
            # Rejected at once when the last dominant class alone covers cat_max_ratio of the whole window (so of
            # its non-ignored pixels, and the largest class does): one comparison instead of a histogram, the
            # same decision (a rounded quotient is monotonic in both terms).
            if dominant is None or np.count_nonzero(window == dominant) / window.size < self.cat_max_ratio:
                counts = np.bincount(window.ravel(), minlength=self.ignore_index + 1)
                counts[self.ignore_index] = 0  # the ignored pixels left out
                if np.count_nonzero(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                dominant = counts.argmax() if counts.any() else None  # (all ignored: none)
            box = self._draw(height, width)
        return box

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        masks = [x.as_subclass(Tensor) for x in flat_inputs if isinstance(x, tv_tensors.Mask)]
        return {"box": self.draw_box(*_image_size(flat_inputs), masks[0] if masks else None)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        y1, y2, x1, x2 = params["box"]
        return F.crop(inpt, y1, x1, y2 - y1, x2 - x1)


def pad_batch(images: Sequence[Tensor], masks: Sequence[Tensor], size: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Stack crops (at most ``size`` (h, w)) padded at the right and bottom to ``size``, as mmseg's
    ``stack_batch`` does: ``(images [N, C, h, w] in their dtype, masks [N, h, w] padded with 255, sizes
    [N, 2] = each crop's (height, width))``.

    The image padding here is a placeholder (0 in the image's dtype): mmseg's ``SegDataPreProcessor``
    normalises first and pads with 0, i.e. the mean colour, so the value that reaches the network is set
    after normalisation (``segmentation.train.Normalize`` zeroes everything outside ``sizes``). Padding
    uint8 with 0 and normalising afterwards would feed black (about -2 sigma) instead."""
    height, width = size
    if any(im.shape[-2] > height or im.shape[-1] > width for im in images):
        raise ValueError(f"pad_batch: a crop is larger than the pad size {tuple(size)}: "
                         f"{[tuple(im.shape[-2:]) for im in images]}")
    batch = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    # one dtype for all masks: uint8 (8-bit annotations) unless one is wider, whose values must not wrap
    dtype = functools.reduce(torch.promote_types, (m.dtype for m in masks))
    labels = torch.full((len(masks), height, width), IGNORE_INDEX, dtype=dtype)
    sizes = torch.empty((len(images), 2), dtype=torch.int64)
    for i, (image, mask) in enumerate(zip(images, masks)):
        h, w = image.shape[-2:]
        batch[i, :, :h, :w] = image
        labels[i, :h, :w] = mask
        sizes[i, 0], sizes[i, 1] = h, w
    return batch, labels, sizes


# --- PhotoMetricDistortion -------------------------------------------------------------------------------
# Written here because torchvision's ColorJitter works in float HSV with its own formulas; mmseg converts
# uint8 with OpenCV (H in 0..179, fixed-point tables) and truncates after each step. Reproducing that
# keeps our training inputs equal to mmseg's on equal draws.

_HSV_SHIFT = 12
_SDIV = torch.tensor([0] + [round((255 << _HSV_SHIFT) / i) for i in range(1, 256)], dtype=torch.int32)
_HDIV = torch.tensor([0] + [round((180 << _HSV_SHIFT) / (6 * i)) for i in range(1, 256)], dtype=torch.int32)


@functools.lru_cache(maxsize=16)
def _on(table: Tensor, device: torch.device) -> Tensor:
    """A constant table on ``device``, copied there once (the colour steps run in the loader workers or, with
    ``data.photometric_on=device``, on the training device)."""
    return table.to(device)


@functools.lru_cache(maxsize=1)
def _hsv_tables() -> tuple[Tensor, Tensor]:
    """OpenCV's fixed-point S and H as uint8 tables: ``S[v << 8 | diff] = (diff * _SDIV[v] + 2^11) >> 12`` and
    ``H[(h + 255) << 8 | diff] = (h * _HDIV[diff] + 2^11) >> 12``, plus 180 where negative, for the sector
    offset ``h`` in -255..1275 (``g - b``, ``b - r + 2 diff`` or ``r - g + 4 diff``). Pairs that no colour has
    (``h`` outside ``-diff..5 diff``) are clipped into uint8; they are never read. int64 arithmetic: exact."""
    half = 1 << (_HSV_SHIFT - 1)
    diff = torch.arange(256, dtype=torch.int64)
    s = (diff.view(1, -1) * _SDIV.long().view(-1, 1) + half) >> _HSV_SHIFT
    h = (torch.arange(-255, 1276).view(-1, 1) * _HDIV.long().view(1, -1) + half) >> _HSV_SHIFT
    h = torch.where(h < 0, h + 180, h)
    return h.clamp(0, 255).to(torch.uint8).flatten(), s.clamp(0, 255).to(torch.uint8).flatten()


def rgb_to_hsv_u8(image: Tensor) -> Tensor:
    """OpenCV ``COLOR_RGB2HSV`` on uint8 [..., 3, H, W]: H in 0..179 (degrees / 2), S, V in 0..255; equal to
    ``cv2.cvtColor`` on all 2^24 colours (tested). V and the spread ``diff`` in uint8, the hue's sector offset in
    int16 (-255..1275), then S and H read from OpenCV's fixed-point arithmetic tabulated (``_hsv_tables``): 0.6x the
    time of the same arithmetic in int32 on the pixels."""
    r8, g8, b8 = image.unbind(-3)
    v8 = torch.maximum(torch.maximum(r8, g8), b8)
    diff8 = v8 - torch.minimum(torch.minimum(r8, g8), b8)
    r, g, b = image.to(torch.int16).unbind(-3)
    diff = diff8.to(torch.int16)
    # OpenCV's "v == r ? g - b : v == g ? b - r + 2 diff : r - g + 4 diff", without branches: torch.where on
    # integers branches per element, and mispredicts on image data (5x the time of these products)
    h = r - g + 4 * diff
    h = h + (b - r + 2 * diff - h) * (v8 == g8)
    h = h + (g - b - h) * (v8 == r8)
    diff32 = diff8.to(torch.int32)
    h_table, s_table = (_on(table, image.device) for table in _hsv_tables())
    # table lookups by index_select: a fifth of the time of advanced indexing on the CPU
    s = s_table.index_select(0, (v8.to(torch.int32) << 8 | diff32).flatten()).view(v8.shape)
    h = h_table.index_select(0, ((h.to(torch.int32) + 255) << 8 | diff32).flatten())
    return torch.stack([h.view(v8.shape), s, v8], -3)


# (r, g, b) indices into (v, p, q, t) per sector, from OpenCV's sector_data {b, g, r}
_SECTOR_ORDER = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


@functools.lru_cache(maxsize=1)
def _hsv_to_rgb_coefficients() -> Tensor:
    """float32 [3, 256 * 256]: for each (h, s) of uint8 HSV (column ``h * 256 + s``), the factors of V that give
    R, G and B in ``hsv_to_rgb_u8``: 1, ``1 - s``, ``1 - s*f`` or ``1 - s*(1 - f)`` (OpenCV's v, p, q, t over v)
    by the hue's sector. Computed once, by OpenCV's scalar code in float32, with ``1 - s*h`` fused."""
    h, s = torch.meshgrid(torch.arange(256, dtype=torch.float32), torch.arange(256, dtype=torch.float32), indexing="ij")
    h, s = h.flatten(), s.flatten() * torch.tensor(1 / 255, dtype=torch.float32)
    h = torch.fmod(h * (torch.tensor(6.0) / 180), 6.0)
    sector = torch.floor(h)
    frac = h - sector

    def one_minus(a: Tensor, b: Tensor) -> Tensor:  # 1 - a*b fused (as OpenCV's build): a*b exact in float64
        return (1 - a.double() * b.double()).float()

    factors = torch.stack([torch.ones_like(s), 1 - s, one_minus(s, frac), one_minus(s, 1 - frac)], -1)  # v, p, q, t
    return torch.gather(factors, -1, _SECTOR_ORDER[sector.to(torch.int64)]).t().contiguous()


def hsv_to_rgb_u8(hsv: Tensor) -> Tensor:
    """OpenCV ``COLOR_HSV2RGB`` on uint8 [..., 3, H, W] as its scalar code computes it: float32 arithmetic
    with ``1 - s*h`` fused, rounded half to even. OpenCV's SIMD path, which it takes for full vector blocks
    of a row, truncates instead, so mmseg's own output differs from this by one level at some pixels
    depending on their position in the row; this follows the position-independent scalar code.

    Each channel is ``round(255 * (v * factor(h, s)))`` with ``v`` scaled to 0..1: the factors of every
    (h, s) pair come from a table computed once (``_hsv_to_rgb_coefficients``), so a pixel costs a lookup
    and one float32 product, the same product the formula computes."""
    h, s, v = hsv.unbind(-3)
    index = (h.to(torch.int32) << 8 | s.to(torch.int32)).flatten()
    v = v.to(torch.float32).flatten() * torch.tensor(1 / 255, dtype=torch.float32)
    factors = _on(_hsv_to_rgb_coefficients(), hsv.device)  # a plane per channel, read by index_select
    rgb = torch.stack([torch.round((v * factors[c].index_select(0, index)) * 255) for c in range(3)])
    return rgb.clamp_(0, 255).to(torch.uint8).view(3, *h.shape).movedim(0, -3).contiguous()


def _convert(x: Tensor, alpha: float | Tensor = 1.0, beta: float | Tensor = 0.0) -> Tensor:
    """mmseg's ``convert``: float32 ``x * alpha + beta``, clipped to 0..255, truncated to uint8 (``alpha`` and
    ``beta`` scalars or float32 tensors broadcast over ``x``)."""
    return (x.to(torch.float32) * alpha + beta).clamp(0, 255).to(torch.uint8)


def draw_photometric_params(brightness_delta: int = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                            saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18) -> dict:
    """The draws of one ``PhotoMetricDistortion`` call (``None`` = step skipped), from torch's RNG.

    The hue shift is an integer in ``[-hue_delta, hue_delta)``: mmseg calls ``numpy.random.randint(-18, 18)``
    whose upper bound is exclusive."""
    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), dtype=torch.float64))

    def coin() -> bool:
        return bool(torch.randint(0, 2, ()))

    # drawn in the order mmseg draws them, so a numpy.random stand-in backed by torch replays mmseg exactly
    params = {"brightness": uniform(-brightness_delta, brightness_delta) if coin() else None}
    params["contrast_first"] = coin()
    contrast = (uniform(*contrast_range) if coin() else None) if params["contrast_first"] else None
    params["saturation"] = uniform(*saturation_range) if coin() else None
    params["hue"] = int(torch.randint(-hue_delta, hue_delta, ())) if coin() else None
    if not params["contrast_first"]:
        contrast = uniform(*contrast_range) if coin() else None
    params["contrast"] = contrast
    return params


def photometric_distortion(image: Tensor, params: dict) -> Tensor:
    """mmseg's ``PhotoMetricDistortion.transform`` on an RGB uint8 [3, H, W] image with fixed draws."""
    if params["brightness"] is not None:
        image = _convert(image, beta=params["brightness"])
    if params["contrast_first"] and params["contrast"] is not None:
        image = _convert(image, alpha=params["contrast"])
    if params["saturation"] is not None:
        hsv = rgb_to_hsv_u8(image)
        hsv[1] = _convert(hsv[1], alpha=params["saturation"])
        image = hsv_to_rgb_u8(hsv)
    if params["hue"] is not None:
        hsv = rgb_to_hsv_u8(image)
        hsv[0] = ((hsv[0].to(torch.int64) + params["hue"]) % 180).to(torch.uint8)
        image = hsv_to_rgb_u8(hsv)
    if not params["contrast_first"] and params["contrast"] is not None:
        image = _convert(image, alpha=params["contrast"])
    return image


# Pixels per piece of a batch on the CPU: the colour steps make about thirty passes over int32 / float32 copies of
# their input, which stay in a core's cache on pieces this size (a 4x3x512x512 batch with every step: 0.67x the
# time of one piece; 2^15 and 2^17 measured slower).
_CPU_PIECE = 1 << 16


def photometric_distortion_batch(images: Tensor, params: Sequence[Optional[dict]]) -> Tensor:
    """``photometric_distortion`` of each image of a uint8 batch [N, 3, H, W] with its own draws
    (``params[i]``; ``None``: left as it is), computed batch-wide: the same pixels as image by image (each step
    is per pixel, so padding is harmless and the crops may be padded), at a fraction of the per-image
    operator overhead. The brightness and contrast steps run on the whole batch with the identity
    (``alpha`` 1, ``beta`` 0, exact in float32) where an image skips them; the HSV steps, which are not the
    identity even without a change (OpenCV's conversions round), only on the images that take them. On the
    CPU a large batch goes in pieces of rows (``_CPU_PIECE`` pixels). ``images`` is not modified."""
    n = len(params)
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] != n:
        raise ValueError(f"photometric_distortion_batch: expected uint8 [N, 3, H, W] with N = {n} draws, got "
                         f"{images.dtype} {tuple(images.shape)}")
    draws = [p or {"brightness": None, "contrast_first": False, "contrast": None, "saturation": None, "hue": None}
             for p in params]
    # brightness and contrast map each image's 256 levels: one table before the HSV steps (the brightness step and
    # a first contrast step composed), one after (a last contrast step), built once for all pieces
    contrast = [d["contrast"] if d["contrast"] is not None else 1.0 for d in draws]
    before = _levels(images.device, ([1.0] * n, [d["brightness"] if d["brightness"] is not None else 0.0
                                                 for d in draws]),
                     ([c if d["contrast_first"] else 1.0 for c, d in zip(contrast, draws)], [0.0] * n))
    after = _levels(images.device, ([1.0 if d["contrast_first"] else c for c, d in zip(contrast, draws)], [0.0] * n))
    pieces = images[:, 0].numel() // _CPU_PIECE
    if images.device.type != "cpu" or pieces < 2:
        return _distort(images, draws, before, after)
    rows = -(-images.shape[-2] // pieces)
    out = torch.empty_like(images)
    for top in range(0, images.shape[-2], rows):
        out[..., top:top + rows, :] = _distort(images[..., top:top + rows, :], draws, before, after)
    return out


def _levels(device: torch.device, *steps: tuple[list, list]) -> Optional[Tensor]:
    """[N * 256] uint8: each image's levels 0..255 through ``_convert(alpha, beta)`` of each step ``(alpha per
    image, beta per image)`` in turn (the same float32 operations as on its pixels); None where every step is
    the identity."""
    steps = tuple((a, b) for a, b in steps if any(x != 1.0 for x in a) or any(x != 0.0 for x in b))
    if not steps:
        return None
    n = len(steps[0][0])
    table = torch.arange(256, dtype=torch.uint8, device=device).expand(n, 256)
    for alpha, beta in steps:
        alpha, beta = (torch.tensor(v, dtype=torch.float32, device=device).view(-1, 1) for v in (alpha, beta))
        table = _convert(table, alpha, beta)
    return table.flatten()


def _look_up(images: Tensor, table: Optional[Tensor]) -> Tensor:
    """Each image's pixels [N, ...] through its 256 levels of ``table`` (``_levels``; None: as they are)."""
    if table is None:
        return images
    offset = (torch.arange(images.shape[0], dtype=torch.int32, device=images.device) * 256).view(-1, 1, 1, 1)
    return table.index_select(0, (images.to(torch.int32) + offset).flatten()).view(images.shape)


def _distort(images: Tensor, draws: list[dict], before: Optional[Tensor], after: Optional[Tensor]) -> Tensor:
    """``photometric_distortion_batch``'s steps on a batch (or a piece of its rows), into a new tensor: the
    ``before`` levels, the HSV steps, the ``after`` levels."""
    device = images.device
    given = images
    images = _look_up(images, before)
    for step in ("saturation", "hue"):
        chosen = [i for i, d in enumerate(draws) if d[step] is not None]
        if not chosen:
            continue
        every = len(chosen) == len(draws)  # the whole batch: no gather and scatter
        hsv = rgb_to_hsv_u8(images if every else images[chosen])
        if step == "saturation":
            alpha = torch.tensor([draws[i]["saturation"] for i in chosen], dtype=torch.float32,
                                 device=device).view(-1, 1, 1)
            hsv[:, 1] = (hsv[:, 1].to(torch.float32) * alpha).clamp(0, 255).to(torch.uint8)
        else:
            shift = torch.tensor([draws[i]["hue"] for i in chosen], dtype=torch.int32, device=device).view(-1, 1, 1)
            hsv[:, 0] = ((hsv[:, 0].to(torch.int32) + shift) % 180).to(torch.uint8)
        if every:
            images = hsv_to_rgb_u8(hsv)
            continue
        if images is given:  # written in place below: never into the caller's tensor
            images = images.clone()
        images[chosen] = hsv_to_rgb_u8(hsv)
    images = _look_up(images, after)
    return images.clone() if images is given else images


class PhotoMetricDistortion(v2.Transform):
    """mmseg ``PhotoMetricDistortion`` (brightness +-32, contrast 0.5-1.5 before or after the HSV steps,
    saturation 0.5-1.5, hue +-18; each with probability 0.5) on the uint8 image; masks pass through."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, brightness_delta: int = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18):
        super().__init__()
        self.ranges = dict(brightness_delta=brightness_delta, contrast_range=tuple(contrast_range),
                           saturation_range=tuple(saturation_range), hue_delta=hue_delta)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return draw_photometric_params(**self.ranges)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if inpt.dtype != torch.uint8:
            raise TypeError(f"PhotoMetricDistortion works on uint8 images (as mmseg), got {inpt.dtype}")
        return tv_tensors.wrap(photometric_distortion(inpt.as_subclass(Tensor), params), like=inpt)


def build_train_transform(data_cfg) -> v2.Compose:
    """mmseg's ADE20K training pipeline from a ``SegDataConfig`` (scale, ratio_range, crop_size,
    cat_max_ratio, hflip, photometric); call as ``image, mask = transform(image, mask)``. The crop is at
    most ``crop_size``: smaller where the resized image is (``pad_batch`` pads the batch). The trainer runs
    ``build_spatial_transform`` per sample and the photometric step batch-wide (``photometric_distortion_batch``)."""
    steps = list(build_spatial_transform(data_cfg).transforms)
    if data_cfg.photometric:
        steps.append(PhotoMetricDistortion())
    return v2.Compose(steps)  # crops smaller than crop_size are padded per batch (pad_batch), as mmseg


def build_spatial_transform(data_cfg) -> v2.Compose:
    """The geometric steps of ``build_train_transform`` (resize, crop, flip), which draw first: the
    photometric draws follow them (``draw_photometric_params``) in the same order as the whole pipeline."""
    return v2.Compose([
        RandomResize(data_cfg.scale, data_cfg.ratio_range),
        CatMaxRatioCrop(data_cfg.crop_size, data_cfg.cat_max_ratio),
        v2.RandomHorizontalFlip(p=data_cfg.hflip),
    ])


class SpatialSteps:
    """``build_spatial_transform`` on plain tensors, ``(image uint8 [C, H, W], mask [H, W]) -> (image, mask)`` (the
    mask a tensor or an array, returned as a tensor of its dtype):
    the same draws in the same order (ratio, crop boxes, flip) and the same pixels, without ``v2.Compose``'s
    per-call dispatch (tv_tensor wrapping, input flattening), which costs more than the resize itself on small
    images. The training loader's per-sample step (``segmentation.train``)."""

    def __init__(self, data_cfg):
        self.resize = RandomResize(data_cfg.scale, data_cfg.ratio_range)
        self.crop = CatMaxRatioCrop(data_cfg.crop_size, data_cfg.cat_max_ratio)
        self.hflip = data_cfg.hflip

    def __call__(self, image: Tensor, mask: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
        size = self.resize.draw_size(*image.shape[-2:])
        image = _resize_image(image, size)
        # the mask in numpy: its row-then-column gather and the crop's bincounts cost a fraction of torch's there
        labels = _resize_mask(mask.numpy() if isinstance(mask, Tensor) else mask, size)
        y1, y2, x1, x2 = self.crop.draw_box(*size, labels)
        image, labels = image[..., y1:y2, x1:x2], labels[..., y1:y2, x1:x2]
        if not torch.rand(1) >= self.hflip:  # v2.RandomHorizontalFlip's draw and test
            image, labels = image.flip(-1), labels[..., ::-1]
        return image, torch.from_numpy(np.ascontiguousarray(labels))


def build_eval_transform(data_cfg) -> v2.Compose:
    """mmseg's test pipeline: the image resized into ``data_cfg.scale`` keeping its ratio; the label keeps
    its original size (predictions are resized back to it)."""
    return v2.Compose([KeepRatioResize(data_cfg.scale)])
