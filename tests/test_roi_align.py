"""detection.roi_align against torchvision.ops: the same outputs and feature gradients."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align

from detection.model import build_faster_rcnn
from detection.roi_align import FastMultiScaleRoIAlign, multiscale_roi_align, roi_align


def _rois(n_images: int, k: int, width: float, height: float, generator: torch.Generator,
          dtype=torch.float64) -> torch.Tensor:
    """RoIs of every kind the kernel branches on: ordinary, degenerate (zero size), partly and wholly
    outside the map, and past the last row/column."""
    xy = torch.rand(k, 2, generator=generator) * torch.tensor([width * 1.2, height * 1.2]) - 8
    wh = torch.rand(k, 2, generator=generator) * torch.tensor([width * 0.7, height * 0.7])
    wh[:4] = 0                                                    # degenerate
    xy[4:6] = torch.tensor([[width + 20, height + 20], [-60.0, -60.0]])  # wholly outside
    batch = torch.randint(0, n_images, (k, 1), generator=generator).to(xy.dtype)
    return torch.cat([batch, xy, xy + wh], 1).to(dtype)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, 1, 0, -1])
def test_roi_align_equals_torchvision_forward_and_backward(aligned, sampling_ratio):
    """fp64: the same outputs and input gradients as torchvision's kernel, to rounding, for both offsets,
    fixed and adaptive sampling grids, a non-square output and a non-power-of-two scale."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 17, 23, dtype=torch.float64, generator=g, requires_grad=True)
    rois = _rois(3, 80, 23 / 0.3, 17 / 0.3, g)
    theirs = tv_roi_align(x, rois, (7, 5), 0.3, sampling_ratio, aligned)
    ours = roi_align(x, rois, (7, 5), 0.3, sampling_ratio, aligned)
    assert ours.shape == theirs.shape == (80, 5, 7, 5)
    assert theirs.abs().sum() > 0 and (theirs == 0).all(dim=(1, 2, 3)).any()  # some RoIs pool nothing
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    grad = torch.randn(theirs.shape, dtype=torch.float64, generator=g)
    (g_theirs,), (g_ours,) = torch.autograd.grad(theirs, x, grad), torch.autograd.grad(ours, x, grad)
    torch.testing.assert_close(g_ours, g_theirs, rtol=0, atol=1e-12)


def _pyramid(n: int, channels: int, size: int, channels_last: bool, g: torch.Generator) -> "OrderedDict":
    feats = OrderedDict()
    for i in range(4):
        f = torch.randn(n, channels, size // 2 ** (i + 2), size // 2 ** (i + 2), generator=g)
        feats[str(i)] = (f.contiguous(memory_format=torch.channels_last) if channels_last else f).requires_grad_()
    return feats


@pytest.mark.parametrize("channels_last", [True, False])
def test_fast_multiscale_roi_align_equals_torchvision(channels_last):
    """All FPN levels in one gather: torchvision's MultiScaleRoIAlign's outputs and gradients (fp32), with
    RoIs of every level, an image without RoIs, and both memory formats."""
    g = torch.Generator().manual_seed(1)
    feats = _pyramid(3, 16, 128, channels_last, g)
    boxes = []
    for k in (40, 0, 25):
        xy = torch.rand(k, 2, generator=g) * 100
        wh = torch.rand(k, 2, generator=g) * 120 + 2  # 2-122 px: levels 0-3 of the mapper
        boxes.append(torch.cat([xy, (xy + wh).clamp(max=128)], 1))
    shapes = [(128, 128), (120, 96), (128, 100)]
    # canonical scale 28 px (224 by default) spreads these RoIs over all four levels
    theirs_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2, canonical_scale=28)
    ours_pool = FastMultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2, canonical_scale=28)
    theirs, ours = theirs_pool(feats, boxes, shapes), ours_pool(feats, boxes, shapes)
    assert ours.shape == theirs.shape == (65, 16, 7, 7)
    levels = theirs_pool.map_levels(boxes)
    assert set(levels.tolist()) == {0, 1, 2, 3}
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    grad = torch.randn(theirs.shape, generator=g)
    g_theirs = torch.autograd.grad(theirs, list(feats.values()), grad)
    g_ours = torch.autograd.grad(ours, list(feats.values()), grad)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the functional form, given the mapper's levels and the scales
    direct = multiscale_roi_align(list(feats.values()), torch.cat([torch.cat([torch.full((len(b), 1), i), b], 1)
                                                                   for i, b in enumerate(boxes)]),
                                  levels, theirs_pool.scales, 7, 2)
    torch.testing.assert_close(direct, theirs, rtol=1e-5, atol=1e-6)


def test_no_rois_and_bf16_features():
    """No RoI gives an empty (0, C, 7, 7); bf16 features (autocast) pool in fp32 and come back in bf16,
    as torchvision's autocast rule does."""
    g = torch.Generator().manual_seed(2)
    feats = _pyramid(2, 8, 64, True, g)
    pool = FastMultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    empty = pool(feats, [torch.zeros(0, 4), torch.zeros(0, 4)], [(64, 64)] * 2)
    assert empty.shape == (0, 8, 7, 7)
    boxes = [torch.tensor([[4.0, 4.0, 40.0, 30.0], [0.0, 0.0, 64.0, 64.0]])] * 2
    half = OrderedDict((k, v.detach().bfloat16()) for k, v in feats.items())
    out = pool(half, boxes, [(64, 64)] * 2)
    ref = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(OrderedDict((k, v.float()) for k, v in half.items()),
                                                           boxes, [(64, 64)] * 2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_detector_with_the_fast_pooler_trains_as_with_torchvision_s():
    """A Faster R-CNN training step: the four losses and every parameter's gradient equal with
    model.roi_align=auto (the gather, on CPU) and torchvision (same weights, same sampled RoIs)."""
    kwargs = dict(num_classes=4, frozen_stages=-1, norm_layer=None, min_size=96, max_size=128, fpn_channels=16,
                  box_fc_dim=32, backbone_kwargs={"width_mult": 0.25})
    torch.manual_seed(0)
    fast = build_faster_rcnn("resnet18d", roi_align="auto", **kwargs).train()
    slow = build_faster_rcnn("resnet18d", roi_align="torchvision", **kwargs).train()
    assert isinstance(fast.roi_heads.box_roi_pool, FastMultiScaleRoIAlign)
    assert type(slow.roi_heads.box_roi_pool) is MultiScaleRoIAlign
    slow.load_state_dict(fast.state_dict())
    images = [torch.rand(3, 96, 120), torch.rand(3, 90, 96)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 20.0, 110.0, 90.0]]),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[5.0, 5.0, 40.0, 50.0]]), "labels": torch.tensor([2])}]
    results = []
    for model in (fast, slow):
        torch.manual_seed(1)  # the RPN's and RoI heads' samplers draw the same RoIs
        losses = model(images, targets)
        sum(losses.values()).backward()
        results.append((losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l_fast, g_fast), (l_slow, g_slow) = results
    assert l_fast.keys() == l_slow.keys() and len(l_fast) == 4
    for k in l_fast:
        torch.testing.assert_close(l_fast[k], l_slow[k], rtol=1e-5, atol=1e-6)
    assert g_fast.keys() == g_slow.keys() and any(n.startswith("backbone.fpn") for n in g_fast)
    for n in g_fast:
        torch.testing.assert_close(g_fast[n], g_slow[n], rtol=1e-3, atol=1e-5, msg=n)
