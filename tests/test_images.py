"""Image files as the reference engines read them: EXIF orientation (detectron2's read_image, mmseg's
LoadImageFromFile) and 16-bit grey (mmseg's OpenCV conversion), through the suite's VOC and ADE20K loaders."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from runtime.images import image_size, read_rgb


def _photo(path, size=(40, 24), orientation=6):
    """A JPEG stored landscape with an EXIF orientation: a white block at the stored top-left corner."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:8, :8] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=100, exif=exif)
    return path


def test_exif_orientation_is_applied_as_detectron2_reads_it(tmp_path):
    from detection.d2_engine import import_detectron2

    try:
        import_detectron2()
    except ImportError as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"detectron2 cannot be imported: {e}")
    from detectron2.data.detection_utils import read_image

    for orientation in (1, 3, 6, 8):
        path = _photo(tmp_path / f"o{orientation}.jpg", orientation=orientation)
        ours = read_rgb(path)
        np.testing.assert_array_equal(ours, read_image(str(path), format="RGB"))
        assert image_size(path) == (ours.shape[1], ours.shape[0])
    assert image_size(tmp_path / "o6.jpg") == (24, 40)  # turned: width and height swap


def test_ade20k_images_are_read_as_mmseg_reads_them(tmp_path):
    """EXIF orientation and a 16-bit grey PNG: the pixels mmseg's LoadImageFromFile (OpenCV) gives, RGB."""
    from segmentation.ade20k import read_pair
    from segmentation.mmseg_engine import import_mmseg

    try:
        import_mmseg()
    except ImportError as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"mmseg cannot be imported: {e}")
    from mmcv.transforms import LoadImageFromFile as Load

    grey16 = (np.arange(24 * 40, dtype=np.uint32).reshape(24, 40) * 68).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    for path in (_photo(tmp_path / "o6.jpg"), tmp_path / "g16.png"):
        theirs = Load()(dict(img_path=str(path)))["img"][:, :, ::-1]  # BGR -> RGB
        mask = tmp_path / "mask.png"
        Image.fromarray(np.ones(theirs.shape[:2], np.uint8)).save(mask)
        image, _ = read_pair(path, mask)
        assert np.abs(image.astype(int) - theirs.astype(int)).max() <= 1  # (JPEG decoders may round apart)
    assert image.max() > 200  # 16-bit values scaled to 8 bits, not clipped to 255 everywhere
    assert (image < 255).mean() > 0.9
