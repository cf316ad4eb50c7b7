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


# ---------------------------------------------------------------------------------------------------------
# Datasets with their own classes, and XML as other tools write it

LABELIMG = """<annotation>
\t<folder>JPEGImages</folder>
\t<filename>{id}.jpg</filename>
\t<path>/home/someone/data/JPEGImages/{id}.jpg</path>
\t<source>
\t\t<database>Unknown</database>
\t</source>
\t<size>
\t\t<width>64</width>
\t\t<height>48</height>
\t\t<depth>1</depth>
\t</size>
\t<segmented>0</segmented>
{objects}</annotation>
"""
LABELIMG_OBJECT = """\t<object>
\t\t<name>{name}</name>
\t\t<pose>Unspecified</pose>
\t\t<truncated>1</truncated>
\t\t<difficult>{difficult}</difficult>
\t\t<bndbox>
\t\t\t<xmin>{x1}</xmin>
\t\t\t<ymin>{y1}</ymin>
\t\t\t<xmax>{x2}</xmax>
\t\t\t<ymax>{y2}</ymax>
\t\t</bndbox>
\t</object>
"""
# CVAT's "PASCAL VOC 1.1" export: float corners, empty depth, no pose, extra occluded/attributes.
CVAT = """<?xml version="1.0" encoding="utf-8"?>
<annotation>
  <folder></folder>
  <filename>{id}.jpg</filename>
  <source><database>Unknown</database><annotation>Unknown</annotation><image>Unknown</image></source>
  <size><width>64</width><height>48</height><depth></depth></size>
  <segmented>0</segmented>
{objects}</annotation>
"""
CVAT_OBJECT = """  <object>
    <name>{name}</name>
    <truncated>0</truncated>
    <occluded>0</occluded>
    <bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>
    <attributes><attribute><name>rotation</name><value>0.0</value></attribute></attributes>
  </object>
"""
# Roboflow: no <segmented>, no <depth> at all.
ROBOFLOW = """<annotation><folder></folder><filename>{id}.jpg</filename><path>{id}.jpg</path>
<source><database>roboflow.com</database></source><size><width>64</width><height>48</height></size>
{objects}</annotation>"""
ROBOFLOW_OBJECT = """<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>
<occluded>0</occluded><bndbox><xmin>{x1}</xmin><xmax>{x2}</xmax><ymin>{y1}</ymin><ymax>{y2}</ymax></bndbox></object>"""


def write_tool_xml(devkit: Path, image_id: str, template: str, obj: str, objects: list[tuple],
                   year: str = "2007") -> Path:
    """A 64x48 image and its XML in another tool's style; objects: (name, xmin, ymin, xmax, ymax[, difficult])."""
    write_image(devkit, year, image_id, [])
    body = "".join(obj.format(name=o[0], x1=o[1], y1=o[2], x2=o[3], y2=o[4], difficult=o[5] if len(o) > 5 else 0)
                   for o in objects)
    path = devkit / f"VOC{year}" / "Annotations" / f"{image_id}.xml"
    path.write_text(template.format(id=image_id, objects=body))
    return path


@pytest.fixture
def shapes(tmp_path) -> Path:
    """A VOC-layout dataset of two classes of our own, labelled with three different tools."""
    root = tmp_path / "VOCdevkit"
    write_tool_xml(root, "img_a", LABELIMG, LABELIMG_OBJECT, [("square", 1, 1, 20, 10, 0), ("disc", 30, 5, 60, 40, 1)])
    write_tool_xml(root, "img_b", CVAT, CVAT_OBJECT, [("disc", "12.5", "3.25", "40.75", "30")])
    write_tool_xml(root, "img_c", ROBOFLOW, ROBOFLOW_OBJECT, [("square", "2.0", "2.0", "10.0", "9.0")])
    write_set(root, "2007", "trainval", ["img_a", "img_b", "img_c"])
    (tmp_path / "classes.txt").write_text("square\n\ndisc\n")
    return root


def test_labelimg_cvat_roboflow_xml_with_own_classes(shapes):
    ds = build_voc(shapes, "2007-trainval", classes=["square", "disc"])
    assert ds.classes == ("square", "disc")
    a, b, c = (ds.annotation(i) for i in range(3))
    np.testing.assert_array_equal(a.boxes, [[0, 0, 20, 10], [29, 4, 60, 40]])
    assert a.labels.tolist() == [0, 1] and a.difficult.tolist() == [False, True]
    np.testing.assert_array_equal(b.boxes, [[11.5, 2.25, 40.75, 30]])  # float corners, no <difficult>
    assert b.labels.tolist() == [1] and b.difficult.tolist() == [False] and (b.width, b.height) == (64, 48)
    np.testing.assert_array_equal(c.boxes, [[1, 1, 10, 9]])
    assert ds.stats == {"clipped": 0, "skipped": 0, "dropped_images": 0}
    _, target = ds[1]
    assert target["labels"].tolist() == [1] and target["boxes"].canvas_size == (48, 64)
    # The same classes from a file (blank lines ignored), as data.classes may give them.
    from_file = build_voc(shapes, "2007-trainval", classes=shapes.parent / "classes.txt")
    assert from_file.classes == ("square", "disc") and from_file.annotation(1).labels.tolist() == [1]


