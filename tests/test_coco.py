"""COCO-format data (detection.coco) and COCO metrics (detection.coco_eval, tricks coco-eval) against
pycocotools called directly."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detection.coco import COCODetection, COCOFormatError
from detection.coco_eval import STAT_NAMES, evaluate_dataset, score_coco_files
from detection.cli import main as detection_cli

CATEGORIES = [{"id": 11, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "bird"}]  # not sorted, gaps


def write_coco(root: Path, n: int = 6, size=(64, 48), seed: int = 0, name: str = "instances.json") -> Path:
    """``n`` images (PNG and JPEG alternately, one in a subfolder) with one bright square each (a category
    by turn), a crowd box on image 1, no box on the last image; returns the JSON's path."""
    rng = np.random.default_rng(seed)
    (root / "images" / "sub").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    width, height = size
    for i in range(n):
        file_name = f"sub/{i:04d}.jpg" if i % 2 else f"{i:04d}.png"
        pixels = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
        image_id = 100 + 3 * i  # ids neither contiguous nor from 0
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        if i < n - 1:
            x, y = float(rng.integers(0, 30)), float(rng.integers(0, 20))
            w, h = 20.0 + i, 16.0 + 0.5 * i
            pixels[int(y):int(y + h), int(x):int(x + w)] = 230
            cat = CATEGORIES[i % 3]["id"]
            annotations.append({"id": 500 + i, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": 0})
        if i == 1:
            annotations.append({"id": 900, "image_id": image_id, "category_id": 3, "bbox": [40.0, 30.0, 20.0, 15.0],
                                "area": 300.0, "iscrowd": 1})
        Image.fromarray(pixels).save(root / "images" / file_name, quality=95)
    path = root / name
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path


def test_targets_classes_and_crowd(tmp_path):
    path = write_coco(tmp_path)
    doc = json.loads(path.read_text())
    test = COCODetection(path, tmp_path / "images")
    assert test.classes == ("cat", "bird", "dog") and list(test.category_ids) == [3, 7, 11]  # by id
    assert test.ids == [100 + 3 * i for i in range(6)]  # every image, the empty one too
    image, target = test[1]
    assert image.shape == (3, 48, 64) and target["image_id"] == 103
    ann = doc["annotations"][1]  # image 103: a cat (id 3 -> label 0), then the crowd cat
    x, y, w, h = ann["bbox"]
    assert target["boxes"].tolist() == [[x, y, x + w, y + h], [40.0, 30.0, 60.0, 45.0]]
    assert target["labels"].tolist() == [{3: 0, 7: 1, 11: 2}[ann["category_id"]], 0]
    assert target["difficult"].tolist() == [False, True]
    train = COCODetection(path, tmp_path / "images", keep_crowd=False)  # training: no crowd, no empty image
    assert train.ids == [100 + 3 * i for i in range(5)] and train[1][1]["labels"].tolist() == [0]
    picked = COCODetection(path, tmp_path / "images", classes=["dog", "cat"])
    assert picked.classes == ("dog", "cat") and list(picked.category_ids) == [11, 3]
    assert picked[0][1]["labels"].tolist() == [0]  # image 100: a dog (category 11) -> label 0 of [dog, cat]
    assert picked[2][1]["labels"].tolist() == []   # image 106: a bird, not picked
    gt = picked.evaluation_ground_truth()
    assert {a["category_id"] for a in gt["annotations"]} == {3, 11} and len(gt["images"]) == 6


def _break(path: Path, edit) -> Path:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["annotations"][3].update(image_id=77), r"annotations\[3\] \(id 502\): image_id 77 is not in 'images'"),
    (lambda d: d["annotations"][3].update(category_id=5), r"annotations\[3\] \(id 502\): category_id 5 is not in"),
    (lambda d: d["annotations"][3].update(bbox=[1, 2, 0, 5]), r"annotations\[3\] \(id 502\): bbox \[1, 2, 0, 5\] has no area"),
    (lambda d: d["annotations"][3].update(bbox=[70, 2, 5, 5]), r"annotations\[3\] \(id 502\): bbox .* no area inside the 64x48"),
], ids=["unknown-image", "unknown-category", "zero-area", "outside"])
def test_invalid_annotations_name_file_and_record_or_are_skipped(tmp_path, edit, message):
    path = _break(write_coco(tmp_path), edit)
    with pytest.raises(COCOFormatError, match=f"^{str(path)}: {message}.*skip_invalid=true") as e:
        COCODetection(path, tmp_path / "images")
    assert "\n" not in str(e.value)
    skipped = COCODetection(path, tmp_path / "images", skip_invalid=True)
    assert skipped.stats["skipped"] == 1 and sum(len(skipped.annotation(i).labels) for i in range(6)) == 5


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["annotations"][0].pop("bbox"), r"annotations\[0\] \(id 500\): 'bbox' is None"),
    (lambda d: d["annotations"][1].update(id=500), r"annotations\[1\] \(id 500\): id already used by annotations\[0\]"),
    (lambda d: d["images"][3].update(width=0), r"images\[3\] \(id 109\): 'width' is 0"),
    (lambda d: d["categories"].append({"id": 3, "name": "x"}), r"categories\[3\]: id 3 is already categories\[1\]"),
    (lambda d: d.pop("images"), r"missing the 'images' list"),
], ids=["no-bbox", "duplicate-id", "width", "duplicate-category", "no-images"])
def test_malformed_files_are_errors_even_with_skip_invalid(tmp_path, edit, message):
    path = _break(write_coco(tmp_path), edit)
    with pytest.raises(COCOFormatError, match=f"^{str(path)}: {message}"):
        COCODetection(path, tmp_path / "images", skip_invalid=True)
    path.write_text('{"images": [}')
    with pytest.raises(COCOFormatError, match=f"^{str(path)}: not valid JSON"):
        COCODetection(path, tmp_path / "images")


