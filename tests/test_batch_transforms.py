"""The batched (on-device) augmentation against torchvision's per-image operations."""

import random

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from classification.batch_transforms import BatchAugment, random_resized_crop_params, resized_crop
from classification.config import DataConfig


def test_resized_crop_equals_torchvision():
    torch.manual_seed(0)
    images = torch.rand(6, 3, 28, 28)
    boxes = torch.tensor([[0, 0, 28, 28], [3, 5, 14, 20], [10, 2, 17, 9], [0, 13, 28, 15], [7, 7, 1, 1],
                          [2, 4, 21, 24]], dtype=torch.float32)
    for size in (28, 32, 13):
        ours = resized_crop(images, boxes, size)
        for k, (top, left, h, w) in enumerate(boxes.long().tolist()):
            ref = TF.resized_crop(images[k], top, left, h, w, [size, size], antialias=False)
            torch.testing.assert_close(ours[k], ref, rtol=0, atol=2e-5)
            if size >= max(h, w):  # upsampling: antialias changes nothing, so equal to the default too
                ref_aa = TF.resized_crop(images[k], top, left, h, w, [size, size], antialias=True)
                torch.testing.assert_close(ours[k], ref_aa, rtol=0, atol=2e-5)


@pytest.mark.parametrize("height,width,scale", [(28, 28, (0.35, 1.0)), (24, 40, (0.08, 1.0))])
def test_crop_params_distribution_matches_torchvision(height, width, scale):
    """Area fraction and log aspect ratio of the crops follow RandomResizedCrop.get_params."""
    n = 20000
    torch.manual_seed(0)
    ours = random_resized_crop_params(n, height, width, scale, (3 / 4, 4 / 3))
    img = torch.zeros(1, height, width)
    ref = torch.tensor([v2.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(4000)],
                       dtype=torch.float32)  # (top, left, h, w)
    for boxes in (ours, ref):
        top, left, h, w = boxes.unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = lambda b: (b[:, 2] * b[:, 3] / (height * width))
    ratio = lambda b: torch.log(b[:, 3] / b[:, 2])
    for stat in (area, ratio):
        assert stat(ours).mean().item() == pytest.approx(stat(ref).mean().item(), abs=0.02)
        assert stat(ours).std().item() == pytest.approx(stat(ref).std().item(), abs=0.02)
    centre = lambda b: (b[:, 1] + b[:, 3] / 2) / width  # horizontal crop centre, uniform-ish around 0.5
    assert centre(ours).mean().item() == pytest.approx(centre(ref).mean().item(), abs=0.02)


def test_augment_train_and_val_outputs():
    cfg = DataConfig(img_size=24, val_resize=28, val_crop=24, min_area=0.35, brightness=0.4, contrast=0.4,
                     saturation=0.4, lighting=0.1)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.2, 0.2]
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    train = BatchAugment(cfg, mean, std, in_chans=3, train=True)
    out = train(images)
    assert out.shape == (8, 3, 24, 24) and out.dtype == torch.float32
    val = BatchAugment(cfg, mean, std, in_chans=3, train=False)
    v = val(images)
    x = images.float() / 255
    expected = (x[..., 2:26, 2:26].expand(-1, 3, -1, -1) - torch.tensor(mean).view(1, 3, 1, 1)) / 0.2
    torch.testing.assert_close(v, expected)  # 28 px: no resize, centre crop, normalise
    torch.testing.assert_close(val(images), v)  # deterministic


def test_brightness_factor_range_and_identity_when_off():
    cfg = DataConfig(img_size=8, min_area=1.0, hflip=0, brightness=0.4, contrast=0, saturation=0, lighting=0)
    images = torch.full((4000, 1, 8, 8), 100, dtype=torch.uint8)  # a full crop of a constant image is itself
    out = BatchAugment(cfg, [0.0], [1.0], in_chans=1, train=True)(images)
    factors = out[:, 0, 0, 0] / (100 / 255)
    assert factors.min() >= 0.6 - 1e-5 and factors.max() <= 1.4 + 1e-5
    assert factors.min() < 0.62 and factors.max() > 1.38
    plain = DataConfig(img_size=8, min_area=1.0, hflip=0, brightness=0, contrast=0, saturation=0, lighting=0)
    img = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(BatchAugment(plain, [0.0], [1.0], 1, train=True)(img), img.float() / 255)


