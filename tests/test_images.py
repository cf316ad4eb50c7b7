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


def _pil_rgb(path) -> np.ndarray:
    from PIL import ImageOps

    with Image.open(path) as im:
        return np.array(ImageOps.exif_transpose(im).convert("RGB"))


def test_jpeg_files_decode_to_pils_pixels(tmp_path):
    """read_rgb decodes .jpg with torchvision.io: PIL's pixels (and EXIF orientation) for every orientation and
    chroma subsampling, grey and CMYK files; a PNG named .jpg and a truncated JPEG go to PIL (its error)."""
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)).resize((101, 67), Image.BILINEAR)
    cases = {f"o{o}": _photo(tmp_path / f"o{o}.jpg", orientation=o) for o in range(1, 9)}
    for sub in (0, 1, 2):
        smooth.save(tmp_path / f"s{sub}.jpeg", quality=90, subsampling=sub)
        cases[f"s{sub}"] = tmp_path / f"s{sub}.jpeg"
    smooth.save(tmp_path / "progressive.JPG", quality=80, progressive=True)
    smooth.convert("L").save(tmp_path / "grey.jpg")
    smooth.convert("CMYK").save(tmp_path / "cmyk.jpg")
    smooth.save(tmp_path / "png_named.jpg", format="PNG")
    cases.update({name: tmp_path / f"{name}.jpg" for name in ("grey", "cmyk", "png_named")})
    cases["progressive"] = tmp_path / "progressive.JPG"
    for name, path in cases.items():
        ours = read_rgb(path)
        assert ours.dtype == np.uint8 and ours.shape[2] == 3, name
        np.testing.assert_array_equal(ours, _pil_rgb(path), err_msg=name)
    assert read_rgb(cases["o6"]).shape == (40, 24, 3)  # turned by its EXIF orientation
    data = cases["s0"].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="truncated"):
        read_rgb(tmp_path / "cut.jpg")
    with pytest.raises(FileNotFoundError):
        read_rgb(tmp_path / "missing.jpg")


def test_class_index_pngs_decode_to_pils_values(tmp_path):
    """read_index_png: 8-bit grey, palette indices (not their colours) and 16-bit grey as PIL reads them; an RGB
    PNG, a JPEG or a truncated PNG is None (the caller's PIL path says what is wrong)."""
    from runtime.images import read_index_png

    index = (np.arange(30 * 40).reshape(30, 40) % 23).astype(np.uint8)
    Image.fromarray(index).save(tmp_path / "grey.png")
    palette = Image.new("P", (40, 30))
    palette.putdata(index.flatten().tolist())
    palette.putpalette([(7 * i) % 256 for i in range(768)])
    palette.save(tmp_path / "palette.png")
    Image.fromarray(index.astype(np.uint16) * 1000).save(tmp_path / "deep.png")
    for name in ("grey", "palette", "deep"):
        ours = read_index_png(tmp_path / f"{name}.png")
        theirs = np.array(Image.open(tmp_path / f"{name}.png"))
        assert ours.dtype == theirs.dtype and ours.shape == (30, 40), name
        np.testing.assert_array_equal(ours, theirs, err_msg=name)
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "rgb.png")
    data = (tmp_path / "grey.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(index).save(tmp_path / "grey.jpg")
    assert all(read_index_png(tmp_path / name) is None for name in ("rgb.png", "cut.png", "grey.jpg", "none.png"))
    from segmentation.ade20k import ADE20KFormatError, read_pair

    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "image.jpg")
    with pytest.raises(ADE20KFormatError, match="rgb.png: expected a single-channel class-index PNG, got mode RGB"):
        read_pair(tmp_path / "image.jpg", tmp_path / "rgb.png")
    with pytest.raises(ADE20KFormatError, match="cut.png: cannot read the annotation"):
        read_pair(tmp_path / "image.jpg", tmp_path / "cut.png")
