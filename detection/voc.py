"""PASCAL VOC detection data in its on-disk layout (the devkit's ``VOCdevkit`` folder).

::

    <root>/VOC2007/Annotations/<id>.xml
    <root>/VOC2007/ImageSets/Main/{train,val,trainval,test}.txt
    <root>/VOC2007/JPEGImages/<id>.jpg    (or .jpeg .png .bmp .tif .tiff, any case)
    <root>/VOC2012/...

``root`` is the ``VOCdevkit`` folder (or its parent). The paper's detection setting (Table 8) trains on
``2007-trainval+2012-trainval`` and tests on ``2007-test``.

Boxes are returned as ``tv_tensors.BoundingBoxes`` in XYXY continuous pixel coordinates: VOC's 1-based
inclusive corners become ``(xmin - 1, ymin - 1, xmax, ymax)`` (detectron2 does the same), so
torchvision.transforms.v2 flips and resizes them with the image and ``detection.voc_eval`` reproduces
the devkit's IoUs.

Datasets in the VOC layout with their own classes (``classes=``, the trainer's ``data.classes``) and XML
written by other tools read as well: labelImg, CVAT and Roboflow write float corners ("12.5"), may leave
out ``difficult``/``truncated``/``pose``/``segmented``, and write ``<depth>1</depth>`` or no depth. Boxes
reaching outside the image are clipped to it and counted (``dataset.stats``, one warning per set).
A classes file may start with a background entry (``_background_`` as labelme writes it, ``__background__``
as detectron2 and py-faster-rcnn do): it is recognised, left out (labels count the object classes from 0)
and said. ``check_images=True`` (the trainers) reads every image before training, in worker processes:
a corrupt or missing image, or one whose size differs from its XML, stops the run at once.
"""
from __future__ import annotations

import bisect
import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from runtime.errors import DataError, UserPathError
from runtime.images import check_files, image_size, index_images, read_rgb

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

ClassesArg = Union[None, Sequence[str], str, "os.PathLike[str]"]


# Background entries at the head of a classes file: labelme's class_names.txt, detectron2 / py-faster-rcnn.
BACKGROUND_NAMES = ("_background_", "__background__")


class VOCFormatError(DataError):
    """A VOC file that cannot be read as the devkit writes it; the message names the file."""


def _check_names(names: Sequence[str], positions: Sequence[int], where: str, unit: str) -> tuple[str, ...]:
    first: dict[str, int] = {}
    for name, position in zip(names, positions):
        if name in first:
            raise DataError(f"{where}: class {name!r} at {unit} {position} is already at {unit} {first[name]}; "
                             "list each class once (its position is its label)")
        first[name] = position
    if not names:
        raise DataError(f"{where}: no class names (give at least one)")
    return tuple(names)


def resolve_classes(value: ClassesArg, key: str = "data.classes") -> tuple[str, ...]:
    """The class names a VOC-layout dataset is labelled with, in label order.

    ``value`` is ``None`` (the 20 VOC classes), a list/tuple of names, or the path of a text file with one
    name per line (blank lines ignored). Duplicates and empty names are errors naming ``key`` (the config
    key the value came from) and the file. A first name in ``BACKGROUND_NAMES`` is the background of
    labelme / detectron2 class lists: left out, with a warning saying so.
    """
    if value is None:
        return VOC_CLASSES
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise UserPathError(f"{key}={str(value)!r}: class file not found (give a file with one class name "
                                    "per line, or a list of names such as [cat, dog])")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"{key}: {path} is not UTF-8 text ({e})") from None
        numbered = [(line.strip(), n) for n, line in enumerate(lines, 1) if line.strip()]
        numbered = _drop_background(numbered, f"{key}: {path}", "line")
        return _check_names([name for name, _ in numbered], [n for _, n in numbered], f"{key}: {path}", "line")
    if isinstance(value, (list, tuple)):
        bad = [v for v in value if not isinstance(v, str) or not v.strip()]
        if bad:
            raise DataError(f"{key}: class names must be non-empty strings, got {bad[0]!r}")
        numbered = _drop_background([(v.strip(), i) for i, v in enumerate(value)], key, "index")
        return _check_names([name for name, _ in numbered], [i for _, i in numbered], key, "index")
    raise TypeError(f"{key}: expected null (the 20 VOC classes), a list of names or a file path, "
                    f"got {type(value).__name__} {value!r}")


