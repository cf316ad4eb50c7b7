"""Convert detection annotations between the VOC layout and COCO instances JSON (``tricks data voc2coco``,
``tricks data coco2voc``), so either format's tools work on the other's data.

Coordinates (exact): VOC gives 1-based inclusive pixel corners ``xmin..xmax`` (a box covering pixels 1 to
10 has xmin 1, xmax 10); COCO gives ``[x, y, w, h]`` with ``(x, y)`` the 0-based continuous top-left
corner and ``w``/``h`` the size in pixels. So

    VOC -> COCO:  x = xmin - 1,  y = ymin - 1,  w = xmax - xmin + 1,  h = ymax - ymin + 1
    COCO -> VOC:  xmin = x + 1,  ymin = y + 1,  xmax = x + w,        ymax = y + h

(detectron2 and the Detectron VOC JSONs use the same convention: both formats are the continuous box
``(xmin - 1, ymin - 1, xmax, ymax)`` that ``detection.voc`` and ``detection.coco`` load). Corners are taken
as the files give them (no clipping: the loaders validate), and written back as integers when whole, else
rounded to 6 decimals; integer and half-pixel corners (every devkit and labelling tool) are exact.

VOC ``difficult`` <-> COCO ``iscrowd: 1``: both are regions to be ignored in evaluation (VOC's devkit
ignores detections on difficult boxes, COCOeval those on crowd regions, though its crowd IoU divides by
the detection's area only) and both are left out of training by the loaders. So VOC -> COCO -> VOC gives
the same image sizes and, per object, the same name, corners and difficult flag (``pose``/``truncated``
are written as ``Unspecified``/0), and COCO -> VOC -> COCO the same boxes, categories and crowd flags
(category ids become 1..N in id order, image ids 1..N in the image set's order).

Images: ``voc2coco`` writes ``file_name`` relative to the VOCdevkit folder (``VOC2007/JPEGImages/<id>.jpg``),
so ``data.train_images`` is that folder; ``coco2voc`` copies JPEG files as they are into ``JPEGImages`` and
re-encodes other formats as JPEG (the VOC layout names ``<id>.jpg``; quality 95, counted in its summary).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional
from xml.sax.saxutils import escape

from .coco import COCOFormatError, categories_of, load_instances
from .voc import (VOCFormatError, _devkit, _difficult, _pixels, _text, read_image_set, read_voc_xml,
                  resolve_classes)

log = logging.getLogger(__name__)


def _number(value: float) -> int | float:
    """A whole value as an int (``12``, not ``12.0``), else rounded to 6 decimals (exact for half pixels)."""
    value = float(value)
    return int(value) if value.is_integer() else round(value, 6)


def read_voc_objects(path: Path) -> tuple[int, int, list[tuple[str, bool, tuple[float, float, float, float]]]]:
    """``(width, height, [(name, difficult, (xmin, ymin, xmax, ymax)), ...])`` of a VOC XML file, the corners
    as written (no clipping). Errors name the file and the object."""
    root, size = read_voc_xml(path)
    objects = []
    for k, obj in enumerate(root.findall("object")):
        name = _text(obj, "name", path)
        box = obj.find("bndbox")
        if box is None:
            raise VOCFormatError(f"{path}: object {k} ({name}) has no <bndbox>")
        try:
            corners = tuple(float(_text(box, t, path)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as e:
            raise VOCFormatError(f"{path}: object {k} ({name}): box corner is not a number ({e})") from None
        objects.append((name, _difficult(obj, path, k, name), corners))
    return _pixels(size, "width", path), _pixels(size, "height", path), objects


def voc_to_coco(devkit_root: Path | str, splits: str, classes: Any = None) -> dict:
    """The COCO instances document of VOC ``splits`` (``2007-trainval+2012-trainval``); categories are
    ``classes`` (default VOC's 20) with ids 1..N in that order. An object of another class is an error
    naming its file."""
    devkit = _devkit(Path(devkit_root))
    names = resolve_classes(classes)
    category_of = {name: i + 1 for i, name in enumerate(names)}
    images, annotations = [], []
    for split in splits.split("+"):
        year, sep, image_set = split.strip().partition("-")
        if not sep or not year or not image_set:
            raise ValueError(f"VOC split {split!r}: expected YEAR-SET, e.g. 2007-trainval")
        for voc_id in read_image_set(devkit, year, image_set):
            path = devkit / f"VOC{year}" / "Annotations" / f"{voc_id}.xml"
            width, height, objects = read_voc_objects(path)
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": f"VOC{year}/JPEGImages/{voc_id}.jpg", "width": width,
                           "height": height})
            for k, (name, difficult, (x1, y1, x2, y2)) in enumerate(objects):
                if name not in category_of:
                    raise VOCFormatError(f"{path}: object {k} has class {name!r}, not one of the {len(names)} classes "
                                         "(give --classes / --classes-file with this dataset's names)")
                w, h = x2 - x1 + 1, y2 - y1 + 1
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_of[name],
                                    "bbox": [_number(x1 - 1), _number(y1 - 1), _number(w), _number(h)],
                                    "area": _number(w * h), "iscrowd": int(difficult)})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": name, "supercategory": "none"} for name, i in category_of.items()]}


def _voc_ids(images: list[dict]) -> list[str]:
    """VOC ids for COCO images: the file names' stems when unique and without whitespace, else the ids."""
    stems = [Path(im["file_name"]).stem for im in images]
    if len(set(stems)) == len(stems) and all(s and s.split() == [s] for s in stems):
        return stems
    ids = [str(im["id"]) for im in images]
    if len(set(ids)) == len(ids) and all(i.split() == [i] for i in ids):
        return ids
    return [f"{k:06d}" for k in range(len(images))]


def coco_to_voc(annotation_file: Path | str, image_dir: Path | str, out_dir: Path | str, year: str = "2007",
                split: str = "train") -> dict[str, int]:
    """Write a COCO instances file as ``<out_dir>/VOCdevkit/VOC<year>/`` (``Annotations``, ``JPEGImages``,
    ``ImageSets/Main/<split>.txt``) and ``VOCdevkit/classes.txt`` (the category names in id order: give it
    as ``data.classes``). Returns counts (``images``, ``objects``, ``reencoded``)."""
    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    doc = load_instances(annotation_file)
    categories = categories_of(doc, annotation_file)
    name_of = {c["id"]: c["name"] for c in categories}
    devkit = Path(out_dir) / "VOCdevkit"
    base = devkit / f"VOC{year}"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    classes_file = devkit / "classes.txt"
    names_text = "".join(f"{c['name']}\n" for c in categories)
    if classes_file.is_file() and classes_file.read_text() != names_text:
        raise COCOFormatError(f"{classes_file} lists other classes than the categories of {annotation_file}: "
                              "convert sets with the same categories into one VOCdevkit, or use another --out")
    classes_file.write_text(names_text)
    images = doc["images"]
    voc_ids = _voc_ids(images)
    per_image: dict[Any, list[dict]] = {im.get("id"): [] for im in images}
    for k, ann in enumerate(doc["annotations"]):
        where = f"{annotation_file}: annotations[{k}]"
        if ann.get("image_id") not in per_image:
            raise COCOFormatError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        if ann.get("category_id") not in name_of:
            raise COCOFormatError(f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise COCOFormatError(f"{where}: 'bbox' is {bbox!r}, expected [x, y, width, height]")
        per_image[ann["image_id"]].append(ann)
    counts = {"images": 0, "objects": 0, "reencoded": 0}
    for k, (image, voc_id) in enumerate(zip(images, voc_ids)):
        for key in ("file_name", "width", "height"):
            if key not in image:
                raise COCOFormatError(f"{annotation_file}: images[{k}] has no {key!r}")
        source = image_dir / image["file_name"]
        target = base / "JPEGImages" / f"{voc_id}.jpg"
        _copy_as_jpeg(source, target, f"{annotation_file}: images[{k}] (id {image.get('id')!r})", counts)
        objects = []
        for ann in per_image[image.get("id")]:
            x, y, w, h = (float(v) for v in ann["bbox"])
            corners = (x + 1, y + 1, x + w, y + h)
            objects.append(
                "\t<object>\n"
                f"\t\t<name>{escape(name_of[ann['category_id']])}</name>\n"
                "\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
                f"\t\t<difficult>{int(bool(ann.get('iscrowd', 0)))}</difficult>\n\t\t<bndbox>\n"
                + "".join(f"\t\t\t<{t}>{_number(v)}</{t}>\n" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), corners))
                + "\t\t</bndbox>\n\t</object>\n")
        (base / "Annotations" / f"{voc_id}.xml").write_text(
            f"<annotation>\n\t<folder>VOC{year}</folder>\n\t<filename>{escape(voc_id)}.jpg</filename>\n"
            f"\t<size>\n\t\t<width>{int(image['width'])}</width>\n\t\t<height>{int(image['height'])}</height>\n"
            f"\t\t<depth>3</depth>\n\t</size>\n\t<segmented>0</segmented>\n{''.join(objects)}</annotation>\n")
        counts["images"] += 1
        counts["objects"] += len(objects)
    (base / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in voc_ids))
    return counts


def _copy_as_jpeg(source: Path, target: Path, record: str, counts: dict[str, int]) -> None:
    from PIL import Image

    try:
        with Image.open(source) as im:
            if im.format == "JPEG":
                shutil.copyfile(source, target)
                return
            im.convert("RGB").save(target, quality=95)
            counts["reencoded"] += 1
    except OSError as e:
        raise COCOFormatError(f"{source} ({record}): cannot read the image ({e})") from None


def write_json(doc: dict, out: Path | str) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc))
    return out


def run_voc2coco(devkit: str, splits: str, out: str, classes: Optional[Any] = None) -> str:
    doc = voc_to_coco(devkit, splits, classes)
    path = write_json(doc, out)
    return (f"wrote {len(doc['images'])} images, {len(doc['annotations'])} objects, {len(doc['categories'])} "
            f"categories to {path} (data.format=coco; its images folder, data.*_images, is {_devkit(Path(devkit))})")
