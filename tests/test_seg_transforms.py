"""The ADE20K training pipeline against mmseg/mmcv's own transforms on equal random draws, OpenCV's uint8
HSV conversions, and the determinism the trainer relies on (seed torch -> same sample)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from segmentation.transforms import (CatMaxRatioCrop, PhotoMetricDistortion, RandomResize, build_eval_transform,
                                     build_train_transform, draw_photometric_params, hsv_to_rgb_u8, pad_batch,
                                     photometric_distortion, photometric_distortion_batch, rescale_size,
                                     rgb_to_hsv_u8)


def import_mmseg_transforms():
    """mmseg's transforms module, imported through the engine's importer (it installs the stand-in for
    mmcv's missing compiled ops); skipped, saying why, when the foreign stack cannot import."""
    try:
        from segmentation.mmseg_engine import import_mmseg

        import_mmseg()
        from mmseg.datasets.transforms import transforms
    except Exception as e:  # any import failure of the foreign stack means: skip, saying why
        pytest.skip(f"mmseg cannot be imported ({type(e).__name__}: {e})")
    return transforms


class TorchBackedNumpyRandom:
    """``numpy.random``'s ``randint`` / ``uniform`` / ``random_sample`` drawn from torch, the way our
    transforms draw, so mmseg's code and ours see the same numbers after the same ``torch.manual_seed``."""

    @staticmethod
    def randint(low, high=None, size=None):
        low, high = (0, low) if high is None else (low, high)
        return int(torch.randint(low, high, ()))

    @staticmethod
    def uniform(low=0.0, high=1.0, size=None):
        return low + (high - low) * float(torch.rand((), dtype=torch.float64))


def sample(h=37, w=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
    mask = tv_tensors.Mask(torch.randint(0, 4, (h, w), generator=g))
    return image, mask


def _opencv_scalar(cv2, image: np.ndarray, code: int) -> np.ndarray:
    """cv2.cvtColor on one pixel per row (a column image): OpenCV's scalar reference path only."""
    return cv2.cvtColor(np.ascontiguousarray(image.reshape(-1, 1, 3)), code).reshape(image.shape)


def test_uint8_hsv_equals_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (256, 512, 3), dtype=np.uint8)
    ours = rgb_to_hsv_u8(torch.from_numpy(rgb).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(ours, cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV))
    hsv = np.stack([rng.integers(0, 180, (256, 512)), rng.integers(0, 256, (256, 512)),
                    rng.integers(0, 256, (256, 512))], -1).astype(np.uint8)
    ours = hsv_to_rgb_u8(torch.from_numpy(hsv).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(ours, _opencv_scalar(cv2, hsv, cv2.COLOR_HSV2RGB))
    # OpenCV's vectorised path (whole rows) rounds differently: at most one level apart
    assert np.abs(ours.astype(int) - cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)).max() <= 1


def test_rgb_to_hsv_equals_opencv_for_every_colour():
    """All 2**24 RGB colours, as a batch of 4 images (the branch-free hue and the table lookups)."""
    cv2 = pytest.importorskip("cv2")
    code = torch.arange(1 << 24, dtype=torch.int32)
    rgb = torch.stack([code >> 16, (code >> 8) & 255, code & 255]).to(torch.uint8).view(3, 4, 2048, 2048)
    ours = rgb_to_hsv_u8(rgb.transpose(0, 1))  # [4, 3, H, W]
    theirs = cv2.cvtColor(np.ascontiguousarray(rgb.permute(1, 2, 3, 0).numpy()).reshape(4 * 2048, 2048, 3),
                          cv2.COLOR_RGB2HSV)
    np.testing.assert_array_equal(ours.permute(0, 2, 3, 1).reshape(4 * 2048, 2048, 3).numpy(), theirs)


def test_hsv_to_rgb_equals_opencv_for_every_hue_and_saturation():
    """Every (h, s) pair of uint8 HSV (the factor table's rows) at the extreme and middle values of v, against
    OpenCV's scalar path: the table gives the formula's pixels exactly."""
    cv2 = pytest.importorskip("cv2")
    h, s = np.meshgrid(np.arange(180), np.arange(256), indexing="ij")
    hsv = np.concatenate([np.stack([h, s, np.full_like(h, v)], -1) for v in (0, 1, 77, 127, 128, 200, 254, 255)])
    hsv = hsv.astype(np.uint8)
    ours = hsv_to_rgb_u8(torch.from_numpy(hsv).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(ours, _opencv_scalar(cv2, hsv, cv2.COLOR_HSV2RGB))


def test_photometric_distortion_equals_mmseg_on_equal_draws(monkeypatch):
    import cv2
    mmseg_transforms = import_mmseg_transforms()
    monkeypatch.setattr(mmseg_transforms, "random", TorchBackedNumpyRandom)
    monkeypatch.setattr(mmseg_transforms.mmcv, "hsv2bgr",
                        lambda img: _opencv_scalar(cv2, img, cv2.COLOR_HSV2BGR))
    theirs = mmseg_transforms.PhotoMetricDistortion()
    image, _ = sample(24, 40)
    steps_seen = set()
    for seed in range(24):
        torch.manual_seed(seed)
        params = draw_photometric_params()
        steps_seen |= {k for k, v in params.items() if v not in (None, False)}
        ours = photometric_distortion(image.as_subclass(torch.Tensor), params)
        torch.manual_seed(seed)
        bgr = np.ascontiguousarray(image.permute(1, 2, 0).numpy()[..., ::-1])
        ref = theirs.transform({"img": bgr})["img"][..., ::-1]
        np.testing.assert_array_equal(ours.permute(1, 2, 0).numpy(), ref, err_msg=f"seed {seed}: {params}")
    assert steps_seen == {"brightness", "contrast_first", "contrast", "saturation", "hue"}
    # the transform wrapper draws the same numbers and leaves the mask alone
    torch.manual_seed(3)
    out_image, out_mask = PhotoMetricDistortion()(*sample(24, 40))
    torch.manual_seed(3)
    expected = photometric_distortion(image.as_subclass(torch.Tensor), draw_photometric_params())
    assert torch.equal(out_image, expected) and isinstance(out_image, tv_tensors.Image)
    assert torch.equal(out_mask, sample(24, 40)[1])


def test_batched_photometric_distortion_equals_per_image():
    """The trainer's batch-wide step gives each padded crop the pixels ``photometric_distortion`` gives it alone,
    every step combination drawn (and ``None``: untouched)."""
    g = torch.Generator().manual_seed(0)
    crops = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
             for h, w in [(24, 40), (17, 40), (24, 31), (9, 12)] * 4]
    images, _, _ = pad_batch(crops, [c[0].long() for c in crops], (24, 40))
    steps_seen = set()
    params = []
    for seed in range(len(crops)):
        torch.manual_seed(seed)
        params.append(draw_photometric_params() if seed != 5 else None)
        steps_seen |= {k for k, v in (params[-1] or {}).items() if v not in (None, False)}
    assert steps_seen == {"brightness", "contrast_first", "contrast", "saturation", "hue"}
    out = photometric_distortion_batch(images.clone(), params)
    for i, (crop, p) in enumerate(zip(crops, params)):
        h, w = crop.shape[-2:]
        expected = crop if p is None else photometric_distortion(crop, p)
        assert torch.equal(out[i, :, :h, :w], expected), f"image {i}: {p}"


def test_pad_batch_keeps_every_mask_value():
    """8-bit masks stay uint8; one wider mask in the batch makes the batch int64, so its classes past 255
    do not wrap; the padding is 255 (ignored) either way."""
    images = [torch.zeros(3, 4, 5, dtype=torch.uint8), torch.zeros(3, 2, 3, dtype=torch.uint8)]
    small = [torch.full((4, 5), 7, dtype=torch.uint8), torch.full((2, 3), 9, dtype=torch.uint8)]
    _, labels, sizes = pad_batch(images, small, (4, 6))
    assert labels.dtype == torch.uint8 and sizes.tolist() == [[4, 5], [2, 3]]
    assert labels[0, :, :5].eq(7).all() and labels[0, :, 5].eq(255).all() and labels[1, 2:].eq(255).all()
    _, labels, _ = pad_batch(images, [small[0], torch.full((2, 3), 300)], (4, 6))
    assert labels.dtype == torch.int64 and labels[1, :2, :3].eq(300).all() and labels[0, :, :5].eq(7).all()
    assert labels[1, 2:].eq(255).all()


def test_trainer_samples_equal_the_whole_pipeline(tmp_path):
    """The trainer's per-sample geometric steps + batch-wide photometric step (``_TrainSamples``,
    ``_collate_train``) produce the batch that ``build_train_transform`` + ``pad_batch`` produce under the
    same per-sample seeds: the draws come in the same order."""
    import segmentation.train as seg_train

    cfg = SimpleNamespace(scale=[256, 48], ratio_range=[0.5, 2.0], crop_size=[48, 64], cat_max_ratio=0.75,
                          hflip=0.5, photometric=True)
    pairs = [sample(30, 50, seed=seed) for seed in range(8)]

    class Pairs(list):  # ADE20K.load's form: a [3, H, W] view of H x W x 3 pixels and an 8-bit mask array
        def load(self, index):
            image, mask = self[index]
            pixels = image.as_subclass(torch.Tensor).permute(1, 2, 0).contiguous()
            return pixels.permute(2, 0, 1), mask.as_subclass(torch.Tensor).numpy().astype(np.uint8)

    samples = seg_train._TrainSamples(Pairs(pairs), cfg)
    whole = build_train_transform(cfg)
    ours, theirs = [], []
    for seed in range(8):
        torch.manual_seed(100 + seed)
        ours.append(samples[seed])
        torch.manual_seed(100 + seed)
        theirs.append(whole(*pairs[seed]))
    images, labels, sizes, draws = seg_train._collate_train(ours, crop_size=(48, 64))
    assert draws is None  # applied in the collate
    ref_images, ref_labels, ref_sizes = pad_batch([im.as_subclass(torch.Tensor) for im, _ in theirs],
                                                  [m.as_subclass(torch.Tensor) for _, m in theirs], (48, 64))
    assert labels.dtype == torch.uint8 and ref_labels.dtype == torch.int64
    assert torch.equal(sizes, ref_sizes) and torch.equal(labels.long(), ref_labels)
    for i, (h, w) in enumerate(sizes.tolist()):  # the padding is set on the device (Normalize)
        assert torch.equal(images[i, :, :h, :w], ref_images[i, :, :h, :w])


def test_random_resize_follows_mmcv_rescale_rule():
    from mmcv.image import rescale_size as mmcv_rescale_size
    image, mask = sample(37, 53)
    for seed in range(5):
        torch.manual_seed(seed)
        ratio = float(torch.rand(())) * 1.5 + 0.5
        bound = (int(2048 * ratio), int(512 * ratio))
        w, h = mmcv_rescale_size((53, 37), bound)
        torch.manual_seed(seed)
        out_image, out_mask = RandomResize((2048, 512), (0.5, 2.0))(image, mask)
        assert out_image.shape == (3, h, w) and out_mask.shape == (h, w)
        assert set(out_mask.unique().tolist()) <= set(mask.unique().tolist())  # nearest: no new values
    assert rescale_size(100, 400, (2048, 512)) == (512, 2048) and rescale_size(1000, 500, (2048, 512)) == (1024, 512)


@pytest.mark.parametrize("seed", range(6))
def test_cat_max_ratio_crop_equals_mmseg_on_equal_draws(seed, monkeypatch):
    mmseg_transforms = import_mmseg_transforms()
    # A mask where most windows are dominated by class 0, so re-draws happen.
    mask = torch.zeros(40, 60, dtype=torch.int64)
    mask[30:, 45:] = 1
    mask[:6, :6] = 255
    mask[:3, 50:] = 2
    image = tv_tensors.Image(torch.arange(3 * 40 * 60, dtype=torch.int64).reshape(3, 40, 60).to(torch.uint8))
    torch.manual_seed(seed)
    ours_image, ours_mask = CatMaxRatioCrop((16, 20), 0.75)(image, tv_tensors.Mask(mask))
    monkeypatch.setattr(np.random, "randint", TorchBackedNumpyRandom.randint)
    torch.manual_seed(seed)
    ref = mmseg_transforms.RandomCrop((16, 20), cat_max_ratio=0.75).transform(
        {"img": image.permute(1, 2, 0).numpy(), "gt_seg_map": mask.numpy(), "seg_fields": ["gt_seg_map"]})
    np.testing.assert_array_equal(ours_mask.numpy(), ref["gt_seg_map"])
    np.testing.assert_array_equal(ours_image.permute(1, 2, 0).numpy(), ref["img"])


def _boxes_by_histogram(crop: CatMaxRatioCrop, mask: np.ndarray, height: int, width: int) -> tuple:
    """mmseg's loop, a histogram of every window: the reference for draw_box's quick rejection."""
    box = crop._draw(height, width)
    for _ in range(10):
        y1, y2, x1, x2 = box
        counts = np.bincount(mask[y1:y2, x1:x2].ravel(), minlength=256)
        counts[crop.ignore_index] = 0
        if np.count_nonzero(counts) > 1 and counts.max() / counts.sum() < 0.75:
            break
        box = crop._draw(height, width)
    return box


@pytest.mark.parametrize("dtype,ignore_index", [(np.uint8, 255), (np.int64, 255), (np.uint8, 0)])
def test_crop_quick_rejection_draws_the_histogram_loops_boxes(dtype, ignore_index):
    """draw_box rejects a window by one comparison when the last dominant class fills it: the same boxes as
    the histogram of every window, on masks with a dominant background, ignored pixels (whole windows of them
    where the background is the ignore index 0) and windows exactly at the ratio (12 of 16 pixels)."""
    rng = np.random.default_rng(0)
    crop = CatMaxRatioCrop((4, 4), 0.75, ignore_index=ignore_index)
    draws = []
    draw = crop._draw
    crop._draw = lambda h, w: draws.append(1) or draw(h, w)
    for seed in range(300):
        mask = np.zeros((12, 14), dtype=dtype)
        for _ in range(rng.integers(0, 4)):  # blobs of other classes, some ignored
            y, x = rng.integers(0, 12), rng.integers(0, 14)
            mask[y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] = rng.choice([1, 2, 255])
        torch.manual_seed(seed)
        ours = crop.draw_box(12, 14, mask)
        after_ours = torch.randint(0, 1000, ()).item()
        torch.manual_seed(seed)
        ref = _boxes_by_histogram(crop, mask, 12, 14)
        assert ours == ref and torch.randint(0, 1000, ()).item() == after_ours  # same box, same draws
    assert len(draws) > 2 * 2 * 300  # mostly re-drawn windows: the quick rejection is exercised


def test_crop_redraws_until_no_class_dominates():
    mask = torch.zeros(64, 64, dtype=torch.int64)
    mask[:, 56:] = 1  # only a window touching the right strip has two classes
    crop = CatMaxRatioCrop((16, 16), 0.75)
    hits = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out = crop(tv_tensors.Mask(mask))
        counts = torch.bincount(out.flatten(), minlength=2)
        hits += bool(counts.min() > 0 and counts.max() / counts.sum() < 0.75)
    # one draw succeeds with p = 5/49; eleven draws with 1 - (44/49)^11 ~ 0.7; without re-draws ~4 of 40
    assert hits >= 20


def test_train_pipeline_is_deterministic_and_sized():
    cfg = SimpleNamespace(scale=[256, 64], ratio_range=[0.5, 2.0], crop_size=[48, 64], cat_max_ratio=0.75,
                          hflip=0.5, photometric=True)
    transform = build_train_transform(cfg)
    image, mask = sample(30, 50)
    shapes = set()
    for seed in range(8):
        torch.manual_seed(seed)
        a_image, a_mask = transform(image, mask)
        torch.manual_seed(seed)
        b_image, b_mask = transform(image, mask)
        assert torch.equal(a_image, b_image) and torch.equal(a_mask, b_mask)
        assert a_image.shape[1:] == a_mask.shape and a_image.dtype == torch.uint8
        assert isinstance(a_image, tv_tensors.Image) and isinstance(a_mask, tv_tensors.Mask)
        shapes.add(tuple(a_mask.shape))
    # the resized image is 64 r rows high (r ~ U[0.5, 2]); the crop is the whole of it below 48 rows, and
    # unpadded: padding happens per batch (pad_batch), after normalisation, as in mmseg
    assert all(h <= 48 and w <= 64 for h, w in shapes) and (48, 64) in shapes and any(h < 48 for h, _ in shapes)
    torch.manual_seed(0)
    cfg.ratio_range = [0.5, 0.5]
    out_image, out_mask = build_train_transform(cfg)(image, mask)
    assert out_image.shape == (3, 32, 53) and out_mask.shape == (32, 53)  # 30 x 50 x 32/30: 32 x 53


def test_padded_batch_equals_mmseg_seg_data_preprocessor():
    """Our batch (pad_batch in the workers, Normalize on the device) equals mmseg's SegDataPreProcessor
    (normalise, then pad: image 0 = the mean colour, labels 255) on the same crops of mmseg's ratio range
    0.5-2.0: a third of the draws are smaller than the crop size here (r < 1), as at mmseg's 512."""
    import segmentation.train as seg_train

    import_mmseg_transforms()
    from mmengine.structures import PixelData
    from mmseg.models.data_preprocessor import SegDataPreProcessor
    from mmseg.structures import SegDataSample

    crop = (48, 64)
    cfg = SimpleNamespace(scale=[256, 48], ratio_range=[0.5, 2.0], crop_size=list(crop), cat_max_ratio=0.75,
                          hflip=0.5, photometric=True)
    transform = build_train_transform(cfg)
    torch.manual_seed(0)
    crops = [transform(*sample(30, 50, seed=seed)) for seed in range(8)]
    assert sum(im.shape[-2:] != crop for im, _ in crops) >= 2 and sum(im.shape[-2:] == crop for im, _ in crops) >= 1

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    images, labels, sizes, _ = seg_train._collate_train([(im, m, None) for im, m in crops], crop_size=crop)
    ours = seg_train.Normalize(mean, std)(images, sizes)

    preprocessor = SegDataPreProcessor(mean=[255 * m for m in mean], std=[255 * s for s in std], size=crop,
                                       pad_val=0, seg_pad_val=255, bgr_to_rgb=True)  # as the recipe, images BGR
    samples = []
    for _, mask in crops:
        data_sample = SegDataSample()
        data_sample.gt_sem_seg = PixelData(data=mask.as_subclass(torch.Tensor)[None].clone())
        samples.append(data_sample)
    theirs = preprocessor(dict(inputs=[im.as_subclass(torch.Tensor)[[2, 1, 0]] for im, _ in crops],
                               data_samples=samples), training=True)
    assert ours.shape == theirs["inputs"].shape == (8, 3, *crop)
    torch.testing.assert_close(ours, theirs["inputs"], rtol=1e-5, atol=1e-5)
    assert torch.equal(labels.long(), torch.stack([s.gt_sem_seg.data[0] for s in theirs["data_samples"]]).long())
    assert sizes.tolist() == [list(im.shape[-2:]) for im, _ in crops]


def test_eval_transform_resizes_the_image_only():
    cfg = SimpleNamespace(scale=[2048, 512])
    image, mask = sample(30, 50)
    out_image, out_mask = build_eval_transform(cfg)(image, mask)
    assert out_image.shape == (3, 512, 853) and torch.equal(out_mask, mask)  # 512/30 * 50 = 853.3


def test_mask_resize_is_cv2_nearest_at_exact_boundaries():
    """The label's nearest-neighbour resize picks cv2's source pixels (mmcv imresize, INTER_NEAREST), also where
    i * src / dst is an integer in exact arithmetic and float32 lands on the other side."""
    import cv2

    from segmentation.transforms import _resize

    rng = np.random.default_rng(0)
    for src_h, src_w, dst_h, dst_w in ((26, 26, 10, 10), (1200, 1600, 312, 416), (37, 53, 59, 2), (5, 9, 15, 27)):
        mask = rng.integers(0, 150, (src_h, src_w), dtype=np.uint8)
        ours = _resize(tv_tensors.Mask(torch.from_numpy(mask)[None]), (dst_h, dst_w))[0].numpy()
        theirs = cv2.resize(mask, (dst_w, dst_h), interpolation=cv2.INTER_NEAREST)
        np.testing.assert_array_equal(ours, theirs)
