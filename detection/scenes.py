"""Fashion scenes written as a PASCAL VOC devkit (``VOCdevkit/VOC2007``) for smoke runs.

::

    <out>/VOCdevkit/VOC2007/Annotations/<id>.xml
    <out>/VOCdevkit/VOC2007/ImageSets/Main/{trainval,test}.txt
    <out>/VOCdevkit/VOC2007/JPEGImages/<id>.jpg
    <out>/VOCdevkit/classes.txt

XML as the devkit writes it (folder, filename, source, size with depth 3, segmented, objects with name,
pose, truncated, difficult and a bndbox of 1-based inclusive integer corners); object names are the 10
Fashion-MNIST classes of ``runtime.scenes.FASHION_CLASSES`` (listed in ``classes.txt``). ``trainval``
scenes use Fashion-MNIST's training items, ``test`` scenes its test items.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

from PIL import Image

from runtime.scenes import FASHION_CLASSES, Scene, compose_scenes, load_fashion_mnist


def _annotation_xml(scene: Scene, image_id: str) -> ET.ElementTree:
    def sub(parent: ET.Element, tag: str, text: str | int | None = None) -> ET.Element:
        node = ET.SubElement(parent, tag)
        if text is not None:
            node.text = str(text)
        return node

    root = ET.Element("annotation")
    sub(root, "folder", "VOC2007")
    sub(root, "filename", f"{image_id}.jpg")
    source = sub(root, "source")
    sub(source, "database", "Fashion scenes (Fashion-MNIST items)")
    size = sub(root, "size")
    height, width = scene.image.shape[:2]
    sub(size, "width", width), sub(size, "height", height), sub(size, "depth", 3)
    sub(root, "segmented", 0)
    for (x1, y1, x2, y2), label in zip(scene.boxes.tolist(), scene.labels.tolist()):
        obj = sub(root, "object")
        sub(obj, "name", FASHION_CLASSES[label])
        sub(obj, "pose", "Unspecified")
        sub(obj, "truncated", 0)
        sub(obj, "difficult", 0)
        box = sub(obj, "bndbox")
        # pixel extents [x1, x2) -> VOC's 1-based inclusive corners (detection.voc maps them back)
        sub(box, "xmin", x1 + 1), sub(box, "ymin", y1 + 1), sub(box, "xmax", x2), sub(box, "ymax", y2)
    tree = ET.ElementTree(root)
    ET.indent(tree, "\t")
    return tree


def write_fashion_voc(out_dir: Path | str, n_train: int = 2000, n_test: int = 500, *,
                      canvas: Sequence[int] = (128, 128), items: Sequence[int] = (2, 5),
                      scale: Sequence[float] = (1.0, 2.0), seed: int = 0,
                      fashion_root: Path | str | None = None) -> Path:
    """Write the scenes; returns the ``VOCdevkit`` folder (splits ``2007-trainval`` and ``2007-test``)."""
    devkit = Path(out_dir) / "VOCdevkit"
    year = devkit / "VOC2007"
    for d in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (year / d).mkdir(parents=True, exist_ok=True)
    kwargs = {} if fashion_root is None else {"root": fashion_root}
    next_id = 1
    for split, image_set, n, offset in (("train", "trainval", n_train, 0), ("test", "test", n_test, 1)):
        items_images, items_labels = load_fashion_mnist(split, **kwargs)
        scenes = compose_scenes(items_images, items_labels, n, canvas=canvas, items=items, scale=scale,
                                seed=seed * 2 + offset)
        ids = []
        for scene in scenes:
            image_id = f"{next_id:06d}"  # one numbering over both sets, as VOC2007
            next_id += 1
            Image.fromarray(scene.image).save(year / "JPEGImages" / f"{image_id}.jpg", quality=95)
            _annotation_xml(scene, image_id).write(year / "Annotations" / f"{image_id}.xml", encoding="utf-8")
            ids.append(image_id)
        (year / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(f"{i}\n" for i in ids))
    (devkit / "classes.txt").write_text("\n".join(FASHION_CLASSES) + "\n")
    return devkit
