"""COCO-format detection data: an instances JSON and a folder of images (``data.format: coco``).

::

    {"images":      [{"id": 7, "file_name": "a/0007.png", "width": 640, "height": 480}, ...],
     "annotations": [{"id": 1, "image_id": 7, "category_id": 18, "bbox": [x, y, w, h], "iscrowd": 0,
                      "area": 1234.5}, ...],
     "categories":  [{"id": 18, "name": "dog"}, ...]}

This is what COCO itself, CVAT, Label Studio, Roboflow and FiftyOne export. ``bbox`` is ``[x, y, w, h]`` in
pixels with ``(x, y)`` the top-left corner in continuous 0-based coordinates (pixel ``i`` spans ``[i, i+1)``),
so the box is ``(x, y, x + w, y + h)`` in the XYXY continuous coordinates ``detection.voc`` uses: no shift.
Category ids need not be contiguous or start at 1; the classes are the categories' names in increasing id
order (as detectron2's ``load_coco_json``), or the subset ``classes=`` (``data.classes``) picks, in its order;
annotations of other categories are left out. ``file_name`` is relative to the images folder; any format
PIL reads (JPEG, PNG, BMP, TIFF, WebP, ...).

Items are ``(image, target)`` exactly as ``detection.voc.VOCDetection`` gives them (``boxes`` XYXY
``BoundingBoxes``, ``labels`` indexing ``classes``, ``difficult``, ``image_id``), where ``difficult`` marks
crowd regions (``iscrowd: 1``): ``keep_crowd=False`` (training) leaves them out, evaluation keeps them and
COCOeval treats them as crowd (``evaluation_ground_truth``). ``annotation(i)`` returns a
``detection.voc.VOCAnnotation``.

Validation happens when the set is built (before training): a file that is not JSON, a missing or mistyped
field, a duplicate id are errors naming the file and the record (``annotations[12] (id 40)``). An annotation
with an unknown image id or category id, or a box with no area inside its image, is an error too, or with
``skip_invalid=True`` is left out and counted (``stats``). Boxes reaching outside the image are clipped to
it for training and counted, as for VOC.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from torch.utils.data import Dataset

from runtime.config import ConfigError
from runtime.errors import DataError, UserPathError

from .voc import VOCAnnotation, detection_sample, resolve_classes

log = logging.getLogger(__name__)


class COCOFormatError(DataError):
    """A COCO instances file (or an image it names) that cannot be read; the message names file and record."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_id(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value != "")


