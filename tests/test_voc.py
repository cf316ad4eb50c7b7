"""PASCAL VOC loader on a miniature VOCdevkit written in the devkit's exact layout and XML."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detection.voc import VOC_CLASSES, VOCDetection, VOCFormatError, build_voc, parse_annotation
from detection.voc_eval import VOCBoxes, evaluate_voc

XML = """<annotation>
\t<folder>VOC{year}</folder>
\t<filename>{id}.jpg</filename>
\t<source>
\t\t<database>The VOC{year} Database</database>
\t\t<annotation>PASCAL VOC{year}</annotation>
\t</source>
\t<size>
\t\t<width>{w}</width>
\t\t<height>{h}</height>
\t\t<depth>3</depth>
\t</size>
\t<segmented>0</segmented>
{objects}</annotation>
"""
OBJECT = """\t<object>
\t\t<name>{name}</name>
\t\t<pose>Unspecified</pose>
\t\t<truncated>0</truncated>
{difficult}\t\t<bndbox>
\t\t\t<xmin>{x1}</xmin>
\t\t\t<ymin>{y1}</ymin>
\t\t\t<xmax>{x2}</xmax>
\t\t\t<ymax>{y2}</ymax>
\t\t</bndbox>
\t</object>
"""


def write_image(devkit: Path, year: str, image_id: str, objects: list[tuple], size=(64, 48)) -> None:
    """objects: (name, xmin, ymin, xmax, ymax, difficult or None for a missing tag), VOC 1-based pixels."""
    base = devkit / f"VOC{year}"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    w, h = size
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
        base / "JPEGImages" / f"{image_id}.jpg")
    body = "".join(OBJECT.format(name=n, x1=a, y1=b, x2=c, y2=d,
                                 difficult="" if diff is None else f"\t\t<difficult>{diff}</difficult>\n")
                   for n, a, b, c, d, diff in objects)
    (base / "Annotations" / f"{image_id}.xml").write_text(XML.format(year=year, id=image_id, w=w, h=h, objects=body))


def write_set(devkit: Path, year: str, name: str, ids: list[str]) -> None:
    (devkit / f"VOC{year}" / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))


@pytest.fixture
def devkit(tmp_path) -> Path:
    root = tmp_path / "VOCdevkit"
    write_image(root, "2007", "000005", [("dog", 1, 1, 20, 10, 0), ("chair", 30, 5, 60, 40, 1)])
    write_image(root, "2007", "000007", [("person", 10, 10, 30, 45, 0)])
    write_set(root, "2007", "trainval", ["000005", "000007"])
    write_set(root, "2007", "test", ["000007"])  # a single id (detectron2's np.loadtxt trips on this)
    write_image(root, "2012", "2008_000002", [("tvmonitor", 5, 6, 50, 40, None)])
    write_set(root, "2012", "trainval", ["2008_000002"])
    return root


def test_annotation_coordinates_labels_difficult(devkit):
    ann = parse_annotation(devkit / "VOC2007" / "Annotations" / "000005.xml")
    np.testing.assert_array_equal(ann.boxes, [[0, 0, 20, 10], [29, 4, 60, 40]])  # xmin-1, ymin-1, xmax, ymax
    assert [VOC_CLASSES[i] for i in ann.labels] == ["dog", "chair"]
    assert ann.difficult.tolist() == [False, True] and (ann.width, ann.height) == (64, 48)
    assert parse_annotation(devkit / "VOC2012" / "Annotations" / "2008_000002.xml").difficult.tolist() == [False]


def test_dataset_items_and_07_plus_12(devkit):
    ds = VOCDetection(devkit.parent, "2007", "trainval")  # the VOCdevkit folder's parent works too
    image, target = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 48, 64)
    assert target["image_id"] == "000005" and target["labels"].tolist() == [VOC_CLASSES.index("dog"),
                                                                            VOC_CLASSES.index("chair")]
    assert target["boxes"].canvas_size == (48, 64)
    assert len(VOCDetection(devkit, "2007", "trainval", keep_difficult=False).annotation(0).labels) == 1
    both = build_voc(devkit, "2007-trainval+2012-trainval")
    assert len(both) == 3 and both[2][1]["image_id"] == "2008_000002"
    assert both.annotation(2).labels.tolist() == [VOC_CLASSES.index("tvmonitor")]
    assert both.annotation(1).labels.tolist() == [VOC_CLASSES.index("person")]
    assert len(build_voc(devkit, "2007-test")) == 1


def test_v2_transforms_move_the_boxes(devkit):
    from torchvision.transforms import v2

    ds = VOCDetection(devkit, "2007", "trainval", transforms=v2.RandomHorizontalFlip(p=1.0))
    _, target = ds[0]
    # Flip in continuous coordinates: x -> W - x; the dog [0, 20) of a 64 px image becomes [44, 64).
    assert target["boxes"][0].tolist() == [44, 0, 64, 10]


def test_ground_truth_as_detections_scores_map_one(devkit):
    ds = build_voc(devkit, "2007-trainval")
    truth, preds = [], []
    for i in range(len(ds)):
        ann = ds.annotation(i)
        truth.append(VOCBoxes(ann.boxes, ann.labels, difficult=ann.difficult))
        preds.append(VOCBoxes(ann.boxes, ann.labels, scores=np.ones(len(ann.labels))))
    res = evaluate_voc(preds, truth, num_classes=len(VOC_CLASSES))
    assert res["mAP"] == 1.0 and res["num_gt"].sum() == 2  # the difficult chair is not counted


def test_errors_name_the_file(devkit):
    with pytest.raises(FileNotFoundError, match="ImageSets/Main/val.txt"):
        VOCDetection(devkit, "2007", "val")
    with pytest.raises(ValueError, match="YEAR-SET"):
        build_voc(devkit, "2010-trainval")
    write_image(devkit, "2007", "000009", [("cat", 5, 5, 2, 9, 0)])
    with pytest.raises(VOCFormatError, match=r"000009.xml: object 0 \(cat\) has xmax < xmin"):
        parse_annotation(devkit / "VOC2007" / "Annotations" / "000009.xml")
    write_image(devkit, "2007", "000010", [("zebra", 1, 1, 5, 5, 0)])
    with pytest.raises(VOCFormatError, match="000010.xml: object 0 has class 'zebra'"):
        parse_annotation(devkit / "VOC2007" / "Annotations" / "000010.xml")
    (devkit / "VOC2007" / "Annotations" / "000011.xml").write_text("<annotation><size>")
    with pytest.raises(VOCFormatError, match="000011.xml: not valid XML"):
        parse_annotation(devkit / "VOC2007" / "Annotations" / "000011.xml")
    write_set(devkit, "2007", "broken", ["000005", "000404"])
    with pytest.raises(VOCFormatError, match="000404.xml: annotation file not found"):
        VOCDetection(devkit, "2007", "broken")[1]
    (devkit / "VOC2007" / "JPEGImages" / "000007.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(VOCFormatError, match="000007.jpg: cannot read the image"):
        VOCDetection(devkit, "2007", "test")[0]