def test_flip_probability():
    cfg = DataConfig(img_size=4, min_area=1.0, hflip=0.5, brightness=0, contrast=0, saturation=0, lighting=0)
    img = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(4000, 1, 1, 1)
    out = BatchAugment(cfg, [0.0], [1.0], 1, train=True)(img)
    flipped = torch.isclose(out[:, 0, 0, 0], torch.tensor(3 / 255)).float().mean().item()
    assert flipped == pytest.approx(0.5, abs=0.03)


def test_hue_needs_per_sample_pipeline():
    with pytest.raises(ValueError, match="data.pipeline=samples"):
        BatchAugment(DataConfig(hue=0.1), [0.5] * 3, [0.2] * 3, 3, train=True)


@pytest.mark.parametrize("train", [True, False])
def test_cpu_batches_run_in_cache_sized_chunks_with_the_same_result(monkeypatch, train):
    """On a CPU the batch goes through in chunks of about CPU_CHUNK_BYTES (float32): without random draws (no
    colour jitter or lighting; the hybrid pipeline's geometry=False, or validation) the result is the whole
    batch's, and each chunk is its own call."""
    import classification.batch_transforms as bt

    cfg = DataConfig(img_size=16, val_resize=16, val_crop=16, min_area=1.0, hflip=0, brightness=0, contrast=0,
                     saturation=0, lighting=0)
    augment = BatchAugment(cfg, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3], 3, train=train, geometry=False)
    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    whole = augment(images)
    calls = []
    forward = augment._forward
    monkeypatch.setattr(augment, "_forward", lambda x: calls.append(len(x)) or forward(x))
    monkeypatch.setattr(bt, "CPU_CHUNK_BYTES", 4 * 3 * 16 * 16 * 4)  # 4 images
    torch.testing.assert_close(augment(images), whole, rtol=0, atol=0)
    assert calls == [4, 4, 2]


def _erased_stats(erased: torch.Tensor) -> dict[str, float]:
    """Of a boolean ``[N, H, W]`` map of erased pixels: the fraction of images erased, and over them the area
    fraction's quartiles and the mean height and width of the rectangle."""
    hit = erased.flatten(1).any(1)
    frac = erased.flatten(1).float().mean(1)[hit]
    rows, cols = erased.any(2).sum(1)[hit].float(), erased.any(1).sum(1)[hit].float()
    assert (erased.flatten(1).sum(1)[hit] == rows * cols).all()  # one rectangle per image
    q1, q2, q3 = torch.quantile(frac, torch.tensor([0.25, 0.5, 0.75])).tolist()
    return {"p": hit.float().mean().item(), "q1": q1, "q2": q2, "q3": q3, "h": rows.mean().item(),
            "w": cols.mean().item()}


