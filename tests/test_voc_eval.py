"""PASCAL VOC detection AP: hand-worked cases, a naive transcription of the devkit's rules (one detection
at a time, +1-pixel integer boxes) and detectron2's ``voc_eval`` on random detections."""
from __future__ import annotations

import numpy as np
import pytest

from detection.voc_eval import VOCBoxes, average_precision, evaluate_voc


def gt(boxes, labels, difficult=None) -> VOCBoxes:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return VOCBoxes(boxes, np.asarray(labels, dtype=np.int64),
                    difficult=np.zeros(len(labels), bool) if difficult is None else np.asarray(difficult, bool))


def det(boxes, labels, scores) -> VOCBoxes:
    return VOCBoxes(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(labels, dtype=np.int64),
                    scores=np.asarray(scores, dtype=np.float64))


def test_average_precision_by_hand():
    # Detections TP, FP, TP over 2 ground truths: recall 0.5, 0.5, 1; precision 1, 0.5, 2/3.
    rec, prec = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    # Area under the interpolated curve: 0.5 * 1 + 0.5 * 2/3.
    assert average_precision(rec, prec, use_07_metric=False) == pytest.approx(0.5 + 1 / 3)
    # 11 points: recall 0..0.5 (6 points) at precision 1, 0.6..1.0 (5 points) at 2/3.
    assert average_precision(rec, prec, use_07_metric=True) == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert average_precision(np.zeros(0), np.zeros(0), use_07_metric=True) == 0.0
    # The devkit's 11 thresholds are 0:0.1:1 in floating point: 3 * 0.1 > 3 / 10, so a recall of
    # exactly 3/10 misses the 0.3 point (papers' VOC07 numbers include this quirk).
    assert average_precision(np.array([0.1, 0.2, 0.3]), np.ones(3), use_07_metric=True) == pytest.approx(3 / 11)


