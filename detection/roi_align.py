"""RoIAlign as one weighted gather: the same numbers as ``torchvision.ops.roi_align``, a faster backward.

torchvision's CPU ``roi_align`` backward recomputes every sample's bilinear weights once per channel and
adds them one value at a time; in the torchvision engine's Faster R-CNN it took about half of a training
iteration on CPU (``torch.profiler``, benchmarks/results/roi_align.md). Here the samples are computed once
per RoI, for all channels and (``multiscale_roi_align``) all FPN levels at once: each output bin is a bag of
(feature row, bilinear weight) pairs over the feature maps seen as rows of channels, so the forward is one
``embedding_bag`` and the backward its weighted scatter-add, both vectorised over channels.

Semantics follow torchvision's kernel (``csrc/ops/cpu/roi_align_kernel.cpp``) to the letter: ``aligned``
(the half-pixel offset), ``sampling_ratio <= 0`` (an adaptive ``ceil(roi_size / output_size)`` grid per
RoI), RoIs at least 1x1 unless aligned, samples beyond ``[-1, size]`` contributing 0, clamping at the
border, the mean over a bin's samples. The boxes get no gradient, as in torchvision. Computed in fp32 (as
torchvision's autocast rule does) and returned in the features' dtype.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

__all__ = ["roi_align", "multiscale_roi_align", "FastMultiScaleRoIAlign"]


def _pair(size: Union[int, Sequence[int]]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _axis(start: Tensor, bin_size: Tensor, grid: Tensor, grid_max: int, bins: int, size: Tensor) -> tuple[Tensor, Tensor]:
    """One axis of the samples: for RoI k, bin p and sample i of the bin (K, P, G), the two neighbouring
    cells' indices and linear weights (K, P, G, 2), as the kernel's ``bilinear_interpolate`` computes them.
    Samples past a RoI's own grid (``i >= grid[k]``: the adaptive grid padded to the largest) and samples
    outside ``[-1, size]`` get weight 0."""
    f = start.dtype
    p = torch.arange(bins, device=start.device).to(f)[None, :, None]
    i = torch.arange(grid_max, device=start.device)[None, None, :]
    # the kernel's order of float operations: start + p * bin + (i + .5) * bin / grid
    coord = start[:, None, None] + p * bin_size[:, None, None] + \
        (i.to(f) + 0.5) * bin_size[:, None, None] / grid.clamp(min=1).to(f)[:, None, None]
    size = size[:, None, None]
    keep = (i < grid[:, None, None]) & (coord >= -1.0) & (coord <= size.to(f))
    coord = coord.clamp(min=0)
    low = coord.long()
    edge = low >= size - 1
    low = torch.where(edge, size - 1, low)
    coord = torch.where(edge, low.to(f), coord)
    high = torch.where(edge, low, low + 1)
    frac = coord - low.to(f)
    weight = torch.where(keep[..., None], torch.stack([1.0 - frac, frac], -1), torch.zeros((), dtype=f, device=start.device))
    return torch.stack([low, high], -1), weight


@torch.no_grad()
def _bags(rois: Tensor, scale: Tensor, height: Tensor, width: Tensor, row_offset: Tensor,
          output_size: tuple[int, int], sampling_ratio: int, aligned: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Every output bin's samples as (row index, bilinear weight) pairs, four per sample.

    ``rois`` (K, 5) ``[batch_index, x1, y1, x2, y2]``; ``scale``, ``height``, ``width``, ``row_offset`` (K,):
    each RoI's level: its spatial scale, feature size and first row in the stacked feature rows. Returns
    ``(indices, weights, count)``: fixed-length ``embedding_bag`` bags (K * PH * PW, L) in the order RoI,
    bin row, bin column, and each RoI's sample count (the mean's divisor). The bilinear weights of a
    sample are the product of a y and an x weight, and a bin's samples are a grid, so both axes are
    computed apart (K * P * G values) and only their product has the full size."""
    ph_n, pw_n = output_size
    k_n = rois.shape[0]
    offset = 0.5 if aligned else 0.0
    start_w = rois[:, 1] * scale - offset
    start_h = rois[:, 2] * scale - offset
    roi_w = rois[:, 3] * scale - offset - start_w
    roi_h = rois[:, 4] * scale - offset - start_h
    if not aligned:  # torchvision: force malformed RoIs to be 1x1
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / ph_n, roi_w / pw_n
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full((k_n,), sampling_ratio, dtype=torch.long, device=rois.device)
        max_h = max_w = sampling_ratio
    else:  # adaptive: ceil(roi_height / pooled_height) samples per bin and axis, padded to the largest
        grid_h, grid_w = bin_h.ceil().clamp(min=0).long(), bin_w.ceil().clamp(min=0).long()
        max_h, max_w = max(int(grid_h.max()), 1), max(int(grid_w.max()), 1)
    count = (grid_h * grid_w).clamp(min=1)
    y, wy = _axis(start_h, bin_h, grid_h, max_h, ph_n, height)  # (K, PH, Gh, 2)
    x, wx = _axis(start_w, bin_w, grid_w, max_w, pw_n, width)   # (K, PW, Gw, 2)
    base = (row_offset + rois[:, 0].long() * height * width).view(k_n, 1, 1, 1, 1, 1, 1)
    # (K, PH, PW, Gh, Gw, 2, 2): y cell (low, high) x x cell (low, high), the kernel's w1..w4 order
    indices = base + (y * width.view(k_n, 1, 1, 1))[:, :, None, :, None, :, None] + x[:, None, :, None, :, None, :]
    weights = wy[:, :, None, :, None, :, None] * wx[:, None, :, None, :, None, :]
    bags = k_n * ph_n * pw_n
    return indices.reshape(bags, -1), weights.reshape(bags, -1), count


