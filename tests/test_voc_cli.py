"""``voc-eval`` (detection.cli): the table, the JSON document and errors, on a tiny VOCdevkit."""
from __future__ import annotations

import argparse
import json

import pytest

from detection.cli import add_subcommands, main
from detection.voc_eval import write_voc_results
from test_voc_eval import CLASSES, PERSON_07, PERSON_AREA, devkit, known_detections  # noqa: F401 (fixture)


@pytest.fixture
def results(devkit, tmp_path):
    write_voc_results(tmp_path / "res", known_detections(), CLASSES)
    return tmp_path / "res"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["voc-eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_document(devkit, results, capsys):
    code, out, _ = run(capsys, "--devkit", devkit, "--results", results, "--classes", "dog,person,chair", "--json")
    doc = json.loads(out)
    assert code == 0 and {"map_voc07", "map_area", "ap_per_class"} <= set(doc)
    assert doc["map_voc07"] == pytest.approx((0.5 + PERSON_07) / 2)
    assert doc["map_area"] == pytest.approx((0.5 + PERSON_AREA) / 2)
    assert doc["ap_per_class"] == {"dog": pytest.approx(0.5), "person": pytest.approx(PERSON_07), "chair": None}
    assert doc["metric"] == "voc07"  # the default for 2007, as the devkit
    assert doc["ap"] == pytest.approx(doc["map_voc07"]) and doc["ap75"] == doc["map_voc07"]  # exact boxes: hits at every IoU
    area = json.loads(run(capsys, "--devkit", devkit, "--results", results, "--classes", "dog,person,chair", "--area",
                          "--json")[1])
    assert area["ap_per_class"]["person"] == pytest.approx(PERSON_AREA) and area["map_voc07"] == doc["map_voc07"]


def test_table_headlines_the_chosen_metric(devkit, results, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("dog\nperson\nchair\n")
    code, out, _ = run(capsys, "--devkit", devkit, "--results", results, "--classes-file", names, "--use-07-metric")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("VOC2007 test")
    assert lines[3].split() == ["dog", "1", "50.00"] and lines[5].split() == ["chair", "0", "no", "ground", "truth"]
    assert lines[-5] == f"mAP (VOC07 11-point): {100 * (0.5 + PERSON_07) / 2:.2f}"
    assert lines[-4] == f"mAP (area under the PR curve): {100 * (0.5 + PERSON_AREA) / 2:.2f}"
    # The hits are exact boxes (IoU 1 at every threshold): AP over 0.50:0.95 and AP75 equal AP50.
    assert lines[-3] == f"AP IoU 0.50:0.95 (VOC07 11-point, detectron2's VOC AP): {100 * (0.5 + PERSON_07) / 2:.2f}"
    assert lines[-2] == f"AP75 (VOC07 11-point): {100 * (0.5 + PERSON_07) / 2:.2f}"
    # the class without ground truth is named as left out of the means (2 of 3 classes)
    assert lines[-1] == "mean over 2 of 3 classes: left out, no ground-truth object in the test split: chair"
    out = run(capsys, "--devkit", devkit, "--results", results, "--classes-file", names, "--area")[1]
    assert out.splitlines()[-5].startswith("mAP (area under the PR curve)")
    assert out.splitlines()[-2] == f"AP75 (area under the PR curve): {100 * (0.5 + PERSON_AREA) / 2:.2f}"


def test_errors_and_flag_conflicts(devkit, results, capsys):
    code, _, err = run(capsys, "--devkit", devkit, "--results", results, "--split", "val", "--classes", "dog")
    assert code == 2 and "ImageSets/Main/val.txt not found" in err
    code, _, err = run(capsys, "--devkit", devkit, "--results", results, "--classes", "dog,dog")
    assert code == 2 and "class 'dog' at index 1 is already at index 0" in err
    # The default classes are VOC's 20, and the ground truth is labelled with them: chair/dog/person files exist,
    # the other 17 are missing (AP of classes without ground truth is left out).
    code, out, _ = run(capsys, "--devkit", devkit, "--results", results, "--json")
    assert code == 0 and json.loads(out)["ap_per_class"]["cat"] is None
    with pytest.raises(SystemExit):
        main(["voc-eval", "--devkit", str(devkit), "--results", str(results), "--area", "--use-07-metric"])
    with pytest.raises(SystemExit):
        main(["voc-eval", "--devkit", str(devkit), "--results", str(results), "--classes", "a", "--classes-file", "f"])


def test_add_subcommands_on_another_parser(devkit, results, capsys):
    parser = argparse.ArgumentParser(prog="tricks")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["voc-eval", "--devkit", str(devkit), "--results", str(results), "--json",
                              "--classes", "dog,person,chair"])
    assert args.func(args) == 0 and json.loads(capsys.readouterr().out)["ap_per_class"]["dog"] == pytest.approx(0.5)
