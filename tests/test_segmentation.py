"""ADE20K loader on its release layout, and the dilated FCN against torchvision's fcn_resnet50."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.segmentation import fcn_resnet50

from segmentation.ade20k import ADE20K, IGNORE_INDEX, ADE20KFormatError
from segmentation.metrics import SegmentationMetric
from segmentation.model import build_fcn


def write_pair(root: Path, split: str, name: str, annotation: np.ndarray, mode: str = "L") -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    h, w = annotation.shape
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
        root / "images" / split / f"{name}.jpg")
    Image.fromarray(annotation.astype(np.uint8)).convert(mode).save(root / "annotations" / split / f"{name}.png")


@pytest.fixture
def ade(tmp_path) -> Path:
    root = tmp_path / "ADEChallengeData2016"
    ann = np.zeros((24, 32), np.uint8)
    ann[:, 8:16], ann[:, 16:] = 1, 150
    write_pair(root, "validation", "ADE_val_00000001", ann)
    write_pair(root, "validation", "ADE_val_00000002", np.full((20, 30), 7, np.uint8))
    write_pair(root, "training", "ADE_train_00000001", ann)
    return root


def test_labels_reduce_zero_and_transforms_follow(ade):
    ds = ADE20K(ade.parent, "val")  # the folder's parent works too
    assert len(ds) == 2
    image, mask = ds[0]
    assert image.shape == (3, 24, 32) and image.dtype == torch.uint8 and mask.dtype == torch.int64
    assert mask[0, :8].eq(IGNORE_INDEX).all() and mask[0, 8:16].eq(0).all() and mask[0, 16:].eq(149).all()
    from torchvision.transforms import v2
    flipped = ADE20K(ade, "validation", transforms=v2.RandomHorizontalFlip(p=1.0))[0][1]
    assert torch.equal(flipped, mask.flip(-1))
    # The whole image as its own prediction: 100% on what is evaluated, "other" ignored.
    metric = SegmentationMetric(150)
    metric.update(mask.clamp(max=149), mask)
    assert metric.compute()["aAcc"] == 100


def test_errors_name_the_file(ade, tmp_path):
    with pytest.raises(FileNotFoundError, match="images/training"):
        ADE20K(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="split 'test'"):
        ADE20K(ade, "test")
    write_pair(ade, "validation", "ADE_val_00000003", np.full((8, 8), 200, np.uint8))
    with pytest.raises(ADE20KFormatError, match="ADE_val_00000003.png: value 200"):
        ADE20K(ade, "val")[2]
    write_pair(ade, "validation", "ADE_val_00000003", np.full((8, 8), 3, np.uint8), mode="RGB")
    with pytest.raises(ADE20KFormatError, match="ADE_val_00000003.png: expected a single-channel"):
        ADE20K(ade, "val")[2]
    (ade / "annotations" / "validation" / "ADE_val_00000003.png").unlink()
    with pytest.raises(ADE20KFormatError, match="no annotation for 1 image.*ADE_val_00000003.png"):
        ADE20K(ade, "val")


def test_torchvision_fcn_resnet50_loads_strictly_and_gives_the_same_logits():
    torch.manual_seed(0)
    theirs = fcn_resnet50(weights=None, weights_backbone=None, num_classes=7, aux_loss=True).eval()
    g = torch.Generator().manual_seed(0)
    for m in theirs.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    ours = build_fcn("resnet50b", num_classes=7).eval()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 3, 72, 88)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert a["out"].shape == (1, 7, 72, 88)
    for k in ("out", "aux"):
        torch.testing.assert_close(a[k], b[k])


def test_fcn_on_other_backbones_trains():
    model = build_fcn("resnet18d", num_classes=5).train()
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    y[:, :4] = IGNORE_INDEX
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out["out"], y, ignore_index=IGNORE_INDEX) + \
        0.4 * torch.nn.functional.cross_entropy(out["aux"], y, ignore_index=IGNORE_INDEX)
    loss.backward()
    assert model.backbone.layer4[0].conv1.weight.grad is not None
    assert model.backbone.feature_info[-1].stride == 8  # dilated: res5 at 1/8
    assert build_fcn("mobilenet", num_classes=5, aux=False)(torch.randn(1, 3, 64, 64))["out"].shape == (1, 5, 64, 64)