class _WeightedGather(torch.autograd.Function):
    """``out[b] = sum_j weights[b, j] * rows[indices[b, j]]``: ``embedding_bag``'s forward, and a backward
    that scatter-adds in chunks of bags (``index_add_``) instead of ``embedding_bag``'s sort of every
    index (about half of its backward's time on CPU, measured)."""

    @staticmethod
    def forward(ctx, rows: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        ctx.save_for_backward(indices, weights)
        ctx.rows_shape = rows.shape
        return torch.nn.functional.embedding_bag(indices, rows, mode="sum", per_sample_weights=weights)

    @staticmethod
    def backward(ctx, grad: Tensor):
        indices, weights = ctx.saved_tensors
        grad_rows = grad.new_zeros(ctx.rows_shape)
        channels, per_bag = grad.shape[1], indices.shape[1]
        chunk = max(1, (1 << 22) // max(1, per_bag * channels))  # ~16 MB of fp32 temporaries per step
        for s in range(0, indices.shape[0], chunk):
            g, w = grad[s:s + chunk], weights[s:s + chunk]
            grad_rows.index_add_(0, indices[s:s + chunk].reshape(-1), (g[:, None, :] * w[:, :, None]).reshape(-1, channels))
        return grad_rows, None, None


def _pool(rows: Tensor, rois: Tensor, scale: Tensor, height: Tensor, width: Tensor, row_offset: Tensor,
          channels: int, output_size: tuple[int, int], sampling_ratio: int, aligned: bool, dtype: torch.dtype) -> Tensor:
    ph_n, pw_n = output_size
    if rois.shape[0] == 0:
        return rows.new_zeros((0, channels, ph_n, pw_n), dtype=dtype)
    indices, weights, count = _bags(rois.detach().to(rows.dtype), scale.to(rows.dtype), height, width, row_offset,
                                    output_size, sampling_ratio, aligned)
    with torch.autocast(rows.device.type, enabled=False):
        pooled = _WeightedGather.apply(rows, indices, weights)
    pooled = pooled.view(-1, ph_n * pw_n, channels) / count.to(pooled.dtype)[:, None, None]
    return pooled.view(-1, ph_n, pw_n, channels).permute(0, 3, 1, 2).contiguous().to(dtype)


def _as_rows(features: Sequence[Tensor]) -> Tensor:
    """Feature maps (N, C, H, W) as one (sum of N*H*W, C) matrix, fp32 (fp64 stays fp64); a view for one
    NHWC map."""
    dtype = torch.float64 if features[0].dtype == torch.float64 else torch.float32
    rows = [f.to(dtype).permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in features]
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def _check(features: Sequence[Tensor], rois: Tensor) -> None:
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be a (K, 5) tensor [batch_index, x1, y1, x2, y2], got shape {tuple(rois.shape)}")
    if any(f.dim() != 4 or f.shape[1] != features[0].shape[1] for f in features):
        raise ValueError(f"features must be (N, C, H, W) maps with the same C, got {[tuple(f.shape) for f in features]}")


def roi_align(input: Tensor, boxes: Tensor, output_size: Union[int, Sequence[int]], spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """``torchvision.ops.roi_align`` for ``boxes`` as a (K, 5) tensor ``[batch_index, x1, y1, x2, y2]``."""
    _check([input], boxes)
    k_n, device = boxes.shape[0], input.device
    n, c, h, w = input.shape
    level = lambda v, dt: torch.full((k_n,), v, dtype=dt, device=device)  # noqa: E731
    return _pool(_as_rows([input]), boxes, level(spatial_scale, torch.float64), level(h, torch.long),
                 level(w, torch.long), level(0, torch.long), c, _pair(output_size), sampling_ratio, aligned, input.dtype)


def multiscale_roi_align(features: Sequence[Tensor], rois: Tensor, levels: Tensor, scales: Sequence[float],
                         output_size: Union[int, Sequence[int]], sampling_ratio: int = -1,
                         aligned: bool = False) -> Tensor:
    """RoIAlign of each RoI on its pyramid level (``levels[k]`` indexes ``features`` and ``scales``), all
    levels in one gather: equal to torchvision's per-level loop in ``MultiScaleRoIAlign``."""
    _check(features, rois)
    device = features[0].device
    sizes = torch.tensor([[f.shape[2], f.shape[3]] for f in features], dtype=torch.long, device=device)
    numel = torch.tensor([f.shape[0] * f.shape[2] * f.shape[3] for f in features], dtype=torch.long, device=device)
    row_offset = numel.cumsum(0) - numel
    levels = levels.long()
    scale = torch.tensor(list(scales), dtype=torch.float64, device=device)[levels]
    return _pool(_as_rows(features), rois, scale, sizes[levels, 0], sizes[levels, 1], row_offset[levels],
                 features[0].shape[1], _pair(output_size), sampling_ratio, aligned, features[0].dtype)


class FastMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` (same arguments, level mapping and scale inference, same
    outputs and gradients) with all levels pooled by :func:`multiscale_roi_align`.

    ``on_cuda=False`` (the default): CUDA features go to torchvision's kernel, whose atomic-add backward is
    not a bottleneck there (the gather is measured faster on CPU only); ``True`` gathers on every device."""

    def __init__(self, featmap_names: list[str], output_size: Union[int, Sequence[int]], sampling_ratio: int, *,
                 canonical_scale: int = 224, canonical_level: int = 4, aligned: bool = False, on_cuda: bool = False):
        super().__init__(featmap_names, output_size, sampling_ratio,
                         canonical_scale=canonical_scale, canonical_level=canonical_level)
        self.aligned, self.on_cuda = aligned, on_cuda

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        x_filtered = _filter_input(x, self.featmap_names)
        if x_filtered[0].is_cuda and not self.on_cuda and not self.aligned:
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(x_filtered, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        if len(x_filtered) > 1:
            levels = self.map_levels(boxes)
        else:
            levels = torch.zeros(rois.shape[0], dtype=torch.long, device=rois.device)
        return multiscale_roi_align(x_filtered, rois, levels, self.scales, self.output_size, self.sampling_ratio,
                                    self.aligned)
