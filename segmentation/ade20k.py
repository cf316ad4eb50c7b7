"""ADE20K (SceneParsing / ADEChallengeData2016) in its release layout.

::

    <root>/images/training/ADE_train_00000001.jpg    (or .jpeg .png .bmp .tif .tiff, any case)
    <root>/images/validation/ADE_val_00000001.jpg
    <root>/annotations/training/ADE_train_00000001.png
    <root>/annotations/validation/ADE_val_00000001.png

``root`` is the ``ADEChallengeData2016`` folder (or its parent). Annotation PNGs hold 0..150: 0 is
"other" (not evaluated), 1..150 the classes. As mmsegmentation (``reduce_zero_label=True``), labels
are returned as 0..149 with 0 -> 255 (``IGNORE_INDEX``).

Other datasets in the same layout pass their own ``num_classes`` (classes after the reduction) and
``reduce_zero_label=False`` when their PNGs already hold 0..K-1 (and 255 for "ignore").

``check=True`` (the trainers, for both splits) decodes every image and mask before training, in worker
processes with a progress bar: a corrupt image, a mask of another size or one holding a value that is not
a class stops the run at once, naming the file.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from runtime.errors import DataError, UserPathError
from runtime.images import check_files, index_images, read_index_png, read_rgb

log = logging.getLogger(__name__)

NUM_CLASSES = 150
IGNORE_INDEX = 255
SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}


class ADE20KFormatError(DataError):
    """An ADE20K file that cannot be read as released; the message names the file."""


def palette(num_classes: int) -> np.ndarray:
    """A fixed colour per class ([K, 3] uint8, seeded): the torch engine's overlays and the mmseg engine's
    dataset metainfo for classes other than ADE20K's (mmseg draws random colours for those)."""
    return torch.randint(0, 256, (num_classes, 3), generator=torch.Generator().manual_seed(42)).numpy().astype(np.uint8)


def reduce_zero_label(annotation: np.ndarray) -> np.ndarray:
    """0..K -> 255 (ignore), 0..K-1. An 8-bit annotation stays uint8 (``0 - 1`` wraps to 255, the ignore index:
    one pass, an eighth of int64's bytes through the training loader); a wider one becomes int64."""
    if annotation.dtype == np.uint8:
        return annotation - np.uint8(1)
    label = annotation.astype(np.int64) - 1
    label[annotation == 0] = IGNORE_INDEX
    return label


class ADE20K(Dataset):
    """Items are ``(image, mask)``: a uint8 ``tv_tensors.Image`` [3, H, W] and an int64
    ``tv_tensors.Mask`` [H, W] with values 0..149 and 255. ``transforms(image, mask)`` is applied last
    (torchvision.transforms.v2 resizes/crops/flips the mask with the image, nearest for the mask)."""

    def __init__(self, root: Path | str, split: str = "validation", transforms: Optional[Callable] = None, *,
                 num_classes: int = NUM_CLASSES, reduce_zero_label: bool = True, max_images: int = 0,
                 check: bool = False):
        root = Path(root)
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        if split not in SPLITS:
            raise DataError(f"ADE20K split {split!r}: choose 'training' or 'validation' (or train / val)")
        self.images_dir = root / "images" / SPLITS[split]
        self.annotations_dir = root / "annotations" / SPLITS[split]
        for d in (self.images_dir, self.annotations_dir):
            if not d.is_dir():
                raise UserPathError(f"{d} not found: the data root {root} should be ADEChallengeData2016, "
                                    "holding images/{training,validation} and annotations/{training,validation}")
        images = index_images(self.images_dir)
        self.ids = sorted(images)
        if not self.ids:
            raise ADE20KFormatError(f"{self.images_dir}: no images (.jpg .jpeg .png .bmp .tif .tiff; empty split "
                                    f"{split!r})")
        if max_images > 0:
            self.ids = self.ids[:max_images]
        self.image_paths = [images[i] for i in self.ids]
        missing = [i for i in self.ids if not (self.annotations_dir / f"{i}.png").is_file()]
        if missing:
            raise ADE20KFormatError(f"{self.annotations_dir}: no annotation for {len(missing)} image(s), e.g. "
                                    f"{missing[0]}.png")
        if max_images <= 0:
            orphans = sorted({q.stem for q in self.annotations_dir.glob("*.png")} - set(images))
            if orphans:  # not used (no image to pair with); said, not dropped silently
                log.warning("%s: %d annotation(s) without an image in %s are not used, e.g. %s.png",
                            self.annotations_dir, len(orphans), self.images_dir, orphans[0])
        self.num_classes, self.reduce_zero_label = num_classes, reduce_zero_label
        self.transforms = transforms
        if check:
            self.check(split)

    def check(self, split: str = "", workers: Optional[int] = None) -> None:
        """Decode every image and mask (worker processes): sizes agree, masks hold only class ids."""
        items = [(str(image), str(self.annotations_dir / f"{i}.png"), self.num_classes, self.reduce_zero_label)
                 for i, image in zip(self.ids, self.image_paths)]
        check_files(check_pair, items, f"checking {split or self.images_dir.name} images and masks", workers)

    def image_suffix(self) -> str:
        """The one image extension of the split (mmseg's datasets take one); mixed extensions are an error."""
        suffixes = sorted({p.suffix for p in self.image_paths})
        if len(suffixes) > 1:
            raise ADE20KFormatError(f"{self.images_dir}: images with extensions {', '.join(suffixes)}; the mmseg "
                                    "engine reads one extension per split: convert them to one (or use engine=torch)")
        return suffixes[0]

    def __len__(self) -> int:
        return len(self.ids)

    def _check_values(self, annotation: np.ndarray, label_path: Path) -> None:
        check_values(annotation, label_path, self.num_classes, self.reduce_zero_label)

    def load(self, index: int) -> tuple[torch.Tensor, np.ndarray]:
        """``(image, label)`` of item ``index`` without wrapping or transforms: a uint8 tensor [3, H, W] and the
        class ids [H, W] as a uint8 array where the annotation is an 8-bit PNG (ADE20K's; 255 = ignored), int64
        for a 16-bit one. The training loader's form (``segmentation.train``): the image is a view of the decoded
        H x W x 3 pixels (channels last, which the uint8 resize reads fastest), the masks stay 8-bit through the
        resize, crop and batch; ``dataset[index]`` makes the image contiguous and widens the mask to int64."""
        image_path = self.image_paths[index]
        label_path = self.annotations_dir / f"{self.ids[index]}.png"
        image, annotation = read_pair(image_path, label_path)
        self._check_values(annotation, label_path)
        label = reduce_zero_label(annotation) if self.reduce_zero_label else annotation
        if label.dtype != np.uint8:
            label = label.astype(np.int64, copy=False)
        return torch.from_numpy(image).permute(2, 0, 1), label

    def __getitem__(self, index: int):
        from torchvision import tv_tensors

        image, label = self.load(index)
        image = tv_tensors.Image(image.contiguous())
        mask = tv_tensors.Mask(torch.from_numpy(label.astype(np.int64, copy=False)))
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return image, mask