def _drop_background(numbered: list[tuple[str, int]], where: str, unit: str) -> list[tuple[str, int]]:
    if numbered and numbered[0][0] in BACKGROUND_NAMES:
        name, position = numbered[0]
        log.warning("%s: %s %d, %r, is the background, not an object class: left out (%d classes)", where, unit,
                    position, name, len(numbered) - 1)
        return numbered[1:]
    return numbered


@dataclass
class VOCAnnotation:
    boxes: np.ndarray       # [N, 4] float32, XYXY continuous pixel coordinates, inside the image
    labels: np.ndarray      # [N] int64, index into the dataset's classes
    difficult: np.ndarray   # [N] bool
    width: int
    height: int
    clipped: int = 0        # boxes that reached outside the image and were clipped to it
    skipped: int = 0        # invalid objects left out (parse_annotation(skip_invalid=True))


def _text(node: ET.Element, path: str, where: Path) -> str:
    child = node.find(path)
    if child is None or child.text is None or not child.text.strip():
        raise VOCFormatError(f"{where}: missing <{path}> in <{node.tag}>")
    return child.text.strip()


def _pixels(size: ET.Element, tag: str, where: Path) -> int:
    text = _text(size, tag, where)
    try:
        value = float(text)  # some exporters write "640.0"
    except ValueError:
        value = float("nan")
    if not (value > 0 and value.is_integer()):
        raise VOCFormatError(f"{where}: <size><{tag}> is {text!r}, not a positive whole number of pixels "
                             "(the exporter could not read the image? re-export it with the image size)")
    return int(value)


def _difficult(obj: ET.Element, where: Path, k: int, name: str) -> bool:
    flag = obj.find("difficult")  # optional: absent in a few VOC2012 files and in labelImg/Roboflow exports
    text = "" if flag is None or flag.text is None else flag.text.strip().lower()
    if text in ("", "0", "false"):
        return False
    if text in ("1", "true"):
        return True
    raise VOCFormatError(f"{where}: object {k} ({name}) has <difficult>{flag.text}</difficult>, expected 0 or 1")



def read_voc_xml(path: Path) -> tuple[ET.Element, ET.Element]:
    """The root and ``<size>`` element of a VOC XML file; a missing, unparsable or size-less file is a
    ``VOCFormatError`` naming it."""
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise VOCFormatError(f"{path}: annotation file not found (the image set lists this id)") from None
    except ET.ParseError as e:
        raise VOCFormatError(f"{path}: not valid XML ({e})") from None
    size = root.find("size")
    if size is None:
        raise VOCFormatError(f"{path}: missing <size> (VOC XML gives <size><width>..</width><height>..</height>)")
    return root, size