def test_boxes_outside_the_image_are_clipped_and_counted(shapes, caplog):
    write_tool_xml(shapes, "img_d", CVAT, CVAT_OBJECT, [("disc", "-3.5", "0", "70", "20"), ("square", 0, 0, 5, 5),
                                                        ("square", 2, 2, 8, 8)])
    write_set(shapes, "2007", "edge", ["img_d", "img_c"])
    with caplog.at_level("WARNING", logger="detection.voc"):
        ds = VOCDetection(shapes, "2007", "edge", classes=["square", "disc"])
    np.testing.assert_array_equal(ds.annotation(0).boxes, [[0, 0, 64, 20], [0, 0, 5, 5], [1, 1, 8, 8]])
    assert ds.stats == {"clipped": 2, "skipped": 0, "dropped_images": 0}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "2 boxes clipped" in warnings[0]


def test_invalid_objects_are_errors_or_skipped_and_counted(shapes):
    # Entirely right of the 64 px wide image: no area left after clipping.
    write_tool_xml(shapes, "img_e", LABELIMG, LABELIMG_OBJECT, [("square", 1, 1, 5, 5), ("disc", 70, 5, 80, 9)])
    write_tool_xml(shapes, "img_f", LABELIMG, LABELIMG_OBJECT, [("triangle", 1, 1, 5, 5), ("disc", 3, 3, 9, 9)])
    write_set(shapes, "2007", "bad", ["img_e", "img_f"])
    with pytest.raises(VOCFormatError, match=r"img_e.xml: object 1 \(disc\) box \(70, 5, 80, 9\) has no area "
                                             r"inside the 64x48 image"):
        VOCDetection(shapes, "2007", "bad", classes=["square", "disc"])
    with pytest.raises(VOCFormatError, match="img_f.xml: object 0 has class 'triangle', not one of the 2 classes "
                                             "square, disc.*data.classes"):
        parse_annotation(shapes / "VOC2007" / "Annotations" / "img_f.xml", ("square", "disc"))
    ds = VOCDetection(shapes, "2007", "bad", classes=["square", "disc"], skip_invalid=True)
    assert ds.stats["skipped"] == 2
    assert ds.annotation(0).labels.tolist() == [0] and ds.annotation(1).labels.tolist() == [1]
    write_tool_xml(shapes, "img_i", LABELIMG, LABELIMG_OBJECT, [("disc", 1, 1, 5, 5, "maybe")])
    with pytest.raises(VOCFormatError, match=r"img_i.xml: object 0 \(disc\) has <difficult>maybe</difficult>"):
        parse_annotation(shapes / "VOC2007" / "Annotations" / "img_i.xml", ("square", "disc"))
    xml = shapes / "VOC2007" / "Annotations" / "img_i.xml"
    xml.write_text(xml.read_text().replace("<width>64</width>", "<width>0</width>"))
    with pytest.raises(VOCFormatError, match=r"img_i.xml: <size><width> is '0', not a positive whole number"):
        parse_annotation(xml, ("square", "disc"))
    with pytest.raises(VOCFormatError, match=r"img_a.xml: object 0 has class 'square', not one of the 20 VOC"):
        VOCDetection(shapes, "2007", "trainval")  # the default classes are VOC's


def test_images_without_boxes_kept_for_evaluation_dropped_for_training(shapes):
    # torchvision's detection reference removes images without annotations from the training set only.
    write_tool_xml(shapes, "img_g", ROBOFLOW, ROBOFLOW_OBJECT, [])                       # no objects at all
    write_tool_xml(shapes, "img_h", LABELIMG, LABELIMG_OBJECT, [("disc", 1, 1, 9, 9, 1)])  # only a difficult one
    write_set(shapes, "2007", "mixed", ["img_a", "img_g", "img_h"])
    names = ["square", "disc"]
    evaluation = VOCDetection(shapes, "2007", "mixed", classes=names)
    assert evaluation.ids == ["img_a", "img_g", "img_h"] and len(evaluation.annotation(1).labels) == 0
    training = VOCDetection(shapes, "2007", "mixed", keep_difficult=False, classes=names)
    assert training.ids == ["img_a"] and training.stats["dropped_images"] == 2
    assert training[0][1]["image_id"] == "img_a"
    kept = VOCDetection(shapes, "2007", "mixed", keep_difficult=False, classes=names, drop_empty=False)
    assert len(kept) == 3
    both = build_voc(shapes, "2007-mixed+2007-trainval", keep_difficult=False, classes=names)
    assert len(both) == 4 and both.stats["dropped_images"] == 2 and both.classes == tuple(names)


def test_resolve_classes_forms_and_errors(tmp_path):
    from detection.voc import resolve_classes

    assert resolve_classes(None) == VOC_CLASSES
    assert resolve_classes(["cat", " dog "]) == ("cat", "dog")
    path = tmp_path / "names.txt"
    path.write_text("cat\n\ndog\ncat\n")
    with pytest.raises(ValueError, match=r"data.classes: .*names.txt: class 'cat' at line 4 is already at line 1"):
        resolve_classes(path)
    with pytest.raises(ValueError, match=r"data.classes: class 'cat' at index 1 is already at index 0"):
        resolve_classes(("cat", "cat"))
    with pytest.raises(FileNotFoundError, match=r"data.classes='nowhere.txt': class file not found"):
        resolve_classes("nowhere.txt")
    path.write_text("\n\n")
    with pytest.raises(ValueError, match=r"data.classes: .*names.txt: no class names"):
        resolve_classes(str(path))
    with pytest.raises(ValueError, match="non-empty strings"):
        resolve_classes(["cat", ""])
    with pytest.raises(TypeError, match="data.classes: expected null"):
        resolve_classes(3)