def check_values(annotation: np.ndarray, label_path: Path | str, num_classes: int, reduce_zero_label: bool) -> None:
    """Every value of a mask is a class id (or ignored); an error naming the file and the value otherwise."""
    if annotation.size == 0:
        return
    # the common case by one maximum (the loader checks every sample): the sorted values only for the error
    if reduce_zero_label:
        fine = annotation.max() <= num_classes
    else:
        fine = annotation.max(initial=0, where=annotation != IGNORE_INDEX) < num_classes
    if fine:
        return
    values = np.unique(annotation)
    if reduce_zero_label:  # 0 = "other", 1..K the classes
        bad = values[values > num_classes]
        allowed = f"0..{num_classes} (0 = ignored, reduce_zero_label)"
    else:
        bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
        allowed = f"0..{num_classes - 1} or {IGNORE_INDEX} (ignored)"
    if bad.size:
        raise ADE20KFormatError(f"{label_path}: value {int(bad[0])} is not a class: expected {allowed}; "
                                "check num_classes / reduce_zero_label of the data config")


def read_pair(image_path: Path | str, label_path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """An image (RGB uint8 [H, W, 3]) and its class-index mask ([H, W]); errors name the file."""
    try:  # EXIF orientation applied and 16-bit grey scaled to 8 bits, as mmseg's LoadImageFromFile (OpenCV)
        image = read_rgb(image_path, scale_16bit=True)
    except (OSError, SyntaxError, ValueError) as e:  # missing, truncated or not an image
        raise ADE20KFormatError(f"{image_path}: cannot read the image ({e})") from None
    annotation = read_index_png(label_path)  # a 1-channel PNG; anything else (or an error) through PIL
    if annotation is None:
        annotation = _read_annotation_pil(label_path)
    if annotation.shape != image.shape[:2]:
        raise ADE20KFormatError(f"{label_path}: annotation is {annotation.shape[1]}x{annotation.shape[0]}, "
                                f"its image {Path(image_path).name} {image.shape[1]}x{image.shape[0]}")
    return image, annotation


def _read_annotation_pil(label_path: Path | str) -> np.ndarray:
    """What ``read_index_png`` does not decode: a single-channel image of another format, or an error naming the
    file and its mode or PIL's complaint."""
    from PIL import Image

    try:
        with Image.open(label_path) as im:
            if im.mode not in ("L", "P", "I;16", "I"):
                raise ADE20KFormatError(f"{label_path}: expected a single-channel class-index PNG, got mode "
                                        f"{im.mode}")
            return np.array(im)
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ADE20KFormatError):
            raise
        raise ADE20KFormatError(f"{label_path}: cannot read the annotation ({e})") from None


def check_pair(item: tuple[str, str, int, bool]) -> None:
    """``ADE20K.check``'s worker: read an image and its mask, check sizes and mask values."""
    image_path, label_path, num_classes, reduce_zero = item
    _, annotation = read_pair(image_path, label_path)
    check_values(annotation, label_path, num_classes, reduce_zero)
