"""Segmentation metrics: a hand-worked case and a per-class, per-image recount in numpy (the way
mmseg's ``intersect_and_union`` + ``total_area_to_metrics`` define them)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segmentation.metrics import SegmentationMetric


def test_hand_worked_case():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 1]])
    m = SegmentationMetric(num_classes=4)
    m.update(pred, label)
    r = m.compute()
    # class 0: inter 1, union 3 (2 labelled + 1 more predicted); class 1: inter 2, union 3; class 2: 1 / 2;
    # class 3: absent and never predicted -> NaN, left out of the means.
    assert r["IoU"][:3] == pytest.approx([100 / 3, 200 / 3, 50]) and math.isnan(r["IoU"][3])
    assert r["mIoU"] == pytest.approx((100 / 3 + 200 / 3 + 50) / 3)
    assert r["Acc"][:3] == pytest.approx([50, 100, 50])
    assert r["aAcc"] == pytest.approx(100 * 4 / 6)  # the two ignored pixels count nowhere


def test_scores_are_argmaxed_and_errors_are_clear():
    m = SegmentationMetric(num_classes=3)
    scores = torch.zeros(1, 3, 2, 2)
    scores[:, 2] = 1
    m.update(scores, torch.full((1, 2, 2), 2))
    assert m.compute()["mIoU"] == 100
    with pytest.raises(ValueError, match="label value 7"):
        m.update(torch.zeros(2, 2), torch.full((2, 2), 7))
    with pytest.raises(ValueError, match="shape"):
        m.update(torch.zeros(2, 3), torch.zeros(2, 2))


def _recount(preds, labels, num_classes, ignore_index):
    inter, union, pred_area, label_area = (np.zeros(num_classes) for _ in range(4))
    for p, l in zip(preds, labels):
        keep = l != ignore_index
        p, l = p[keep], l[keep]
        for c in range(num_classes):
            inter[c] += np.sum((p == c) & (l == c))
            pred_area[c] += np.sum(p == c)
            label_area[c] += np.sum(l == c)
    union = pred_area + label_area - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = inter / union, inter / label_area
    return 100 * np.nanmean(iou), 100 * np.nanmean(acc), 100 * inter.sum() / label_area.sum()


def test_matches_a_per_class_recount_over_several_images():
    rng = np.random.default_rng(0)
    k = 6
    labels = [rng.integers(0, k, (13, 17)) for _ in range(5)]
    for l in labels:
        l[rng.random(l.shape) < 0.2] = 255
    labels[0][labels[0] == 5] = 1  # class 5 absent from some images
    preds = [np.where(rng.random(l.shape) < 0.6, np.clip(l, 0, k - 1), rng.integers(0, k, l.shape)) for l in labels]
    m = SegmentationMetric(k)
    for p, l in zip(preds, labels):
        m.update(torch.from_numpy(p), torch.from_numpy(l))
    r = m.compute()
    miou, macc, aacc = _recount(preds, labels, k, 255)
    assert r["mIoU"] == pytest.approx(miou) and r["mAcc"] == pytest.approx(macc) and r["aAcc"] == pytest.approx(aacc)


def test_predictions_outside_the_classes_are_errors():
    # 255 with 150 classes used to be counted as label*150 + 255, i.e. in the row of the next label
    m = SegmentationMetric(num_classes=150)
    with pytest.raises(ValueError, match="prediction value 255 is not a class"):
        m.update(torch.tensor([[255, 0]]), torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="prediction value -1"):
        m.update(torch.tensor([[-1, 0]]), torch.tensor([[0, 0]]))
    m.update(torch.tensor([[255, 0]]), torch.tensor([[255, 0]]))  # where the label is ignored, anything goes
    assert m.compute()["aAcc"] == 100


def test_scores_of_one_image_are_argmaxed_over_their_class_axis():
    """[C, H, W] scores of one image (C = num_classes) against an [H, W] label: the class axis is 0, even when C
    equals H (an argmax over axis 1 would silently pick rows); a class axis of another size is an error."""
    from segmentation.metrics import SegmentationMetric

    torch.manual_seed(0)
    scores = torch.randn(4, 4, 6)
    label = torch.randint(0, 4, (4, 6))
    one, batch = SegmentationMetric(4), SegmentationMetric(4)
    one.update(scores, label)
    batch.update(scores[None], label[None])
    assert torch.equal(one.confusion, batch.confusion)
    reference = SegmentationMetric(4)
    reference.update(scores.argmax(0), label)
    assert torch.equal(one.confusion, reference.confusion)
    with pytest.raises(ValueError, match=r"expected \[N, 5, H, W\] or \[5, H, W\]"):
        SegmentationMetric(5).update(scores[None], label[None])