def test_image_errors_name_the_file_and_the_record(tmp_path):
    path = write_coco(tmp_path)
    dataset = COCODetection(path, tmp_path / "images")
    (tmp_path / "images" / "0002.png").unlink()
    with pytest.raises(COCOFormatError, match=r"0002.png \(.*images\[106\]\): cannot read the image"):
        dataset[2]
    Image.new("RGB", (10, 10)).save(tmp_path / "images" / "0002.png")
    with pytest.raises(COCOFormatError, match=r"0002.png: image is 10x10 but .*images\[106\] says 64x48"):
        dataset[2]


# ---------------------------------------------------------------------------------------------------------
# COCOeval: ours is pycocotools' own, on the same files


def _random_results(gt_doc: dict, rng, n: int = 400) -> list[dict]:
    """Jittered copies of the ground truth (some on crowd boxes, some of the wrong category) and clutter."""
    anns, cats = gt_doc["annotations"], [c["id"] for c in gt_doc["categories"]]
    images = [im["id"] for im in gt_doc["images"]]
    results = []
    for _ in range(n):
        if rng.random() < 0.7:
            a = anns[rng.integers(len(anns))]
            x, y, w, h = (np.array(a["bbox"]) + rng.normal(0, 3, 4)).tolist()
            cat = a["category_id"] if rng.random() < 0.85 else int(rng.choice(cats))
            image = a["image_id"]
        else:
            x, y = rng.uniform(0, 300, 2).tolist()
            w, h = rng.uniform(2, 120, 2).tolist()
            cat, image = int(rng.choice(cats)), int(rng.choice(images))
        results.append({"image_id": image, "category_id": cat, "bbox": [x, y, max(w, 1), max(h, 1)],
                        "score": round(float(rng.random()), 2)})  # 2 decimals: many ties
    return results


def _random_gt(rng, images: int = 40) -> dict:
    """Boxes of every COCO size range (small < 32², medium, large > 96²), crowd regions, empty images."""
    anns = []
    for i in range(images):
        for _ in range(int(rng.integers(0, 6))):
            side = float(rng.choice([12, 50, 150]) * rng.uniform(0.7, 1.3))
            x, y = rng.uniform(0, 400, 2).tolist()
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(rng.choice([3, 7, 11])),
                         "bbox": [x, y, side, side * float(rng.uniform(0.5, 1.5))], "iscrowd": int(rng.random() < 0.08)})
            anns[-1]["area"] = anns[-1]["bbox"][2] * anns[-1]["bbox"][3] * 0.8  # a mask's area, not the box's
    return {"images": [{"id": i + 1, "file_name": f"{i}.jpg", "width": 640, "height": 640} for i in range(images)],
            "annotations": anns, "categories": CATEGORIES}