def parse_annotation(path: Path | str, classes: Sequence[str] = VOC_CLASSES,
                     skip_invalid: bool = False) -> VOCAnnotation:
    """Read one ``Annotations/<id>.xml``; labels index ``classes``. Errors name the file and the object.

    Boxes reaching outside ``<size>`` are clipped to the image (``clipped`` counts them). An object whose
    class is not in ``classes``, whose corners are reversed, or whose box has no area left after clipping
    is an error, or with ``skip_invalid=True`` is left out (``skipped`` counts them). A file that is not
    VOC XML (missing ``<size>``/``<bndbox>``, a corner that is not a number) is always an error.
    """
    path = Path(path)
    root, size = read_voc_xml(path)
    width, height = _pixels(size, "width", path), _pixels(size, "height", path)
    index = {name: i for i, name in enumerate(classes)}
    boxes, labels, difficult = [], [], []
    clipped = skipped = 0

    def invalid(message: str) -> None:
        nonlocal skipped
        if not skip_invalid:
            raise VOCFormatError(f"{path}: {message} (skip_invalid=True leaves such objects out)")
        skipped += 1

    for k, obj in enumerate(root.findall("object")):
        name = _text(obj, "name", path)
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise VOCFormatError(f"{path}: object {k} ({name}) has no <bndbox>")
        try:
            x1, y1, x2, y2 = (float(_text(bndbox, t, path)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as e:
            raise VOCFormatError(f"{path}: object {k} ({name}): box corner is not a number ({e})") from None
        if name not in index:
            known = ("the 20 VOC classes" if tuple(classes) == VOC_CLASSES else
                     f"the {len(classes)} classes {', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}")
            invalid(f"object {k} has class {name!r}, not one of {known} (set data.classes to this dataset's "
                    "names)")
            continue
        if not (x2 >= x1 and y2 >= y1):
            invalid(f"object {k} ({name}) has xmax < xmin or ymax < ymin: ({x1:g}, {y1:g}, {x2:g}, {y2:g})")
            continue
        box = (x1 - 1, y1 - 1, x2, y2)  # 1-based inclusive corners -> continuous coordinates
        inside = (min(max(box[0], 0), width), min(max(box[1], 0), height),
                  min(max(box[2], 0), width), min(max(box[3], 0), height))
        if not (inside[2] > inside[0] and inside[3] > inside[1]):
            invalid(f"object {k} ({name}) box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) has no area inside the "
                    f"{width}x{height} image")
            continue
        clipped += inside != box
        boxes.append(inside)
        labels.append(index[name])
        difficult.append(_difficult(obj, path, k, name))
    return VOCAnnotation(np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64),
                         np.array(difficult, bool), width, height, clipped, skipped)


def _devkit(root: Path) -> Path:
    return root / "VOCdevkit" if (root / "VOCdevkit").is_dir() else root


def read_image_set(root: Path | str, year: str, image_set: str) -> list[str]:
    """The ids of ``VOC<year>/ImageSets/Main/<image_set>.txt``: one per line (a single id is fine), or
    ``<id> <-1|0|1>`` as the devkit's per-class sets write. Any other line (an id with a space in it) is an
    error naming the file and line."""
    path = _devkit(Path(root)) / f"VOC{year}" / "ImageSets" / "Main" / f"{image_set}.txt"
    if not path.is_file():
        raise UserPathError(f"{path} not found: data root {root} should be the VOCdevkit folder, holding "
                            f"VOC{year}/{{Annotations,ImageSets/Main,JPEGImages}}")
    ids = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if len(fields) == 2 and fields[1] in ("-1", "0", "1"):  # per-class set: "<id> <flag>"
            fields = fields[:1]
        if len(fields) > 1:
            raise VOCFormatError(f"{path}, line {number}: {line.strip()!r} is not one image id (ids cannot contain "
                                 f"spaces: rename the image and its XML, e.g. to {'_'.join(fields)!r})")
        ids.extend(fields)
    if not ids:
        raise VOCFormatError(f"{path}: lists no image ids")
    return ids


class VOCDetection(Dataset):
    """One VOC year and image set. Items are ``(image, target)``: a uint8 ``tv_tensors.Image`` [3, H, W]
    and ``{"boxes": BoundingBoxes XYXY, "labels": int64, "difficult": bool, "image_id": str}``.

    ``classes`` (see ``resolve_classes``) names the labels: the 20 VOC classes by default.
    ``keep_difficult=False`` drops difficult boxes (training with ``data.train_difficult=false``, as
    torchvision's reference does; detectron2's VOC loader and the engines' default keep them for training);
    evaluation keeps them (``detection.voc_eval`` ignores detections that match them).
    ``transforms(image, target)`` is applied last (torchvision.transforms.v2 moves the boxes along).
    ``JPEGImages/<id>`` may have any extension of ``runtime.images.IMAGE_EXTENSIONS``; ``check_images=True``
    finds every image and decodes it (worker processes, progress bar) before returning, so a missing,
    corrupt or wrongly sized image is an error at once (``image_path(i)``: the file of image ``i``).

    Every annotation is read when the set is built (as detectron2's ``load_voc_instances``), so a broken
    file fails at once rather than mid-training, and ``stats`` counts ``clipped`` boxes, ``skipped``
    invalid objects (``skip_invalid=True``) and ``dropped_images``. An image with no boxes left is kept,
    unless ``drop_empty``: torchvision's detection reference removes images without annotations from
    the training set only, so ``drop_empty=None`` drops them exactly when ``keep_difficult=False``; the
    engines pass ``drop_empty=True`` for training and build the test set with the defaults (evaluation
    must see every image, or its false positives go uncounted).
    """

    def __init__(self, root: Path | str, year: str, image_set: str, keep_difficult: bool = True,
                 transforms: Optional[Callable] = None, classes: ClassesArg = None, skip_invalid: bool = False,
                 drop_empty: Optional[bool] = None, check_images: bool = False):
        self.root = _devkit(Path(root)) / f"VOC{year}"
        self.year, self.image_set = year, image_set
        self.classes = resolve_classes(classes)
        self.keep_difficult = keep_difficult
        self.transforms = transforms
        ids = read_image_set(root, year, image_set)
        annotations = []
        clipped = skipped = 0
        for image_id in ids:
            ann = parse_annotation(self.root / "Annotations" / f"{image_id}.xml", self.classes, skip_invalid)
            clipped, skipped = clipped + ann.clipped, skipped + ann.skipped
            if not keep_difficult:
                keep = ~ann.difficult
                ann = VOCAnnotation(ann.boxes[keep], ann.labels[keep], ann.difficult[keep], ann.width, ann.height,
                                    ann.clipped, ann.skipped)
            annotations.append(ann)
        drop = (not keep_difficult) if drop_empty is None else drop_empty
        kept = [i for i, ann in enumerate(annotations) if not drop or len(ann.labels)]
        self.ids = [ids[i] for i in kept]
        self._annotations = [annotations[i] for i in kept]
        self.stats = {"clipped": clipped, "skipped": skipped, "dropped_images": len(ids) - len(kept)}
        if any(self.stats.values()):
            log.warning("VOC%s %s: %d boxes clipped to their image, %d invalid objects skipped, %d images without "
                        "boxes dropped", year, image_set, clipped, skipped, self.stats["dropped_images"])
        if not self.ids:
            raise VOCFormatError(f"{self.root}/ImageSets/Main/{image_set}.txt: no image has a box left "
                                 f"({len(ids)} images, all without objects)")
        self._images: Optional[list[Path]] = None
        if check_images:
            self.check_images()

    def image_paths(self) -> list[Path]:
        """The image file of every id (found in ``JPEGImages`` once, by any image extension)."""
        if self._images is None:
            found = index_images(self.root / "JPEGImages")
            missing = [i for i in self.ids if i not in found]
            if missing:
                raise VOCFormatError(f"{self.root / 'JPEGImages'}: no image for {len(missing)} id(s) of "
                                     f"ImageSets/Main/{self.image_set}.txt, e.g. {missing[0]!r} (looked for "
                                     f"{missing[0]}.jpg/.jpeg/.png/.bmp/.tif/.tiff)")
            self._images = [found[i] for i in self.ids]
        return self._images

    def image_path(self, index: int) -> Path:
        return self.image_paths()[index]

    def check_images(self, workers: Optional[int] = None) -> None:
        """Decode every image (in worker processes) and compare its size with its XML's ``<size>``."""
        items = [(str(path), ann.width, ann.height) for path, ann in zip(self.image_paths(), self._annotations)]
        check_files(_check_image, items, f"checking VOC{self.year} {self.image_set} images", workers)

    def __len__(self) -> int:
        return len(self.ids)

    def annotation(self, index: int) -> VOCAnnotation:
        return self._annotations[index]

    def image_id(self, index: int) -> str:
        return self.ids[index]

    def __getitem__(self, index: int):
        return detection_sample(self.image_path(index), self.annotation(index), self.ids[index], self.transforms,
                                VOCFormatError)


def detection_sample(path: Path, ann: VOCAnnotation, image_id: str, transforms: Optional[Callable],
                     error: type[Exception], record: Optional[str] = None):
    """``(image, target)`` of one detection image, the layout's loaders alike (VOC, COCO): the image as a uint8
    ``tv_tensors.Image`` [3, H, W] (PIL: torchvision.io's decoders are deprecated since torchvision 0.29), the
    target ``{"boxes" (XYXY BoundingBoxes), "labels", "difficult", "image_id"}``, then ``transforms``. An
    unreadable image, or one of another size than its annotation (``record`` names it) says, raises ``error``."""
    from torchvision import tv_tensors

    try:  # EXIF orientation applied, as detectron2's read_image
        image = torch.from_numpy(read_rgb(path)).permute(2, 0, 1).contiguous()
    except OSError as e:  # missing, truncated or not an image (UnidentifiedImageError is an OSError)
        raise error(f"{path}{f' ({record})' if record else ''}: cannot read the image ({e})") from None
    if tuple(image.shape[1:]) != (ann.height, ann.width):
        raise error(f"{path}: image is {image.shape[2]}x{image.shape[1]} but {record or 'its annotation'} says "
                    f"{ann.width}x{ann.height}")
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(ann.boxes), format="XYXY",
                                          canvas_size=(ann.height, ann.width)),
        "labels": torch.from_numpy(ann.labels),
        "difficult": torch.from_numpy(ann.difficult),
        "image_id": image_id,
    }
    image = tv_tensors.Image(image)
    if transforms is not None:
        image, target = transforms(image, target)
    return image, target


