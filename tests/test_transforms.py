"""Transforms of §2.1: PCA lighting against its formula, pipelines' shapes, normalization, jitter ranges."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from classification.config import DataConfig
from classification.transforms import IMAGENET_EIGVAL, IMAGENET_EIGVEC, Lighting, train_transform, val_transform

EIGVAL = torch.tensor(IMAGENET_EIGVAL)
EIGVEC = torch.tensor(IMAGENET_EIGVEC)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_lighting_adds_eigvec_times_scaled_alpha():
    image = torch.rand(3, 5, 7)
    torch.manual_seed(3)
    out = Lighting(0.1)(image)
    torch.manual_seed(3)
    alpha = torch.randn(3) * 0.1
    expected = EIGVEC @ (alpha * EIGVAL)
    torch.testing.assert_close(out - image, expected[:, None, None].expand(3, 5, 7), rtol=0, atol=1e-6)


def test_lighting_offset_statistics_match_pca_covariance():
    torch.manual_seed(0)
    n, std = 20000, 0.1
    offsets = Lighting(std)(torch.zeros(n, 3, 1, 1)).view(n, 3)  # one alpha per image of the batch
    expected_cov = EIGVEC @ torch.diag(std**2 * EIGVAL**2) @ EIGVEC.T
    scale = expected_cov.abs().max()
    assert offsets.mean(0).abs().max() < 4 * scale.sqrt() / n**0.5  # ~4 standard errors
    torch.testing.assert_close(offsets.T.cov(), expected_cov, rtol=0, atol=0.05 * scale.item())


def test_lighting_keeps_tv_tensor_type_and_rejects_bad_input():
    image = tv_tensors.Image(torch.rand(3, 4, 4))
    assert isinstance(Lighting(0.1)(image), tv_tensors.Image)
    with pytest.raises(ValueError, match="RGB"):
        Lighting(0.1)(torch.rand(1, 4, 4))
    with pytest.raises(TypeError, match="float"):
        Lighting(0.1)(torch.zeros(3, 4, 4, dtype=torch.uint8))
    gray = torch.rand(1, 4, 4)
    assert Lighting(0.0)(gray) is gray  # std 0 is a no-op, whatever the channels


@pytest.mark.parametrize("make_input", [
    lambda: Image.new("L", (40, 30), 128),  # Fashion-MNIST gives PIL 'L'
    lambda: Image.new("RGB", (40, 30), (10, 200, 30)),
    lambda: torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8),
    lambda: torch.randint(0, 256, (1, 30, 40), dtype=torch.uint8),
])
def test_pipelines_output_shape_and_dtype(make_input):
    cfg = DataConfig(img_size=16, val_resize=20, val_crop=18)
    train, val = train_transform(cfg, MEAN, STD)(make_input()), val_transform(cfg, MEAN, STD)(make_input())
    assert train.shape == (3, 16, 16) and train.dtype == torch.float32
    assert val.shape == (3, 18, 18) and val.dtype == torch.float32


def test_val_is_deterministic_and_resizes_short_side():
    cfg = DataConfig(val_resize=32, val_crop=24)
    image = torch.randint(0, 256, (3, 40, 64), dtype=torch.uint8)
    tf = val_transform(cfg, MEAN, STD)
    torch.testing.assert_close(tf(image), tf(image), rtol=0, atol=0)
    # Short side 40 -> 32, long side 64 -> 51; the center crop takes the middle 24x24.
    resized = v2.Resize(32, antialias=True)(image)
    assert resized.shape[-2:] == (32, 51)
    crop = v2.CenterCrop(24)(resized).float() / 255
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    torch.testing.assert_close(tf(image), (crop - mean) / std)


def test_normalization_gives_zero_mean_unit_std():
    image = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8)
    x = image.float() / 255
    mean, std = x.mean((1, 2)).tolist(), x.std((1, 2)).tolist()
    cfg = DataConfig(val_resize=24, val_crop=24)  # resize to the same size: no resampling
    out = val_transform(cfg, mean, std)(image)
    torch.testing.assert_close(out.mean((1, 2)), torch.zeros(3), rtol=0, atol=1e-4)
    torch.testing.assert_close(out.std((1, 2)), torch.ones(3), rtol=0, atol=1e-4)


def test_zero_strength_ops_are_left_out():
    cfg = DataConfig(hflip=0, brightness=0, contrast=0, saturation=0, hue=0, lighting=0)
    kinds = {type(t) for t in train_transform(cfg, MEAN, STD).transforms}
    assert not kinds & {v2.RandomHorizontalFlip, v2.ColorJitter, Lighting}
    kinds = {type(t) for t in train_transform(DataConfig(), MEAN, STD).transforms}
    assert {v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ColorJitter, Lighting} <= kinds


def test_brightness_jitter_factor_stays_in_range():
    b = 0.4
    cfg = DataConfig(img_size=8, hflip=0, brightness=b, contrast=0, saturation=0, hue=0, lighting=0)
    tf = train_transform(cfg, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # identity normalization
    level = 100
    image = torch.full((3, 12, 12), level, dtype=torch.uint8)  # constant: crops and flips change nothing
    torch.manual_seed(0)
    factors = torch.stack([tf(image).mean() * 255 / level for _ in range(300)])
    tol = 0.5 / level  # the jittered uint8 image is rounded
    assert factors.min() >= 1 - b - tol and factors.max() <= 1 + b + tol
    assert factors.min() < 1 - b + 0.05 and factors.max() > 1 + b - 0.05  # the whole range is used