def _pycocotools_directly(gt_path, results_path) -> tuple[np.ndarray, dict]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(gt_path))
    evaluator = COCOeval(gt, gt.loadRes(str(results_path)), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    per_class = {}
    for k, cat in enumerate(evaluator.params.catIds):
        p = evaluator.eval["precision"][:, :, k, 0, -1]
        per_class[gt.cats[cat]["name"]] = float(p[p > -1].mean())
    return evaluator.stats, per_class


@pytest.mark.parametrize("seed", [0, 1])
def test_coco_eval_equals_pycocotools_on_the_same_files(tmp_path, capsys, seed):
    rng = np.random.default_rng(seed)
    gt_doc = _random_gt(rng)
    gt_path, results_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(json.dumps(gt_doc))
    results_path.write_text(json.dumps(_random_results(gt_doc, rng)))
    stats, per_class = _pycocotools_directly(gt_path, results_path)
    capsys.readouterr()
    assert detection_cli(["coco-eval", "--gt", str(gt_path), "--results", str(results_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)  # stdout is the JSON alone (pycocotools' prints kept out)
    assert list(doc) == [*STAT_NAMES, "ap_per_class"]
    assert [doc[name] for name in STAT_NAMES] == stats[:9].tolist()
    assert doc["ap_per_class"] == per_class
    assert 0.05 < doc["AP"] < doc["AP50"] < 1 and stats[3] > 0  # small, medium and large boxes all present
    assert detection_cli(["coco-eval", "--gt", str(gt_path), "--results", str(results_path)]) == 0
    assert f"AP {100 * stats[0]:.2f}  AP50 {100 * stats[1]:.2f}" in capsys.readouterr().out


def test_dataset_evaluation_equals_pycocotools_on_the_json(tmp_path):
    """What the engines report (COCOeval on the dataset's ground truth, detections as labels + XYXY boxes)
    equals pycocotools on the original JSON and the results file they write."""
    # COCO's area is the mask's, not the box's: small, medium and large by area, whatever the box.
    path = _break(write_coco(tmp_path, n=12), lambda d: [a.update(area=[100.0, 2000.0, 20000.0][k % 3])
                                                          for k, a in enumerate(d["annotations"])])
    dataset = COCODetection(path, tmp_path / "images")
    rng = np.random.default_rng(3)
    detections = {}
    for i in range(len(dataset)):
        ann = dataset.annotation(i)
        boxes = np.r_[ann.boxes + rng.normal(0, 2, ann.boxes.shape), [[5.0, 5.0, 30.0, 30.0]]]
        detections[dataset.image_id(i)] = {"boxes": torch.tensor(boxes), "labels": torch.tensor([*ann.labels, 1]),
                                           "scores": torch.tensor(rng.random(len(boxes)))}
    result = evaluate_dataset(dataset, detections)
    (tmp_path / "dt.json").write_text(json.dumps(result["results"]))
    stats, per_class = _pycocotools_directly(path, tmp_path / "dt.json")
    assert [result[name] for name in STAT_NAMES] == pytest.approx(
        [float("nan") if s < 0 else s for s in stats[:9]], nan_ok=True, abs=1e-12)
    assert result["ap_per_class"] == pytest.approx(per_class, abs=1e-12)
    assert 0 < result["AP"] < 1 and all(result[k] >= 0 for k in ("APs", "APm", "APl"))
    # A category id is the category's (labels 0, 1, 2 -> 3, 7, 11); a box [x1, y1, x2 - x1, y2 - y1].
    first = result["results"][0]
    box = detections[dataset.image_id(0)]["boxes"][0].tolist()
    assert first["category_id"] == 11 and first["bbox"] == [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def test_coco_eval_errors_name_file_and_record(tmp_path, capsys):
    gt_path = write_coco(tmp_path)
    bad = tmp_path / "dt.json"
    bad.write_text(json.dumps([{"image_id": 100, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 0.5},
                               {"image_id": 999, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 0.5}]))
    assert detection_cli(["coco-eval", "--gt", str(gt_path), "--results", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"coco-eval: error: {bad}: [1]: image_id 999 is not an image of the ground truth"
    bad.write_text(json.dumps({"annotations": []}))
    assert detection_cli(["coco-eval", "--gt", str(gt_path), "--results", str(bad)]) == 2
    assert "expected a JSON list of detections" in capsys.readouterr().err
    bad.write_text("[{")
    assert detection_cli(["coco-eval", "--gt", str(gt_path), "--results", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"coco-eval: error: {bad}: not valid JSON")
    missing = tmp_path / "nowhere.json"
    assert detection_cli(["coco-eval", "--gt", str(gt_path), "--results", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"coco-eval: error: {missing}: results file not found"


def test_no_detections_scores_zero(tmp_path):
    gt_path = write_coco(tmp_path)
    (tmp_path / "dt.json").write_text("[]")
    result = score_coco_files(gt_path, tmp_path / "dt.json")
    assert result["AP"] == 0.0 and result["ap_per_class"] == {"cat": 0.0, "bird": 0.0, "dog": 0.0}


def test_no_detections_equals_cocoeval_where_an_area_range_has_no_ground_truth(tmp_path):
    """No detections: COCOeval's numbers (an empty detections COCO), 0 where there is ground truth and NaN (its
    -1) for the area ranges without any, here the small one."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    path = _break(write_coco(tmp_path, n=6), lambda d: [a.update(area=[2000.0, 20000.0][k % 2])
                                                         for k, a in enumerate(d["annotations"])])
    (tmp_path / "dt.json").write_text("[]")
    result = score_coco_files(path, tmp_path / "dt.json")
    gt = COCO(str(path))
    empty = COCO()
    empty.dataset = {"images": gt.dataset["images"], "annotations": [], "categories": gt.dataset["categories"]}
    empty.createIndex()
    evaluator = COCOeval(gt, empty, "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    expected = [float("nan") if v < 0 else float(v) for v in evaluator.stats[:9]]
    assert [result[name] for name in STAT_NAMES] == pytest.approx(expected, nan_ok=True)
    assert np.isnan(result["APs"]) and result["APm"] == 0.0 and result["APl"] == 0.0