class VOCConcat(ConcatDataset):
    """Several VOC sets as one (``2007-trainval+2012-trainval``), with ``annotation(i)``, ``image_id(i)``,
    ``classes`` and ``stats`` like each part."""

    @property
    def classes(self) -> tuple[str, ...]:
        return self.datasets[0].classes

    @property
    def stats(self) -> dict[str, int]:
        return {k: sum(d.stats[k] for d in self.datasets) for k in self.datasets[0].stats}

    def _locate(self, index: int) -> tuple[VOCDetection, int]:
        part = bisect.bisect_right(self.cumulative_sizes, index)
        offset = self.cumulative_sizes[part - 1] if part else 0
        return self.datasets[part], index - offset

    def annotation(self, index: int) -> VOCAnnotation:
        dataset, local = self._locate(index)
        return dataset.annotation(local)

    def image_id(self, index: int) -> str:
        dataset, local = self._locate(index)
        return dataset.image_id(local)

    def image_path(self, index: int) -> Path:
        dataset, local = self._locate(index)
        return dataset.image_path(local)


def _check_image(item: tuple[str, int, int]) -> None:
    path, width, height = item
    size = image_size(path)
    if size != (width, height):
        raise VOCFormatError(f"{path}: image is {size[0]}x{size[1]} but its annotation says {width}x{height} "
                             "(fix <size> in the XML, or the image)")


def build_voc(root: Path | str, splits: str, keep_difficult: bool = True, transforms: Optional[Callable] = None,
              classes: ClassesArg = None, skip_invalid: bool = False,
              drop_empty: Optional[bool] = None, check_images: bool = False) -> VOCDetection | VOCConcat:
    """``splits`` as ``"2007-trainval+2012-trainval"`` (the paper's training set) or ``"2007-test"``.

    ``classes``, ``skip_invalid``, ``drop_empty`` and ``check_images`` as ``VOCDetection``; the classes are
    resolved once.
    """
    names = resolve_classes(classes)
    parts = []
    for split in splits.split("+"):
        year, sep, image_set = split.strip().partition("-")
        if not sep or year not in ("2007", "2012") or not image_set:
            raise DataError(f"VOC split {split!r}: expected YEAR-SET with YEAR 2007 or 2012, e.g. 2007-trainval")
        parts.append(VOCDetection(root, year, image_set, keep_difficult, transforms, classes=names,
                                  skip_invalid=skip_invalid, drop_empty=drop_empty, check_images=check_images))
    return parts[0] if len(parts) == 1 else VOCConcat(parts)