def test_matching_rules():
    # Boxes in the dataset's continuous coordinates (VOC xmin/ymin minus 1): a VOC box 1..10 is [0, 10).
    truth = [gt([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [0, 0, 0], difficult=[0, 0, 1])]
    preds = [det([[0, 0, 10, 10],      # TP
                  [0, 0, 10, 10],      # duplicate of a matched box: FP
                  [40, 40, 50, 50],    # best match is difficult: ignored (neither TP nor FP)
                  [60, 60, 70, 70],    # no overlap: FP
                  [20, 20, 30, 30]],   # TP
                 [0, 0, 0, 0, 0], [0.9, 0.8, 0.7, 0.6, 0.5])]
    res = evaluate_voc(preds, truth, num_classes=1, use_07_metric=False)
    # Ranked TP, FP, FP, TP over 2 non-difficult boxes: rec .5 .5 .5 1, prec 1 .5 1/3 .5
    assert res["ap"][0] == pytest.approx(0.5 * 1 + 0.5 * 0.5)
    assert res["mAP"] == pytest.approx(res["ap"][0])
    assert res["num_gt"][0] == 2


def test_iou_threshold_is_strict_and_in_voc_pixels():
    # VOC IoU counts pixels inclusively; with continuous boxes that is the plain area. Half overlap:
    # [0,10)x[0,10) vs [0,10)x[5,15) -> 50 / 150 = 1/3; a 0.5 threshold needs more than half.
    truth = [gt([[0, 0, 10, 10]], [0])]
    third = [det([[0, 5, 10, 15]], [0], [1.0])]
    assert evaluate_voc(third, truth, 1, iou_threshold=0.3)["ap"][0] == 1.0
    assert evaluate_voc(third, truth, 1, iou_threshold=0.5)["ap"][0] == 0.0
    # Exactly 0.5 is not a match (the devkit uses '>').
    exact = [det([[0, 0, 10, 5]], [0], [1.0])]  # 50 / 100 = 0.5
    assert evaluate_voc(exact, truth, 1, iou_threshold=0.5)["ap"][0] == 0.0


def test_class_without_ground_truth_is_left_out_of_the_mean():
    truth = [gt([[0, 0, 10, 10]], [0])]
    preds = [det([[0, 0, 10, 10], [0, 0, 10, 10]], [0, 1], [0.9, 0.8])]
    res = evaluate_voc(preds, truth, num_classes=2)
    assert res["ap"][0] == 1.0 and np.isnan(res["ap"][1]) and res["mAP"] == 1.0


def test_input_errors_name_the_problem():
    truth = [gt([[0, 0, 10, 10]], [0])]
    with pytest.raises(ValueError, match="2 prediction.*1 ground-truth"):
        evaluate_voc([det([], [], []), det([], [], [])], truth, 1)
    with pytest.raises(ValueError, match="scores"):
        evaluate_voc([gt([[0, 0, 10, 10]], [0])], truth, 1)
    with pytest.raises(ValueError, match="label 3.*num_classes=1"):
        evaluate_voc([det([[0, 0, 1, 1]], [3], [1.0])], truth, 1)


def _devkit_ap(preds, truth, cls, thresh, use_07):
    """The devkit's procedure written out plainly: integer VOC boxes (1-based, inclusive), +1 areas,
    detections one by one in descending score."""
    to_voc = lambda b: np.array([b[0] + 1, b[1] + 1, b[2], b[3]])  # continuous -> VOC pixels
    gts = {}
    npos = 0
    for i, t in enumerate(truth):
        keep = t.labels == cls
        gts[i] = {"bbox": [to_voc(b) for b in t.boxes[keep]], "difficult": list(t.difficult[keep]),
                  "det": [False] * int(keep.sum())}
        npos += int((~t.difficult[keep]).sum())
    dets = [(p.scores[j], i, to_voc(p.boxes[j])) for i, p in enumerate(preds) for j in range(len(p.labels))
            if p.labels[j] == cls]
    dets.sort(key=lambda d: -d[0])
    tp, fp = [], []
    for _, i, bb in dets:
        best, jbest = -1.0, -1
        for j, g in enumerate(gts[i]["bbox"]):
            iw = max(min(g[2], bb[2]) - max(g[0], bb[0]) + 1, 0)
            ih = max(min(g[3], bb[3]) - max(g[1], bb[1]) + 1, 0)
            inter = iw * ih
            union = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (g[2] - g[0] + 1) * (g[3] - g[1] + 1) - inter
            if inter / union > best:
                best, jbest = inter / union, j
        if best > thresh:
            if gts[i]["difficult"][jbest]:
                tp.append(0), fp.append(0)
            elif not gts[i]["det"][jbest]:
                gts[i]["det"][jbest] = True
                tp.append(1), fp.append(0)
            else:
                tp.append(0), fp.append(1)
        else:
            tp.append(0), fp.append(1)
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if use_07:
        thresholds = np.arange(0.0, 1.1, 0.1)  # as the devkit's 0:0.1:1
        return sum((prec[rec >= t].max() if (rec >= t).any() else 0) for t in thresholds) / 11
    # every-point: precision envelope, summed where recall changes
    mrec, mpre = np.r_[0, rec, 1], np.r_[0, prec, 0]
    for k in range(len(mpre) - 2, -1, -1):
        mpre[k] = max(mpre[k], mpre[k + 1])
    return sum((mrec[k + 1] - mrec[k]) * mpre[k + 1] for k in range(len(mrec) - 1) if mrec[k + 1] != mrec[k])


@pytest.mark.parametrize("use_07", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_matches_the_devkit_procedure_on_random_detections(seed, use_07):
    rng = np.random.default_rng(seed)
    num_classes, truth, preds = 4, [], []
    for _ in range(25):
        n = int(rng.integers(1, 6))
        xy = rng.integers(0, 80, (n, 2))
        wh = rng.integers(8, 40, (n, 2))
        boxes = np.c_[xy, xy + wh].astype(np.float64)
        labels = rng.integers(0, num_classes, n)
        truth.append(gt(boxes, labels, rng.random(n) < 0.15))
        # Detections: jittered copies of the truth (some with the wrong class), duplicates and clutter.
        m = int(rng.integers(0, 10))
        src = rng.integers(0, n, m)
        jitter = rng.integers(-6, 7, (m, 4))
        dboxes = boxes[src] + jitter
        dboxes[:, 2:] = np.maximum(dboxes[:, 2:], dboxes[:, :2] + 1)
        dlabels = np.where(rng.random(m) < 0.8, labels[src], rng.integers(0, num_classes, m))
        clutter = rng.integers(0, 100, (3, 2))
        dboxes = np.r_[dboxes, np.c_[clutter, clutter + 15]]
        dlabels = np.r_[dlabels, rng.integers(0, num_classes, 3)]
        preds.append(det(dboxes, dlabels, rng.random(len(dlabels))))
    res = evaluate_voc(preds, truth, num_classes, use_07_metric=use_07)
    expected = [_devkit_ap(preds, truth, c, 0.5, use_07) for c in range(num_classes)]
    np.testing.assert_allclose(res["ap"], expected, rtol=1e-12, atol=1e-12)
    assert 0 < res["mAP"] < 1


def _random_dataset(rng, num_images: int, num_classes: int, ties: bool) -> tuple[list, list]:
    """Ground truth with integer VOC corners (~15% difficult, some identical boxes: IoU ties for the
    argmax), ~10% images without boxes, ~10% without detections; detections with half-pixel corners
    (exact in the devkit's text files): jittered copies of the truth, some of the wrong class, and clutter.
    The last class has boxes but is never predicted. Scores: 8 levels shared by many detections
    (``ties``) or all distinct."""
    truth, preds = [], []
    for _ in range(num_images):
        n = 0 if rng.random() < 0.1 else int(rng.integers(1, 7))
        xy = rng.integers(0, 80, (n, 2))
        boxes = np.c_[xy, xy + rng.integers(8, 40, (n, 2))].astype(np.float64)
        labels = rng.integers(0, num_classes, n)
        if n and rng.random() < 0.2:  # the same box twice, the second difficult or not
            boxes, labels = np.r_[boxes, boxes[:1]], np.r_[labels, labels[:1]]
        truth.append(gt(boxes, labels, rng.random(len(labels)) < 0.15))
        m = 0 if rng.random() < 0.1 else int(rng.integers(1, 12))
        src = rng.integers(0, max(n, 1), m)
        dboxes = (boxes[src] if n else np.tile([[10.0, 10.0, 30.0, 30.0]], (m, 1))) + rng.integers(-8, 9, (m, 4)) / 2
        dboxes[:, 2:] = np.maximum(dboxes[:, 2:], dboxes[:, :2] + 1)
        dlabels = labels[src] if n else rng.integers(0, num_classes - 1, m)
        dlabels = np.where(rng.random(m) < 0.8, dlabels, rng.integers(0, num_classes - 1, m))
        clutter = rng.integers(0, 200, (2 if m else 0, 2)) / 2
        dboxes = np.r_[dboxes, np.c_[clutter, clutter + 12]]
        dlabels = np.minimum(np.r_[dlabels, rng.integers(0, num_classes - 1, len(clutter))], num_classes - 2)
        preds.append(det(dboxes, dlabels, np.zeros(len(dlabels))))
    num_dets = sum(len(p.labels) for p in preds)
    scores = rng.integers(1, 9, num_dets) / 8 if ties else (rng.permutation(num_dets) + 1) / (num_dets + 1)
    for p, start in zip(preds, np.cumsum([0] + [len(p.labels) for p in preds])):
        p.scores = scores[start:start + len(p.labels)]
    return truth, preds


@pytest.mark.parametrize("use_07", [True, False])
def test_matches_the_devkit_procedure_with_ties_on_many_images(use_07):
    truth, preds = _random_dataset(np.random.default_rng(7), 400, 5, ties=True)
    res = evaluate_voc(preds, truth, 5, use_07_metric=use_07)
    expected = [_devkit_ap(preds, truth, c, 0.5, use_07) for c in range(5)]
    np.testing.assert_allclose(res["ap"], expected, rtol=0, atol=1e-9)
    assert res["ap"][4] == 0.0 and res["num_gt"][4] > 0  # boxes but no detections
    assert 0 < res["mAP"] < 1


def _write_devkit_files(root, truth, preds, names) -> tuple[str, str, str]:
    """What detectron2's voc_eval reads: Annotations/<id>.xml, the image set, one detection file per class
    (an image without detections has no line; VOC corners: continuous + 1 at the top left)."""
    (root / "Annotations").mkdir(parents=True)
    ids = [f"{i:06d}" for i in range(len(truth))]
    for image_id, t in zip(ids, truth):
        objects = "".join(
            f"<object><name>{names[c]}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{int(d)}</difficult><bndbox><xmin>{int(b[0]) + 1}</xmin><ymin>{int(b[1]) + 1}</ymin>"
            f"<xmax>{int(b[2])}</xmax><ymax>{int(b[3])}</ymax></bndbox></object>"
            for b, c, d in zip(t.boxes, t.labels, t.difficult))
        (root / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{objects}</annotation>")
    (root / "test.txt").write_text("".join(f"{i}\n" for i in ids))
    for c, name in enumerate(names):
        (root / f"{name}.txt").write_text("".join(
            f"{image_id} {s:.17g} {b[0] + 1:.17g} {b[1] + 1:.17g} {b[2]:.17g} {b[3]:.17g}\n"
            for image_id, p in zip(ids, preds) for b, l, s in zip(p.boxes, p.labels, p.scores) if l == c))
    return str(root / "{}.txt"), str(root / "Annotations" / "{}.xml"), str(root / "test.txt")


@pytest.mark.parametrize("ties", [False, True], ids=["distinct-scores", "tied-scores"])
def test_agrees_with_detectron2_voc_eval_on_many_images(tmp_path, monkeypatch, ties):
    """Against detectron2's ``voc_eval`` (the py-faster-rcnn port), 1e-9, both metrics. With tied scores its
    ``np.argsort(-confidence)`` (quicksort: no defined order among ties; numpy's SIMD sort shuffles them even
    for 10 elements) is swapped for the stable sort of the devkit's MATLAB ``sort``, which we follow:
    the only difference, so the rest of its procedure is checked on ties too."""
    import functools
    import types

    from detection.d2_engine import import_detectron2

    try:
        import_detectron2()
    except ImportError as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"detectron2 cannot be imported: {e}")
    from detectron2.evaluation import pascal_voc_evaluation

    if ties:
        stable_numpy = types.ModuleType("numpy")
        stable_numpy.__dict__.update(np.__dict__)
        stable_numpy.argsort = functools.partial(np.argsort, kind="stable")
        monkeypatch.setattr(pascal_voc_evaluation, "np", stable_numpy)
    names = [f"class{c}" for c in range(5)]
    truth, preds = _random_dataset(np.random.default_rng(11), 400, len(names), ties)
    files = _write_devkit_files(tmp_path, truth, preds, names)
    pascal_voc_evaluation.parse_rec.cache_clear()
    for use_07 in (True, False):
        ours = evaluate_voc(preds, truth, len(names), use_07_metric=use_07)["ap"]
        theirs = [pascal_voc_evaluation.voc_eval(*files, name, ovthresh=0.5, use_07_metric=use_07)[2]
                  for name in names]
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9)
        assert 0 < np.mean(ours) < 1 and ours[4] == 0.0


# ---------------------------------------------------------------------------------------------------------
# The devkit's results format: comp4_det_<split>_<class>.txt, and scoring a folder of them

from detection.voc import VOCFormatError
from detection.voc_eval import read_voc_results, results_path, score_voc_results, write_voc_results
from test_voc import write_image, write_set  # tests/ is on sys.path (pytest prepend mode, no __init__.py)

CLASSES = ("dog", "person", "chair")


def test_results_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    detections = {}
    for image_id in ("000001", "2008_000002", "000003"):
        n = 12
        xy = rng.uniform(-0.5, 300, (n, 2))
        boxes = np.c_[xy, xy + rng.uniform(0.01, 200, (n, 2))].astype(np.float32)  # as loader and detectors hold them
        boxes[0] = [0, 0, 20, 10]
        boxes[1] = [0.1, 1e-3, 12.5, 7.25]
        labels = np.sort(rng.integers(0, len(CLASSES), n))  # read_voc_results groups an image's boxes by class
        detections[image_id] = VOCBoxes(boxes, labels, scores=rng.random(n).astype(np.float32))
    written = write_voc_results(tmp_path / "results", detections, CLASSES, split="test")
    assert [p.name for p in written] == [f"comp4_det_test_{c}.txt" for c in CLASSES]
    back = read_voc_results(tmp_path / "results", CLASSES, split="test")
    assert set(back) == set(detections)
    for image_id, original in detections.items():
        np.testing.assert_array_equal(back[image_id].boxes, original.boxes.astype(np.float64))
        assert np.array_equal(back[image_id].boxes.astype(np.float32), original.boxes)  # bit for bit
        np.testing.assert_array_equal(back[image_id].labels, original.labels)
        np.testing.assert_array_equal(back[image_id].scores, original.scores.astype(np.float64))
    # The devkit's 1-based inclusive corners: our [0, 20) x [0, 10) is the VOC box 1..20 x 1..10.
    first = [line for p in written for line in p.read_text().splitlines() if line.startswith("000001")]
    box_lines = [line.split()[2:] for line in first]
    assert ["1.0", "1.0", "20.0", "10.0"] in box_lines


def test_results_accept_torchvision_output_dicts(tmp_path):
    import torch

    out = {"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.5])}
    write_voc_results(tmp_path, {"a": out}, CLASSES, split="val", prefix="comp3_det")
    assert results_path(tmp_path, "person", "val", "comp3_det").read_text() == "a 0.5 1.0 1.0 5.0 5.0\n"
    with pytest.raises(ValueError, match=r"label 3, outside 0..2.*background"):
        write_voc_results(tmp_path, {"a": {**out, "labels": torch.tensor([3])}}, CLASSES)
    with pytest.raises(ValueError, match="whitespace"):
        write_voc_results(tmp_path, {"a b": out}, CLASSES)


@pytest.fixture
def devkit(tmp_path):
    """Three images of VOC2007 'test'; the chair is difficult."""
    root = tmp_path / "VOCdevkit"
    write_image(root, "2007", "000001", [("dog", 1, 1, 20, 10, 0), ("chair", 30, 5, 60, 40, 1)])
    write_image(root, "2007", "000002", [("person", 10, 10, 30, 45, 0), ("person", 35, 5, 60, 40, None)])
    write_image(root, "2007", "000003", [])
    write_set(root, "2007", "test", ["000001", "000002", "000003"])
    return root


def known_detections() -> dict:
    """dog: FP then TP (AP 0.5 by both metrics). person: TP, FP, TP over 2 boxes (rec .5 .5 1, prec 1 .5 2/3:
    area 0.5 + 0.5 * 2/3, VOC07 (6 * 1 + 5 * 2/3) / 11). chair: only hits the difficult box (no AP)."""
    return {
        "000001": det([[0, 0, 20, 10], [29, 4, 60, 40]], [0, 2], [0.9, 0.4]),
        "000002": det([[9, 9, 30, 45], [0, 0, 5, 5], [34, 4, 60, 40]], [1, 1, 1], [0.9, 0.8, 0.7]),
        "000003": det([[1, 1, 30, 30]], [0], [0.95]),
    }


PERSON_AREA, PERSON_07 = 0.5 + 0.5 * 2 / 3, (6 + 5 * 2 / 3) / 11


def test_score_results_folder_by_hand(devkit, tmp_path):
    write_voc_results(tmp_path / "res", known_detections(), CLASSES)
    res = score_voc_results(devkit, 2007, "test", tmp_path / "res", classes=CLASSES)
    assert res["metric"] == "voc07"
    assert res["ap_per_class"]["dog"] == pytest.approx(0.5)
    assert res["ap_per_class"]["person"] == pytest.approx(PERSON_07)
    assert np.isnan(res["ap_per_class"]["chair"]) and res["num_gt"] == {"dog": 1, "person": 2, "chair": 0}
    assert res["map_voc07"] == pytest.approx((0.5 + PERSON_07) / 2)
    assert res["map_area"] == pytest.approx((0.5 + PERSON_AREA) / 2)
    area = score_voc_results(devkit, "2007", "test", tmp_path / "res", classes=CLASSES, use_07_metric=False)
    assert area["metric"] == "area" and area["ap_per_class"]["person"] == pytest.approx(PERSON_AREA)
    assert area["map_voc07"] == res["map_voc07"]
    # The same numbers as evaluate_voc on the arrays, without the files in between.
    dets = known_detections()
    truth = [gt([[0, 0, 20, 10], [29, 4, 60, 40]], [0, 2], [0, 1]),
             gt([[9, 9, 30, 45], [34, 4, 60, 40]], [1, 1]), gt([], [])]
    direct = evaluate_voc([dets[i] for i in ("000001", "000002", "000003")], truth, 3)
    assert res["map_voc07"] == direct["mAP"]


def test_equal_scores_rank_in_results_file_order(devkit, tmp_path):
    """The devkit sorts a class file's lines by score, stably: equal scores keep the file's order, whatever the
    image set's order. Here the false positive (image 000002) comes first in the file: dog AP 0.5 by both
    metrics, as detectron2's voc_eval on the same file (two lines: its sort keeps them); in image-set order 1."""
    from detection.d2_engine import import_detectron2

    try:
        import_detectron2()
    except ImportError as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"detectron2 cannot be imported: {e}")
    from detectron2.evaluation import pascal_voc_evaluation

    pascal_voc_evaluation.parse_rec.cache_clear()

    res = tmp_path / "res"
    res.mkdir()
    (res / "comp4_det_test_dog.txt").write_text("000002 0.500 1.0 1.0 20.0 10.0\n000001 0.500 1.0 1.0 20.0 10.0\n")
    for name in ("person", "chair"):
        (res / f"comp4_det_test_{name}.txt").write_text("")
    # the fixture's boxes as detectron2's parse_rec reads them (it needs pose and truncated)
    boxes = {"000001": [("dog", 1, 1, 20, 10, 0), ("chair", 30, 5, 60, 40, 1)],
             "000002": [("person", 10, 10, 30, 45, 0), ("person", 35, 5, 60, 40, 0)], "000003": []}
    (tmp_path / "d2").mkdir()
    for image_id, objects in boxes.items():
        (tmp_path / "d2" / f"{image_id}.xml").write_text("<annotation>" + "".join(
            f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{d}</difficult>"
            f"<bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{e}</ymax></bndbox></object>"
            for n, a, b, c, e, d in objects) + "</annotation>")
    for use_07 in (True, False):
        ours = score_voc_results(devkit, 2007, "test", res, classes=CLASSES, use_07_metric=use_07)
        theirs = pascal_voc_evaluation.voc_eval(str(res / "comp4_det_test_{}.txt"), str(tmp_path / "d2" / "{}.xml"),
                                                str(devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt"), "dog",
                                                ovthresh=0.5, use_07_metric=use_07)[2]
        assert ours["ap_per_class"]["dog"] == pytest.approx(theirs) == pytest.approx(0.5)


def test_devkit_written_lines_and_missing_class_files(devkit, tmp_path, caplog):
    res_dir = tmp_path / "res"
    res_dir.mkdir()
    # As py-faster-rcnn writes them ('{:.3f} {:.1f} ...'); no person or chair file at all.
    (res_dir / "comp4_det_test_dog.txt").write_text("000003 0.950 2.0 2.0 30.0 30.0\n000001 0.900 1.0 1.0 20.0 10.0\n")
    with caplog.at_level("WARNING", logger="detection.voc_eval"):
        res = score_voc_results(devkit, "2007", "test", res_dir, classes=CLASSES)
    assert res["ap_per_class"]["dog"] == pytest.approx(0.5) and res["ap_per_class"]["person"] == 0.0
    assert res["map_voc07"] == pytest.approx(0.25)
    missing = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("comp4_det_test_person.txt not found" in m for m in missing)


def test_results_errors_name_file_and_line(devkit, tmp_path):
    res_dir = tmp_path / "res"
    write_voc_results(res_dir, known_detections(), CLASSES)
    dog = res_dir / "comp4_det_test_dog.txt"
    dog.write_text(dog.read_text() + "000002 0.5 1 1 20\n")
    with pytest.raises(VOCFormatError, match=r"comp4_det_test_dog.txt, line 3: 5 fields, expected 6"):
        score_voc_results(devkit, "2007", "test", res_dir, classes=CLASSES)
    dog.write_text("000002 high 1 1 20 10\n")
    with pytest.raises(VOCFormatError, match=r"comp4_det_test_dog.txt, line 1: score and corners must be numbers"):
        read_voc_results(res_dir, CLASSES)
    dog.write_text("000002 0.5 1 1 20 10\n\n004242 0.5 1 1 20 10\n")
    with pytest.raises(VOCFormatError, match=r"comp4_det_test_dog.txt, line 3: image '004242' is not in the test"):
        score_voc_results(devkit, "2007", "test", res_dir, classes=CLASSES)


# ---------------------------------------------------------------------------------------------------------
# detectron2's VOC AP (IoU 0.50:0.95) and AP75: PascalVOCDetectionEvaluator itself, end to end

from detection.voc_eval import evaluate_voc_iou_range  # noqa: E402


@pytest.mark.parametrize("ties", [False, True], ids=["distinct-scores", "tied-scores"])
@pytest.mark.parametrize("year", [2007, 2012])
def test_ap_and_ap75_equal_detectron2_pascal_voc_evaluator(tmp_path, monkeypatch, ties, year):
    """``evaluate_voc_iou_range`` against detectron2's ``PascalVOCDetectionEvaluator`` (registered metadata,
    ``process`` on ``Instances``, ``evaluate``) on random detections with difficult boxes, empty images and
    images without detections; 1e-9. The evaluator writes scores with 3 decimals and corners with 1, so the
    detections are given at that precision; its unstable ``argsort`` is made stable as in the test above."""
    import functools
    import types

    from detection.d2_engine import import_detectron2

    try:
        import_detectron2()
    except ImportError as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"detectron2 cannot be imported: {e}")
    import torch
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import PascalVOCDetectionEvaluator, pascal_voc_evaluation
    from detectron2.structures import Boxes, Instances

    stable_numpy = types.ModuleType("numpy")
    stable_numpy.__dict__.update(np.__dict__)
    stable_numpy.argsort = functools.partial(np.argsort, kind="stable")
    monkeypatch.setattr(pascal_voc_evaluation, "np", stable_numpy)
    names = [f"class{c}" for c in range(5)]
    rng = np.random.default_rng(year + ties)
    truth, preds = _random_dataset(rng, 150, len(names), ties)
    for p in preds:  # the precision detectron2's results lines keep: "{score:.3f}", corners "{:.1f}"
        p.scores = np.array([float(f"{s:.3f}") for s in (p.scores if ties else rng.random(len(p.scores)))])
    dirname = tmp_path / f"VOC{year}"
    _write_devkit_files(dirname, truth, preds, names)
    (dirname / "ImageSets" / "Main").mkdir(parents=True)
    (dirname / "test.txt").rename(dirname / "ImageSets" / "Main" / "test.txt")
    name = f"tricks_test_voc_{year}_{ties}_{tmp_path.name}"
    MetadataCatalog.get(name).set(thing_classes=names, dirname=str(dirname), split="test", year=year)
    pascal_voc_evaluation.parse_rec.cache_clear()
    evaluator = PascalVOCDetectionEvaluator(name)
    evaluator.reset()
    for i, p in enumerate(preds):
        instances = Instances((200, 200), pred_boxes=Boxes(torch.tensor(p.boxes, dtype=torch.float64)),
                              scores=torch.tensor(p.scores), pred_classes=torch.tensor(p.labels))
        evaluator.process([{"image_id": f"{i:06d}"}], [{"instances": instances}])
    theirs = evaluator.evaluate()["bbox"]
    ours = evaluate_voc_iou_range(preds, truth, len(names), use_07_metric=year == 2007)
    for key in ("AP", "AP50", "AP75"):
        assert 100 * ours[key] == pytest.approx(theirs[key], rel=0, abs=1e-7), key  # 1e-9 as fractions
    assert 0 < ours["AP75"] < ours["AP50"] < 1 and ours["AP"] < ours["AP50"]
    assert len(set(ours["per_threshold"].values())) > 5  # the thresholds are really different


def test_ap_iou_range_is_the_mean_of_ten_thresholds_by_hand():
    # One box, one detection with IoU 0.8 (a [0, 10) box against [0, 8)): hit at 0.50 .. 0.75, miss from 0.80.
    truth = [gt([[0, 0, 10, 10]], [0])]
    preds = [det([[0, 0, 10, 8]], [0], [1.0])]
    res = evaluate_voc_iou_range(preds, truth, 1, use_07_metric=False)
    assert res["AP50"] == 1.0 and res["AP75"] == 1.0 and res["per_threshold"][0.8] == 0.0
    assert res["AP"] == pytest.approx(6 / 10)
