"""Faster R-CNN + FPN on registry backbones, against torchvision's fasterrcnn_resnet50_fpn."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection import fasterrcnn_resnet50_fpn

from backbones import FrozenBatchNorm2d, create_backbone, save_weights
from detection.model import FPNBackbone, build_faster_rcnn

TV_MEAN, TV_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SMALL = dict(min_size=128, max_size=160, image_mean=TV_MEAN, image_std=TV_STD)


def _calibrate_bn(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics, so that a mismatch anywhere shows in the outputs."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize("roi_align", ["torchvision", "auto"])
def test_torchvision_faster_rcnn_state_dict_loads_strictly_and_detects_the_same(roi_align):
    """With torchvision's RoI pooler the same detections to fp32 rounding; with ours (the default) the
    pooled features differ in the order of float additions, so the boxes within 1e-5 relative."""
    torch.manual_seed(0)
    # Without pretrained weights torchvision builds trainable BN and trains every stage.
    theirs = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5, box_score_thresh=0.0,
                                     **SMALL).eval()
    _calibrate_bn(theirs)
    ours = build_faster_rcnn("resnet50b", num_classes=5, frozen_stages=-1, norm_layer=None, box_score_thresh=0.0,
                             roi_align=roi_align, **SMALL).eval()
    theirs.transform = ours.transform  # ours resizes as detectron2 (tested below); here the networks are compared
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    tol = dict(rtol=1e-5, atol=1e-3) if roi_align == "auto" else {}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    images = [torch.rand(3, 120, 150), torch.rand(3, 100, 128)]
    with torch.no_grad():
        a, b = ours(images), theirs(images)
        x = torch.rand(1, 3, 128, 160)
        fa, fb = ours.backbone(x), theirs.backbone(x)
    for da, db in zip(a, b):
        assert len(da["boxes"]) > 0
        torch.testing.assert_close(da["boxes"], db["boxes"], **tol)
        torch.testing.assert_close(da["scores"], db["scores"], **tol)
        assert torch.equal(da["labels"], db["labels"])
    assert list(fa) == list(fb) == ["0", "1", "2", "3", "pool"] and fa["0"].shape[-2:] == (32, 40)
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k])


def test_pretrained_backbone_weights_frozen_stages_and_frozen_bn(tmp_path):
    classifier = create_backbone("resnet18d", num_classes=1000)
    save_weights(classifier, tmp_path / "r18d.safetensors")
    model = build_faster_rcnn("resnet18d", num_classes=21, weights=str(tmp_path / "r18d.safetensors"), **SMALL)
    body = model.backbone.body
    assert torch.equal(body.layer3[0].conv1.weight, classifier.layer3[0].conv1.weight)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    assert not any(p.requires_grad for p in body.conv1.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())


@pytest.mark.parametrize("name", ["resnet18d", "mobilenet"])
def test_training_step_gives_the_four_losses_and_gradients(name):
    torch.manual_seed(0)
    model = build_faster_rcnn(name, num_classes=3, norm_layer=None, **SMALL).train()
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 140)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 50.0, 40.0], [60.0, 60.0, 120.0, 110.0]]),
                "labels": torch.tensor([2, 1])}]
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert model.backbone.fpn.inner_blocks[0][0].weight.grad is not None
    stem = model.backbone.body.stages()[0]  # frozen_stages=1 by default: stem and first stage
    assert all(p.grad is None and not p.requires_grad for m in stem for p in m.parameters())


def test_missing_feature_is_named():
    body = create_backbone("resnet18d", num_classes=0)
    with pytest.raises(ValueError, match="no feature.*res6"):
        FPNBackbone(body, in_features=("res5", "res6"))


def test_channels_last_detector_detects_the_same_as_contiguous():
    """model.channels_last: NHWC weights and backbone input, the same detections (same weights)."""
    torch.manual_seed(0)
    plain = build_faster_rcnn("resnet18d", num_classes=5, frozen_stages=-1, norm_layer=None, box_score_thresh=0.0,
                              **SMALL).eval()
    _calibrate_bn(plain)
    nhwc = build_faster_rcnn("resnet18d", num_classes=5, frozen_stages=-1, norm_layer=None, box_score_thresh=0.0,
                             channels_last=True, **SMALL).eval()
    nhwc.load_state_dict(plain.state_dict())
    conv = nhwc.backbone.body.layer1[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    images = [torch.rand(3, 120, 150), torch.rand(3, 100, 128)]
    with torch.no_grad():
        a, b = nhwc(images), plain(images)
        feats = nhwc.backbone(torch.rand(1, 3, 128, 160))
    assert feats["0"].is_contiguous(memory_format=torch.channels_last)
    for da, db in zip(a, b):
        assert len(da["boxes"]) > 0
        torch.testing.assert_close(da["boxes"], db["boxes"], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(da["scores"], db["scores"], atol=1e-4, rtol=1e-4)


def test_fpn_anchor_sizes_one_per_level():
    from detection.model import build_faster_rcnn
    from runtime.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.anchor_sizes=\[32, 64\]: FPN takes one size per level"):
        build_faster_rcnn("resnet18d", num_classes=3, anchor_sizes=[32, 64], backbone_kwargs={"width_mult": 0.25})


def test_resize_is_detectron2_resize_shortest_edge():
    """The torch engine resizes as detectron2's ResizeShortestEdge: the output sizes (nearest-integer rounding, the
    max_size cap) and, within rounding, the pixels (antialiased when shrinking, as PIL's bilinear resize); boxes
    scale per axis."""
    from detection.d2_engine import import_detectron2
    from detection.model import DetectronResize, shortest_edge_size

    try:
        import_detectron2()
    except ImportError as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"detectron2 cannot be imported: {e}")
    from detectron2.data.transforms import ResizeShortestEdge

    for (h, w), short, cap in (((375, 500), 800, 1333), ((333, 500), 480, 1333), ((501, 501), 512, 1333),
                               ((499, 99), 608, 1000), ((1500, 2000), 800, 1333), ((1, 2000), 800, 1333)):
        theirs = ResizeShortestEdge(short, cap).get_transform(np.zeros((h, w, 3), np.uint8))
        assert shortest_edge_size(h, w, short, cap) == (theirs.new_h, theirs.new_w), (h, w)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)  # noise: aliasing shows most
    transform = DetectronResize(80, 1333, [0.0, 0.0, 0.0], [1 / 255] * 3).eval()  # normalise: x * 255 (0-255 scale)
    theirs = ResizeShortestEdge(80, 1333).get_transform(image)
    ours, target = transform.resize(torch.from_numpy(image).permute(2, 0, 1).float(),
                                    {"boxes": torch.tensor([[10.0, 20.0, 110.0, 140.0]])})
    expected = theirs.apply_image(image).astype(np.float64)
    diff = np.abs(ours.permute(1, 2, 0).numpy() - expected)
    assert ours.shape[1:] == expected.shape[:2] and diff.mean() < 0.6 and diff.max() <= 2
    np.testing.assert_allclose(target["boxes"].numpy(), theirs.apply_box(np.array([[10.0, 20.0, 110.0, 140.0]])),
                               rtol=1e-6)
