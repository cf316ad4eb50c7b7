"""Image files as users have them, and checking a whole split of them before training starts.

``index_images(folder)`` maps each image's id (its file name without the extension) to its file, for the
extensions in ``IMAGE_EXTENSIONS`` (any case): aerial imagery and many annotation tools export PNG or
TIFF, not JPEG. Two files of one id (``a.jpg`` and ``a.png``) are an error naming both.

``check_files(check, items, ...)`` runs ``check(item)`` on every item in worker processes with a progress
bar and raises the first failure (in item order) as a ``DataError`` naming the file: the detection and
segmentation loaders validate both splits this way before the first iteration, so a corrupt test image
stops the run at once instead of after training.
"""
from __future__ import annotations

import functools
import logging
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

from .errors import DataError, UserPathError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

T = TypeVar("T")


def index_images(folder: Path | str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> dict[str, Path]:
    """``{id: path}`` of the images directly in ``folder`` (one ``os.scandir``: fast on 100k files).

    Raises ``UserPathError`` if the folder does not exist and ``DataError`` naming both files if an id
    has two images (``a.jpg`` and ``a.png``): which one is meant cannot be guessed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserPathError(f"{folder}: image folder not found")
    found: dict[str, Path] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() not in extensions or not entry.is_file():
                continue
            if stem in found:
                first, second = sorted([found[stem].name, entry.name])
                raise DataError(f"{folder}: two images for id {stem!r} ({first} and {second}); keep one of them")
            found[stem] = Path(entry.path)
    return found


EXIF_ORIENTATION = 0x0112  # the EXIF tag; values 5-8 turn the image by 90 degrees (width and height swap)


def image_size(path: Path | str) -> tuple[int, int]:
    """``(width, height)`` of an image as ``read_rgb`` returns it (its EXIF orientation applied), decoding it
    fully (at 1/8 scale for JPEG, which still reads every byte), so a truncated or corrupt file raises
    ``DataError`` naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            size = im.size
            turned = im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
            if im.format == "JPEG":
                im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for missing, truncated or unknown data
        raise DataError(f"{path}: cannot read the image ({e}); fix or remove it") from None
    return (size[1], size[0]) if turned else size


JPEG_SUFFIXES = (".jpg", ".jpeg")


def read_rgb(path: Path | str, scale_16bit: bool = False):
    """An image file as an RGB uint8 array ``[H, W, 3]``, as the reference engines read it: its EXIF orientation
    applied (detectron2's ``read_image``, mmseg's ``LoadImageFromFile``: a phone photo is upright, and its boxes or
    mask were drawn on the upright image). ``scale_16bit``: a 16-bit grayscale image is scaled to 8 bits (>> 8,
    OpenCV's conversion, which mmseg uses) instead of PIL's clipping (detectron2's). Raises PIL's ``OSError`` for
    an unreadable file (the caller names it).

    A ``.jpg``/``.jpeg`` file is decoded by ``torchvision.io`` (libjpeg-turbo, as PIL: the same pixels, in half
    PIL's time on the loaders' small images); the array is then the decoder's own buffer (torchvision returns a
    ``[3, H, W]`` view of H x W x 3 pixels), without a copy. Any file it does not decode (another
    format under that name, a truncated one) goes to PIL, whose error names the problem."""
    import numpy as np
    from PIL import Image, ImageOps

    if Path(path).suffix.lower() in JPEG_SUFFIXES:
        image = decode_jpeg_file(path)
        if image is not None:
            return image.permute(1, 2, 0).numpy()
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if scale_16bit and im.mode in ("I;16", "I;16B", "I;16L", "I"):
            grey = (np.asarray(im).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
            return np.repeat(grey[:, :, None], 3, axis=2)
        return np.array(im.convert("RGB"))


def read_index_png(path: Path | str):
    """A single-channel PNG (class indices: 8-bit grey or palette indices, or 16-bit grey) as its ``[H, W]``
    uint8/uint16 array, decoded by ``torchvision.io`` (PIL's values, in less time); None for any other file
    (more channels, not a PNG, unreadable), which the caller reads with PIL to say what it is."""
    if Path(path).suffix.lower() != ".png":
        return None
    mask = _torchvision_decode("decode_png", path, mode="UNCHANGED")
    return mask[0].numpy() if mask is not None and mask.shape[0] == 1 else None


def _torchvision_decode(decoder: str, path: Path | str, mode: str, **kwargs):
    """``torchvision.io.<decoder>`` of the file's bytes in ``ImageReadMode.<mode>``, or None where torchvision does
    not decode it (not that format, truncated, no such file, or a torchvision without its image functions, which
    0.29 deprecates): the callers read such files with PIL, whose error names the problem."""
    try:
        from torchvision import io
    except ImportError:  # pragma: no cover - torchvision itself is a dependency
        return None
    if not hasattr(io, decoder):  # pragma: no cover - the image functions removed (deprecated in 0.29)
        return None
    _quiet_torchvision_io()
    try:
        return getattr(io, decoder)(io.read_file(str(path)), mode=getattr(io.ImageReadMode, mode), **kwargs)
    except RuntimeError:
        return None


@functools.lru_cache(maxsize=None)
def _quiet_torchvision_io() -> None:
    """Once: torchvision 0.29 warns at every decode that its image functions will move to TorchCodec. Until
    they do, read_rgb uses them, and falls back to PIL when they are gone; the warning says nothing to the user."""
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are "
                            "deprecated", category=DeprecationWarning)


def decode_jpeg_file(path: Path | str, exif_orientation: bool = True):
    """A JPEG file as ``[3, H, W]`` uint8 RGB (its EXIF orientation applied unless ``exif_orientation=False``) by
    ``torchvision.io``: PIL's pixels in about half PIL's time. None where torchvision does not decode it (another
    format, a truncated file, no such file): the caller reads it with PIL, whose error names the problem."""
    return _torchvision_decode("decode_jpeg", path, mode="RGB", apply_exif_orientation=exif_orientation)


def default_check_workers() -> int:
    """Processes for ``check_files``: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def check_files(check: Callable[[T], None], items: Sequence[T], description: str,
                workers: Optional[int] = None, chunksize: int = 64) -> None:
    """Run ``check`` (a module-level function, so it pickles) on every item, in ``workers`` processes
    (``default_check_workers()`` if None; 0 or 1 runs here) with a tqdm progress bar on stderr; the first
    item whose check fails (in item order) re-raises its error. ``check`` raises ``DataError`` naming the
    file."""
    from tqdm import tqdm

    workers = default_check_workers() if workers is None else workers
    bar = tqdm(total=len(items), desc=description, unit="file", leave=False, mininterval=1.0,
               disable=len(items) < 500)
    try:
        if workers <= 1 or len(items) < 2 * chunksize:
            for item in items:
                check(item)
                bar.update()
            return
        with ProcessPoolExecutor(workers) as pool:
            # map yields in item order and re-raises the first failing item's error when it is reached.
            for _ in pool.map(check, items, chunksize=chunksize):
                bar.update()
    finally:
        bar.close()

