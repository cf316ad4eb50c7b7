"""tricks data voc2coco / coco2voc (detection/convert.py): exact coordinates, round trips, and a VOC set
converted to COCO giving the VOC set's own training and test targets."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from detection.coco import COCODetection
from detection.convert import read_voc_objects
from detection.voc import VOCDetection
from test_coco import write_coco
from test_voc import write_image, write_set
from tricks.cli import main

CLASSES = ("dog", "person", "chair")


@pytest.fixture
def devkit(tmp_path) -> Path:
    """Integer and labelImg-style half-pixel corners, difficult / missing difficult, boxes on the image's
    edges and one reaching outside it, an image without objects; two years."""
    root = tmp_path / "VOCdevkit"
    write_image(root, "2007", "000005", [("dog", 1, 1, 20, 10, 0), ("chair", 30, 5, 64, 48, 1)])
    write_image(root, "2007", "000007", [("person", 10.5, 10, 30, 45.5, None), ("dog", 50, 40, 70, 52, 0)])
    write_image(root, "2007", "000009", [])
    write_set(root, "2007", "trainval", ["000005", "000007", "000009"])
    write_image(root, "2012", "2008_000002", [("person", 5, 6, 50, 40, 0)], size=(80, 60))
    write_set(root, "2012", "trainval", ["2008_000002"])
    return root


def _voc2coco(devkit, splits, out) -> dict:
    assert main(["data", "voc2coco", "--devkit", str(devkit), "--splits", splits, "--out", str(out),
                 "--classes", ",".join(CLASSES)]) == 0
    return json.loads(Path(out).read_text())


def test_voc_to_coco_coordinates_by_hand(devkit, tmp_path):
    doc = _voc2coco(devkit, "2007-trainval+2012-trainval", tmp_path / "c.json")
    assert [c["id"] for c in doc["categories"]] == [1, 2, 3]
    assert doc["images"][0] == {"id": 1, "file_name": "VOC2007/JPEGImages/000005.jpg", "width": 64, "height": 48}
    assert doc["images"][3]["file_name"] == "VOC2012/JPEGImages/2008_000002.jpg"
    boxes = [(a["image_id"], a["category_id"], a["bbox"], a["iscrowd"]) for a in doc["annotations"]]
    # VOC pixels 1..20 x 1..10: x = 0, w = 20; difficult -> crowd; 10.5..30 -> x 9.5, w 20.5
    assert boxes[:3] == [(1, 1, [0, 0, 20, 10], 0), (1, 3, [29, 4, 35, 44], 1), (2, 2, [9.5, 9, 20.5, 36.5], 0)]


def test_round_trips_are_identical(devkit, tmp_path):
    _voc2coco(devkit, "2007-trainval", tmp_path / "c.json")
    assert main(["data", "coco2voc", "--gt", str(tmp_path / "c.json"), "--images", str(devkit), "--out",
                 str(tmp_path / "back"), "--split", "trainval"]) == 0
    back = tmp_path / "back" / "VOCdevkit" / "VOC2007"
    assert (back / "ImageSets" / "Main" / "trainval.txt").read_text().split() == ["000005", "000007", "000009"]
    for voc_id in ("000005", "000007", "000009"):
        original = read_voc_objects(devkit / "VOC2007" / "Annotations" / f"{voc_id}.xml")
        assert read_voc_objects(back / "Annotations" / f"{voc_id}.xml") == original
        assert (back / "JPEGImages" / f"{voc_id}.jpg").read_bytes() == \
            (devkit / "VOC2007" / "JPEGImages" / f"{voc_id}.jpg").read_bytes()  # JPEG copied as is
    assert (tmp_path / "back" / "VOCdevkit" / "classes.txt").read_text() == "dog\nperson\nchair\n"

    # COCO -> VOC -> COCO: PNG/JPEG images, crowd, non-contiguous ids (-> 1..N in id order).
    coco_root = tmp_path / "coco"
    original = json.loads(write_coco(coco_root).read_text())
    assert main(["data", "coco2voc", "--gt", str(coco_root / "instances.json"), "--images",
                 str(coco_root / "images"), "--out", str(tmp_path / "v2")]) == 0
    names = (tmp_path / "v2" / "VOCdevkit" / "classes.txt").read_text().split()
    assert main(["data", "voc2coco", "--devkit", str(tmp_path / "v2"), "--splits", "2007-train",
                 "--out", str(tmp_path / "again.json"), "--classes", ",".join(names)]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    new_id = {c["id"]: k + 1 for k, c in enumerate(sorted(original["categories"], key=lambda c: c["id"]))}
    image_rank = {im["id"]: k + 1 for k, im in enumerate(original["images"])}
    key = lambda a: (a["image_id"], a["category_id"], a["bbox"], a["iscrowd"])
    expected = sorted(key({**a, "image_id": image_rank[a["image_id"]], "category_id": new_id[a["category_id"]]})
                      for a in original["annotations"])
    assert sorted(key(a) for a in again["annotations"]) == expected
    assert [(im["width"], im["height"]) for im in again["images"]] == [(im["width"], im["height"])
                                                                      for im in original["images"]]


@pytest.mark.parametrize("training", [False, True], ids=["test-set", "training-set"])
def test_converted_set_gives_the_voc_sets_targets(devkit, tmp_path, training):
    _voc2coco(devkit, "2007-trainval", tmp_path / "c.json")
    voc = VOCDetection(devkit, "2007", "trainval", keep_difficult=not training, classes=CLASSES)
    coco = COCODetection(tmp_path / "c.json", devkit, keep_crowd=not training)
    assert len(voc) == len(coco) == (2 if training else 3) and coco.classes == CLASSES
    for i in range(len(voc)):
        (v_image, v), (c_image, c) = voc[i], coco[i]
        assert torch.equal(v_image, c_image)
        assert torch.equal(v["boxes"], c["boxes"]) and v["boxes"].canvas_size == c["boxes"].canvas_size
        assert torch.equal(v["labels"], c["labels"]) and torch.equal(v["difficult"], c["difficult"])
    assert voc.stats["clipped"] == coco.stats["clipped"] == 1  # the dog reaching past 64x48


def test_conversion_errors_name_file_and_record(devkit, tmp_path, capsys):
    assert main(["data", "voc2coco", "--devkit", str(devkit), "--splits", "2007-trainval", "--out",
                 str(tmp_path / "c.json"), "--classes", "dog,person"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("voc2coco: error: ") and "000005.xml: object 1 has class 'chair'" in err and "\n" not in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4}],
                               "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]}],
                               "categories": [{"id": 1, "name": "a"}]}))
    assert main(["data", "coco2voc", "--gt", str(bad), "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}: annotations[0]: image_id 2 is not in 'images'" in capsys.readouterr().err