@pytest.mark.parametrize("size,area,aspect", [((28, 28), (0.02, 1 / 3), 0.3), ((20, 36), (0.1, 0.6), 0.5)])
def test_random_erasing_matches_timm(size, area, aspect):
    """Probability, rectangle size and placement follow timm's RandomErasing (count 1, const mode: zeros)."""
    from timm.data.random_erasing import RandomErasing as TimmRandomErasing

    from classification.transforms import random_erase

    random.seed(0)  # timm draws from Python's random
    torch.manual_seed(0)
    n, (h, w) = 4000, size
    ones = torch.ones(n, 1, h, w)
    timm_re = TimmRandomErasing(probability=0.5, min_area=area[0], max_area=area[1], min_aspect=aspect, mode="const",
                                device="cpu")
    ref = torch.stack([timm_re(ones[i].clone()) for i in range(n)])[:, 0] == 0
    ours = random_erase(ones, 0.5, area, aspect, "const")[:, 0] == 0
    a, b = _erased_stats(ours), _erased_stats(ref)
    assert a["p"] == pytest.approx(b["p"], abs=0.04)
    for q in ("q1", "q2", "q3"):
        assert a[q] == pytest.approx(b[q], abs=0.025)
    for side in ("h", "w"):  # (a side's spread is about half its mean: 3 standard errors of the difference)
        assert a[side] == pytest.approx(b[side], rel=0.06)
    # placement: how often each quadrant of the image is erased
    quad = lambda e: torch.stack([e[:, :h // 2, :w // 2].float().mean(), e[:, h // 2:, w // 2:].float().mean()])
    torch.testing.assert_close(quad(ours), quad(ref), rtol=0, atol=0.02)


def test_random_erasing_box_size_and_placement_exactly():
    """A fixed area and aspect 1: every side is round(sqrt(area * H * W)) (timm's formula), and the top-left corner
    takes each of its H - h + 1 positions equally often; a rectangle that cannot fit is not drawn."""
    from classification.transforms import erase_boxes

    torch.manual_seed(0)
    top, left, h, w, found = erase_boxes(30000, 10, 12, (0.5, 0.5), 1.0)
    assert found.all() and (h == 8).all() and (w == 8).all()  # sqrt(60) = 7.75 -> 8
    for corner, positions in ((top, 3), (left, 5)):
        counts = torch.bincount(corner, minlength=positions)
        assert len(counts) == positions and (counts - 30000 / positions).abs().max() < 0.05 * 30000 / positions
    _, _, _, _, found = erase_boxes(100, 4, 4, (1.0, 1.0), 1.0)  # the whole image never fits (h < H required)
    assert not found.any()


def test_random_erasing_fills_by_mode_and_leaves_the_rest():
    from classification.transforms import random_erase

    torch.manual_seed(0)
    x = torch.full((500, 3, 16, 16), 7.0)
    for mode in ("const", "rand", "pixel"):
        out = random_erase(x, 1.0, (0.1, 0.3), 0.5, mode)
        erased = out != 7.0
        assert erased.flatten(1).any(1).float().mean() > 0.95  # p = 1: each image (a draw fits almost always)
        assert (erased.any(1) == erased.all(1)).all()  # all channels of a pixel together
        if mode == "rand":  # one colour per image and channel
            colours = torch.stack([out[i, :, erased[i, 0]][:, 0] for i in range(len(x)) if erased[i, 0].any()])
            assert all((out[i, :, erased[i, 0]] == colours[k][:, None]).all()
                       for k, i in enumerate(i for i in range(len(x)) if erased[i, 0].any()))
            values = colours.flatten()
        else:
            values = out[erased]
        if mode == "const":
            assert (values == 0).all()
        else:  # N(0, 1)
            assert values.mean().item() == pytest.approx(0, abs=0.1) and values.std().item() == pytest.approx(1, abs=0.1)
    assert torch.equal(random_erase(x, 0.0, (0.1, 0.3), 0.5, "pixel"), x)


def test_random_erasing_in_every_training_pipeline():
    """data.random_erase: the per-sample transform (last, after normalisation) and BatchAugment (tensor and hybrid
    pipelines) erase training images only; validation never."""
    from classification.transforms import RandomErasing, train_transform, val_transform

    cfg = DataConfig(img_size=16, val_resize=16, val_crop=16, min_area=1.0, hflip=0, brightness=0, contrast=0,
                     saturation=0, lighting=0, random_erase=1.0, erase_area=[0.2, 0.3], erase_mode="const")
    mean, std = [0.2], [0.5]
    images = torch.full((64, 1, 16, 16), 255, dtype=torch.uint8)  # normalised: (1 - 0.2) / 0.5 = 1.6
    samples = train_transform(cfg, mean, std, in_chans=1)
    assert isinstance(samples.transforms[-1], RandomErasing)
    per_sample = torch.stack([samples(img) for img in images])
    for geometry in (True, False):
        batched = BatchAugment(cfg, mean, std, 1, train=True, geometry=geometry)(images)
        for out in (batched, per_sample):
            zeros = (out == 0).flatten(1).float().mean(1)
            assert ((zeros >= 0.15) & (zeros <= 0.35)).all() and ((out == 0) | (out == 1.6)).all()
    torch.testing.assert_close(BatchAugment(cfg, mean, std, 1, train=False)(images), torch.full((64, 1, 16, 16), 1.6))
    assert (val_transform(cfg, mean, std, in_chans=1)(images[0]) == 1.6).all()


def test_random_erasing_pipelines_are_built_without_drawing_random_numbers():
    """Building the pipelines checks the erasing arguments without a draw: with the same seed, turning erasing on
    leaves the model's initialisation (built after the data) unchanged."""
    from classification.transforms import train_transform

    cfg = DataConfig(random_erase=0.5, lighting=0, brightness=0, contrast=0, saturation=0)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    BatchAugment(cfg, [0.5], [0.2], 1, train=True)
    train_transform(cfg, [0.5], [0.2], in_chans=1)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("key,value,match", [("erase_area", [0.4, 0.1], "data.erase_area"),
                                             ("erase_area", [0.1], "data.erase_area"),
                                             ("erase_mode", "noise", "data.erase_mode")])
def test_random_erasing_bad_arguments_name_the_key(key, value, match):
    from classification.transforms import train_transform
    from runtime.config import ConfigError

    cfg = DataConfig(random_erase=0.5, lighting=0, **{key: value})
    with pytest.raises(ConfigError, match=match):
        BatchAugment(cfg, [0.5], [0.2], 1, train=True)
    with pytest.raises(ConfigError, match=match):
        train_transform(cfg, [0.5], [0.2], in_chans=1)
