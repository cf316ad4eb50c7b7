"""PASCAL VOC detection data in its on-disk layout (the devkit's ``VOCdevkit`` folder).

::

    <root>/VOC2007/Annotations/<id>.xml
    <root>/VOC2007/ImageSets/Main/{train,val,trainval,test}.txt
    <root>/VOC2007/JPEGImages/<id>.jpg
    <root>/VOC2012/...

``root`` is the ``VOCdevkit`` folder (or its parent). The paper's detection setting (Table 8) trains on
``2007-trainval+2012-trainval`` and tests on ``2007-test``.

Boxes are returned as ``tv_tensors.BoundingBoxes`` in XYXY continuous pixel coordinates: VOC's 1-based
inclusive corners become ``(xmin - 1, ymin - 1, xmax, ymax)`` (detectron2 does the same), so
torchvision.transforms.v2 flips and resizes them with the image and ``detection.voc_eval`` reproduces
the devkit's IoUs.
"""
from __future__ import annotations

import bisect
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
_CLASS_INDEX = {name: i for i, name in enumerate(VOC_CLASSES)}


class VOCFormatError(ValueError):
    """A VOC file that cannot be read as the devkit writes it; the message names the file."""


@dataclass
class VOCAnnotation:
    boxes: np.ndarray       # [N, 4] float32, XYXY continuous pixel coordinates
    labels: np.ndarray      # [N] int64, index into VOC_CLASSES
    difficult: np.ndarray   # [N] bool
    width: int
    height: int


def _text(node: ET.Element, path: str, where: Path) -> str:
    child = node.find(path)
    if child is None or child.text is None or not child.text.strip():
        raise VOCFormatError(f"{where}: missing <{path}> in <{node.tag}>")
    return child.text.strip()


def parse_annotation(path: Path | str) -> VOCAnnotation:
    """Read one ``Annotations/<id>.xml``. Errors name the file and the offending object."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise VOCFormatError(f"{path}: annotation file not found (the image set lists this id)") from None
    except ET.ParseError as e:
        raise VOCFormatError(f"{path}: not valid XML ({e})") from None
    size = root.find("size")
    if size is None:
        raise VOCFormatError(f"{path}: missing <size>")
    width, height = int(_text(size, "width", path)), int(_text(size, "height", path))
    boxes, labels, difficult = [], [], []
    for k, obj in enumerate(root.findall("object")):
        name = _text(obj, "name", path)
        if name not in _CLASS_INDEX:
            raise VOCFormatError(f"{path}: object {k} has class {name!r}, not one of the 20 VOC classes")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise VOCFormatError(f"{path}: object {k} ({name}) has no <bndbox>")
        try:
            x1, y1, x2, y2 = (float(_text(bndbox, t, path)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as e:
            raise VOCFormatError(f"{path}: object {k} ({name}): box corner is not a number ({e})") from None
        if not (x2 >= x1 and y2 >= y1):
            raise VOCFormatError(f"{path}: object {k} ({name}) has xmax < xmin or ymax < ymin: "
                                 f"({x1:g}, {y1:g}, {x2:g}, {y2:g})")
        boxes.append((x1 - 1, y1 - 1, x2, y2))
        labels.append(_CLASS_INDEX[name])
        flag = obj.find("difficult")  # optional in a few VOC2012 files: absent = not difficult
        difficult.append(flag is not None and flag.text is not None and flag.text.strip() == "1")
    return VOCAnnotation(np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64),
                         np.array(difficult, bool), width, height)


def _devkit(root: Path) -> Path:
    return root / "VOCdevkit" if (root / "VOCdevkit").is_dir() else root


def read_image_set(root: Path | str, year: str, image_set: str) -> list[str]:
    """The ids of ``VOC<year>/ImageSets/Main/<image_set>.txt`` (one per line; a single id is fine)."""
    path = _devkit(Path(root)) / f"VOC{year}" / "ImageSets" / "Main" / f"{image_set}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: data root {root} should be the VOCdevkit folder, holding "
                                f"VOC{year}/{{Annotations,ImageSets/Main,JPEGImages}}")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise VOCFormatError(f"{path}: lists no image ids")
    return ids


class VOCDetection(Dataset):
    """One VOC year and image set. Items are ``(image, target)``: a uint8 ``tv_tensors.Image`` [3, H, W]
    and ``{"boxes": BoundingBoxes XYXY, "labels": int64, "difficult": bool, "image_id": str}``.

    ``keep_difficult=False`` drops difficult boxes (training, as detectron2 and torchvision references
    do); evaluation keeps them (``detection.voc_eval`` ignores detections that match them).
    ``transforms(image, target)`` is applied last (torchvision.transforms.v2 moves the boxes along).
    """

    def __init__(self, root: Path | str, year: str, image_set: str, keep_difficult: bool = True,
                 transforms: Optional[Callable] = None):
        self.root = _devkit(Path(root)) / f"VOC{year}"
        self.year, self.image_set = year, image_set
        self.ids = read_image_set(root, year, image_set)
        self.keep_difficult = keep_difficult
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.ids)

    def annotation(self, index: int) -> VOCAnnotation:
        ann = parse_annotation(self.root / "Annotations" / f"{self.ids[index]}.xml")
        if not self.keep_difficult:
            keep = ~ann.difficult
            ann = VOCAnnotation(ann.boxes[keep], ann.labels[keep], ann.difficult[keep], ann.width, ann.height)
        return ann

    def __getitem__(self, index: int):
        from PIL import Image
        from torchvision import tv_tensors

        ann = self.annotation(index)
        path = self.root / "JPEGImages" / f"{self.ids[index]}.jpg"
        try:  # PIL: torchvision.io's decoders are deprecated since torchvision 0.29
            with Image.open(path) as im:
                image = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
        except OSError as e:  # missing, truncated or not an image (UnidentifiedImageError is an OSError)
            raise VOCFormatError(f"{path}: cannot read the image ({e})") from None
        if tuple(image.shape[1:]) != (ann.height, ann.width):
            raise VOCFormatError(f"{path}: image is {image.shape[2]}x{image.shape[1]} but its annotation says "
                                 f"{ann.width}x{ann.height}")
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(ann.boxes), format="XYXY",
                                              canvas_size=(ann.height, ann.width)),
            "labels": torch.from_numpy(ann.labels),
            "difficult": torch.from_numpy(ann.difficult),
            "image_id": self.ids[index],
        }
        image = tv_tensors.Image(image)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


class VOCConcat(ConcatDataset):
    """Several VOC sets as one (``2007-trainval+2012-trainval``), with ``annotation(i)`` like each part."""

    def annotation(self, index: int) -> VOCAnnotation:
        part = bisect.bisect_right(self.cumulative_sizes, index)
        offset = self.cumulative_sizes[part - 1] if part else 0
        return self.datasets[part].annotation(index - offset)


def build_voc(root: Path | str, splits: str, keep_difficult: bool = True,
              transforms: Optional[Callable] = None) -> VOCDetection | VOCConcat:
    """``splits`` as ``"2007-trainval+2012-trainval"`` (the paper's training set) or ``"2007-test"``."""
    parts = []
    for split in splits.split("+"):
        year, sep, image_set = split.strip().partition("-")
        if not sep or year not in ("2007", "2012") or not image_set:
            raise ValueError(f"VOC split {split!r}: expected YEAR-SET with YEAR 2007 or 2012, e.g. 2007-trainval")
        parts.append(VOCDetection(root, year, image_set, keep_difficult, transforms))
    return parts[0] if len(parts) == 1 else VOCConcat(parts)
