"""Both detection engines on a COCO-format set (data.format=coco): a VOC devkit converted with voc2coco,
trained a few iterations, evaluated by COCOeval; the results they write score the same in tricks coco-eval."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detection.coco import build_detection_set
from detection.config import DetectionConfig
from detection.convert import voc_to_coco, write_json
from detection.train import TrainTransform, train_detector
from runtime.config import load_config
from test_detection_train import TINY, make_devkit
from tricks.cli import main

CLASSES = ["dog", "cat"]


@pytest.fixture
def coco_files(tmp_path) -> list[str]:
    devkit = make_devkit(tmp_path / "VOCdevkit")
    for split in ("trainval", "test"):
        write_json(voc_to_coco(devkit, f"2007-{split}", CLASSES), tmp_path / f"{split}.json")
    return ["data.format=coco", f"data.train_json={tmp_path / 'trainval.json'}", f"data.train_images={devkit}",
            f"data.test_json={tmp_path / 'test.json'}", f"data.test_images={devkit}"]


def test_converted_set_feeds_the_same_training_targets(tmp_path, coco_files):
    voc = load_config(None, DetectionConfig, [*TINY, f"data.root={tmp_path / 'VOCdevkit'}",
                                              f"data.classes=[{', '.join(CLASSES)}]"])
    coco = load_config(None, DetectionConfig, [*TINY, *coco_files])
    for train in (True, False):
        a = build_detection_set(voc.data, train, TrainTransform(0.0) if train else None)
        b = build_detection_set(coco.data, train, TrainTransform(0.0) if train else None)
        assert len(a) == len(b) > 0 and a.classes == b.classes == tuple(CLASSES)
        for i in range(len(a)):
            (image_a, target_a), (image_b, target_b) = a[i], b[i]
            assert torch.equal(image_a, image_b)
            assert all(torch.equal(target_a[k], target_b[k]) for k in ("boxes", "labels"))


def test_torch_engine_trains_and_evaluates_coco(tmp_path, coco_files, capsys):
    overrides = [*TINY, *coco_files, "train.max_iter=3", "model.score_thresh_test=0.0", "train.visualize=1",
                 f"output_dir={tmp_path / 'run'}"]
    metrics = train_detector(load_config(None, DetectionConfig, overrides))
    assert metrics["format"] == "coco" and set(metrics["AP"]) == set(CLASSES) and metrics["images"] == 4
    assert len(metrics["results"]) > 0 and metrics["mAP"] == metrics["ap"]  # 3 steps: AP ~0; detectron2's test scores
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in logged if r["kind"] == "val"]
    assert val and val[-1]["ap75"] == metrics["ap75"] and val[-1]["ar100"] == metrics["ar100"]
    # tricks eval --write-results writes the COCO results; tricks coco-eval scores them as the engine did.
    assert main(["eval", "task=detection", str(tmp_path / "run" / "model_final.pth"), *overrides,
                 "--write-results", str(tmp_path / "res")]) == 0
    out = capsys.readouterr().out
    assert f"COCO AP {metrics['ap']:.2f}%  AP50 {metrics['ap50']:.2f}%" in out
    assert main(["coco-eval", "--gt", str(tmp_path / "test.json"), "--results",
                 str(tmp_path / "res" / "coco_results.json"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"):
        value = metrics[name.lower()]
        assert (doc[name] is None and value != value) or 100 * doc[name] == pytest.approx(value, abs=1e-9), name
    assert {k: 100 * v for k, v in doc["ap_per_class"].items()} == pytest.approx(metrics["AP"], abs=1e-9)


def test_detectron2_engine_trains_and_evaluates_coco(tmp_path, coco_files, capsys):
    from detection import d2_engine

    try:
        d2_engine.import_detectron2()
    except ImportError as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"detectron2 cannot be imported: {e}")
    from test_d2_engine import tiny_config

    cfg = tiny_config(tmp_path, tmp_path / "d2", *coco_files, "data.classes=null", "model.score_thresh_test=0.0",
                      "model.min_size_train=[64]", "model.min_size_test=64", "model.max_size=64")
    build = d2_engine.build_d2_config

    def narrow(c):  # the small_heads fixture's narrow heads: same code paths, less CPU
        d2 = build(c)
        d2.MODEL.FPN.OUT_CHANNELS, d2.MODEL.ROI_BOX_HEAD.FC_DIM, d2.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32, 64, 32
        return d2

    d2_engine.build_d2_config = narrow
    try:
        metrics = d2_engine.train(cfg)
        assert metrics["format"] == "coco" and set(metrics["AP"]) == set(CLASSES) and metrics["images"] == 4
        again = d2_engine.evaluate(cfg, str(tmp_path / "d2" / "model_final.pth"))
    finally:
        d2_engine.build_d2_config = build
    assert len(again["results"]) > 0 and again["ar100"] > 0 and again["ap"] == pytest.approx(metrics["ap"], abs=1e-9)
    (tmp_path / "d2.json").write_text(json.dumps(again["results"]))
    capsys.readouterr()  # detectron2's own printing
    assert main(["coco-eval", "--gt", str(tmp_path / "test.json"), "--results", str(tmp_path / "d2.json"),
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert 100 * doc["AP"] == pytest.approx(again["ap"], abs=1e-9)
    assert 100 * doc["AR100"] == pytest.approx(again["ar100"], abs=1e-9)
    assert {k: 100 * v for k, v in doc["ap_per_class"].items()} == pytest.approx(again["AP"], abs=1e-9)


def test_evaluation_without_a_training_json_takes_the_test_json_classes(tmp_path, coco_files):
    from detection.train import build_test_set

    cfg = load_config(None, DetectionConfig, [*TINY, *[o for o in coco_files if "train_" not in o]])
    assert build_test_set(cfg).classes == tuple(CLASSES)
    with pytest.raises(ValueError, match="data.format=coco needs data.train_json"):
        build_detection_set(cfg.data, train=True)