def read_json(path: Path | str, what: str) -> Any:
    """The JSON document in ``path``; a missing file, invalid JSON or non-UTF-8 text is a
    ``COCOFormatError`` naming the file (``what`` says which file: "annotation file", "results file")."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise COCOFormatError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise COCOFormatError(f"{path}: a folder, where the {what} (a JSON file) was expected") from None
    except json.JSONDecodeError as e:
        raise COCOFormatError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise COCOFormatError(f"{path}: not UTF-8 text ({e})") from None


def load_instances(path: Path | str) -> dict:
    """The JSON document of an instances file, with ``images``, ``annotations`` and ``categories`` lists
    (``annotations`` may be absent: an unlabelled set). Errors name the file."""
    path = Path(path)
    doc = read_json(path, "annotation file")
    if not isinstance(doc, dict):
        raise COCOFormatError(f"{path}: expected a JSON object with images, annotations and categories, "
                              f"got a {type(doc).__name__} (a results file? score it with tricks coco-eval)")
    for key in ("images", "categories"):
        if not isinstance(doc.get(key), list):
            raise COCOFormatError(f"{path}: missing the {key!r} list (a COCO instances file has images, "
                                  "annotations and categories)")
    if not isinstance(doc.setdefault("annotations", []), list):
        raise COCOFormatError(f"{path}: 'annotations' is not a list")
    return doc


def categories_of(doc: dict, path: Path | str) -> list[dict]:
    """The categories sorted by id, checked: int ids, non-empty unique names, no duplicate id."""
    seen_ids: dict[int, int] = {}
    seen_names: dict[str, int] = {}
    for k, cat in enumerate(doc["categories"]):
        where = f"{path}: categories[{k}]"
        if not isinstance(cat, dict) or not _is_id(cat.get("id")) or isinstance(cat.get("id"), str):
            raise COCOFormatError(f"{where}: needs an integer 'id' ({cat!r})")
        name = cat.get("name")
        if not isinstance(name, str) or not name.strip():
            raise COCOFormatError(f"{where} (id {cat['id']}): needs a non-empty 'name'")
        if cat["id"] in seen_ids:
            raise COCOFormatError(f"{where}: id {cat['id']} is already categories[{seen_ids[cat['id']]}]")
        if name in seen_names:
            raise COCOFormatError(f"{where} (id {cat['id']}): name {name!r} is already categories[{seen_names[name]}]"
                                  " (give each category one name)")
        seen_ids[cat["id"]], seen_names[name] = k, k
    if not seen_ids:
        raise COCOFormatError(f"{path}: 'categories' is empty (list the classes with their ids)")
    return sorted(doc["categories"], key=lambda c: c["id"])


def select_classes(categories: Sequence[dict], classes: Any, path: Path | str,
                   key: str = "data.classes") -> tuple[tuple[str, ...], list[int]]:
    """The class names and their category ids: every category in id order (``classes`` None), or the names
    ``classes`` lists (a list or a file, as ``detection.voc.resolve_classes``), each of which must be a
    category of ``path``."""
    by_name = {c["name"]: c["id"] for c in categories}
    if classes is None:
        names = tuple(c["name"] for c in categories)
    else:
        names = resolve_classes(classes, key)
        missing = [n for n in names if n not in by_name]
        if missing:
            shown = ", ".join(list(by_name)[:10]) + (", ..." if len(by_name) > 10 else "")
            raise COCOFormatError(f"{key}: {missing[0]!r} is not a category of {path} (its categories: {shown})")
    return names, [by_name[n] for n in names]


class COCODetection(Dataset):
    """A COCO instances file and its images folder; see the module docstring.

    ``classes``: None (every category, in id order) or the names to use (``data.classes``).
    ``keep_crowd=False`` leaves crowd boxes out (training); ``drop_empty`` as ``VOCDetection`` (None: drop
    images without boxes exactly when ``keep_crowd=False``). ``transforms(image, target)`` is applied last.
    ``category_ids[label]`` is the category id of a label (for COCO results files).
    """

    def __init__(self, annotation_file: Path | str, image_dir: Path | str, keep_crowd: bool = True,
                 transforms: Optional[Callable] = None, classes: Any = None, skip_invalid: bool = False,
                 drop_empty: Optional[bool] = None):
        self.annotation_file, self.image_dir = Path(annotation_file), Path(image_dir)
        self.transforms, self.keep_crowd = transforms, keep_crowd
        path = self.annotation_file
        doc = load_instances(path)
        categories = categories_of(doc, path)
        self.classes, self.category_ids = select_classes(categories, classes, path)
        self.categories = [c for c in categories if c["id"] in set(self.category_ids)]
        label_of = {cat_id: label for label, cat_id in enumerate(self.category_ids)}
        known_categories = {c["id"] for c in categories}

        images: list[dict] = []
        index_of: dict[Any, int] = {}
        for k, image in enumerate(doc["images"]):
            where = f"{path}: images[{k}]"
            if not isinstance(image, dict) or not _is_id(image.get("id")):
                raise COCOFormatError(f"{where}: needs an 'id' (integer or string)")
            where += f" (id {image['id']})"
            if image["id"] in index_of:
                raise COCOFormatError(f"{where}: id already used by images[{index_of[image['id']]}]")
            if not isinstance(image.get("file_name"), str) or not image["file_name"]:
                raise COCOFormatError(f"{where}: needs a 'file_name' (relative to the images folder)")
            for dim in ("width", "height"):
                value = image.get(dim)
                if not (_is_number(value) and value > 0 and float(value).is_integer()):
                    raise COCOFormatError(f"{where}: '{dim}' is {value!r}, not a positive whole number of pixels "
                                          "(re-export with the image sizes)")
            index_of[image["id"]] = k
            images.append(image)

        per_image: list[list[tuple[np.ndarray, int, bool]]] = [[] for _ in images]
        kept_records: list[dict] = []
        clipped = skipped = 0
        used_ids: dict[Any, int] = {}

        def invalid(where: str, message: str) -> None:
            nonlocal skipped
            if not skip_invalid:
                raise COCOFormatError(f"{where}: {message} (data.skip_invalid=true leaves such annotations out)")
            skipped += 1

        for k, ann in enumerate(doc["annotations"]):
            where = f"{path}: annotations[{k}]"
            if not isinstance(ann, dict):
                raise COCOFormatError(f"{where}: expected an object, got {ann!r}")
            if "id" in ann:
                if not _is_id(ann["id"]):
                    raise COCOFormatError(f"{where}: 'id' is {ann['id']!r}, not an integer")
                if ann["id"] in used_ids:
                    raise COCOFormatError(f"{where} (id {ann['id']}): id already used by annotations[{used_ids[ann['id']]}]")
                used_ids[ann["id"]] = k
                where += f" (id {ann['id']})"
            bbox = ann.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
                raise COCOFormatError(f"{where}: 'bbox' is {bbox!r}, expected [x, y, width, height] (4 numbers)")
            crowd = ann.get("iscrowd", 0)
            if crowd not in (0, 1) or isinstance(crowd, float):
                raise COCOFormatError(f"{where}: 'iscrowd' is {crowd!r}, expected 0 or 1")
            if ann.get("image_id") not in index_of:
                invalid(where, f"image_id {ann.get('image_id')!r} is not in 'images'")
                continue
            if ann.get("category_id") not in known_categories:
                invalid(where, f"category_id {ann.get('category_id')!r} is not in 'categories'")
                continue
            if ann["category_id"] not in label_of:  # a category data.classes leaves out
                continue
            image = images[index_of[ann["image_id"]]]
            x, y, w, h = (float(v) for v in bbox)
            box = (x, y, x + w, y + h)
            width, height = image["width"], image["height"]
            inside = (min(max(box[0], 0), width), min(max(box[1], 0), height),
                      min(max(box[2], 0), width), min(max(box[3], 0), height))
            if not (w > 0 and h > 0 and inside[2] > inside[0] and inside[3] > inside[1]):
                invalid(where, f"bbox {bbox} has no area inside the {width:g}x{height:g} image "
                               f"{image['file_name']!r}")
                continue
            clipped += inside != box
            per_image[index_of[ann["image_id"]]].append((np.array(inside, np.float32), label_of[ann["category_id"]],
                                                          bool(crowd)))
            kept_records.append(ann)

        annotations = []
        for image, objects in zip(images, per_image):
            if not keep_crowd:
                objects = [o for o in objects if not o[2]]
            annotations.append(VOCAnnotation(np.array([o[0] for o in objects], np.float32).reshape(-1, 4),
                                              np.array([o[1] for o in objects], np.int64),
                                              np.array([o[2] for o in objects], bool),
                                              int(image["width"]), int(image["height"])))
        drop = (not keep_crowd) if drop_empty is None else drop_empty
        kept = [i for i, ann in enumerate(annotations) if not drop or len(ann.labels)]
        self.images = [images[i] for i in kept]
        self.ids = [image["id"] for image in self.images]
        self._annotations = [annotations[i] for i in kept]
        self._records = kept_records
        self.stats = {"clipped": clipped, "skipped": skipped, "dropped_images": len(images) - len(kept)}
        if any(self.stats.values()):
            log.warning("%s: %d boxes clipped to their image, %d invalid annotations skipped, %d images without "
                        "boxes dropped", path, clipped, skipped, self.stats["dropped_images"])
        if not self.ids:
            raise COCOFormatError(f"{path}: no image {'has a box left' if images else 'listed'} "
                                  f"({len(images)} images)")

    def __len__(self) -> int:
        return len(self.ids)

    def annotation(self, index: int) -> VOCAnnotation:
        return self._annotations[index]

    def image_id(self, index: int):
        return self.ids[index]

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.images[index]["file_name"]

    def evaluation_ground_truth(self) -> dict:
        """The instances document COCOeval scores against: this set's images, the annotations kept (their
        own records: the JSON's ``bbox``, ``area`` and ``iscrowd``, not the clipped training boxes) of the
        chosen categories. ``area`` (COCO: the mask's area, used for APs/APm/APl) defaults to ``w * h``,
        ``iscrowd`` to 0 and a missing ``id`` to a fresh one, as pycocotools needs them."""
        taken = {r["id"] for r in self._records if "id" in r}
        fresh = (i for i in range(1, len(self._records) + len(taken) + 2) if i not in taken)
        annotations = []
        for record in self._records:
            record = dict(record)
            record.setdefault("iscrowd", 0)
            record.setdefault("area", float(record["bbox"][2] * record["bbox"][3]))
            if "id" not in record:
                record["id"] = next(fresh)
            annotations.append(record)
        return {"images": [dict(image) for image in self.images], "annotations": annotations,
                "categories": [dict(c) for c in self.categories]}

    def __getitem__(self, index: int):
        record = f"{self.annotation_file}: images[{self.images[index].get('id')!r}]"
        return detection_sample(self.image_path(index), self.annotation(index), self.ids[index], self.transforms,
                                COCOFormatError, record)


def _coco_paths(data, train: bool) -> tuple[str, str]:
    keys = ("train_json", "train_images") if train else ("test_json", "test_images")
    values = tuple(getattr(data, k) for k in keys)
    for key, value in zip(keys, values):
        if not value:
            raise ConfigError(f"data.format=coco needs data.{key} (the instances JSON and its images folder of the "
                             f"{'training' if train else 'test'} set)")
    if not Path(values[1]).is_dir():
        raise UserPathError(f"data.{keys[1]}={values[1]!r}: images folder not found")
    return values


def check_format_keys(data) -> None:
    """The COCO keys (``data.train_json`` ...) with ``data.format=voc`` were ignored: the run trained on the VOC
    folder of ``data.root``. An error naming the keys now."""
    if getattr(data, "format", "voc") == "coco":
        return
    given = [f"data.{k}" for k in ("train_json", "train_images", "test_json", "test_images") if getattr(data, k, None)]
    if given:
        raise ConfigError(f"{', '.join(given)} given with data.format={data.format}: they are read with "
                          "data.format=coco only; set data.format=coco (or remove them to use the VOC folders of "
                          "data.root)")


def build_detection_set(data, train: bool, transforms: Optional[Callable] = None, classes: Any = None,
                        check_images: bool = False):
    """The training (``train=True``: crowd boxes, difficult ones if ``data.train_difficult=false``, and empty
    images left out) or test set the
    ``data`` config names: ``data.format`` ``voc`` (``root``, ``train_splits``/``test_splits``) or ``coco``
    (``train_json``/``train_images`` or ``test_json``/``test_images``). ``classes`` overrides
    ``data.classes`` (the test set of a COCO run takes the training set's names). ``check_images=True``
    decodes every image of a VOC-layout set now, in worker processes (``detection.voc``)."""
    classes = data.classes if classes is None else classes
    check_format_keys(data)
    if getattr(data, "format", "voc") == "coco":
        annotation_file, image_dir = _coco_paths(data, train)
        return COCODetection(annotation_file, image_dir, keep_crowd=not train, transforms=transforms,
                             classes=classes, skip_invalid=data.skip_invalid)
    from .voc import build_voc

    # Difficult boxes train too unless data.train_difficult=false (detectron2's VOC loader keeps them); images
    # without boxes are left out of training only.
    if train:
        return build_voc(data.root, data.train_splits, keep_difficult=data.train_difficult, transforms=transforms,
                         classes=classes, skip_invalid=data.skip_invalid, drop_empty=True, check_images=check_images)
    return build_voc(data.root, data.test_splits, keep_difficult=True, transforms=transforms, classes=classes,
                     skip_invalid=data.skip_invalid, check_images=check_images)


def dataset_classes(data) -> tuple[str, ...]:
    """The class names of a run (``data.format`` voc: ``data.classes`` or VOC's 20; coco: the training
    JSON's categories, or the subset ``data.classes`` picks; the test JSON's when no training JSON is given,
    as ``tricks eval`` may be) without building the datasets."""
    check_format_keys(data)
    if getattr(data, "format", "voc") != "coco":
        return resolve_classes(data.classes)
    annotation_file, _ = _coco_paths(data, train=bool(data.train_json or data.train_images))
    return select_classes(categories_of(load_instances(annotation_file), annotation_file), data.classes,
                          annotation_file)[0]




def check_checkpoint_classes(checkpoint: Any, path: str | Path, classes: Sequence[str]) -> None:
    """A detector's outputs are indices into the class list it was trained with: evaluated under another order
    (``data.classes: [cat, dog]`` for a ``[dog, cat]`` run) every box is scored as the wrong class, silently.
    The run's saved config (a ``last.pth``'s, or the ``config.yaml`` beside the file) names its classes; a list
    that differs from ``classes`` is a ``CheckpointError``. Files without a config, or a COCO run whose classes
    came from its JSON, are not checked."""
    from runtime.errors import CheckpointError
    from runtime.strict import saved_config

    saved = saved_config(checkpoint, Path(path))
    data = (saved or {}).get("data") if isinstance(saved, dict) else None
    if not isinstance(data, dict) or "classes" not in data:
        return
    if data.get("format", "voc") == "coco" and data["classes"] is None:
        return
    try:
        theirs = tuple(resolve_classes(data["classes"]))
    except Exception:  # a classes file that has moved: nothing to compare with
        return
    if theirs != tuple(classes):
        how = "in another order" if sorted(theirs) == sorted(classes) else "differently"
        raise CheckpointError(f"{path} was trained with the classes {list(theirs)} but this run names them {how}: "
                              f"{list(classes)}; the detector's outputs are indices into its own list, so set "
                              "data.classes to the list it was trained with")
