"""Semantic segmentation metrics as mmsegmentation's ``IoUMetric`` reports them.

Per class, over the whole dataset: intersection = pixels predicted c where the label is c; union =
pixels predicted c or labelled c; pixels labelled ``ignore_index`` count nowhere. Then

* IoU_c = intersection_c / union_c, mIoU = mean over classes with a non-empty union (NaN classes are
  left out, as ``np.nanmean`` in mmseg);
* Acc_c = intersection_c / label_c, mAcc their mean; aAcc = all correct pixels / all labelled pixels.

Accumulated as a confusion matrix (one ``bincount`` per batch), on the device of the predictions.
"""
from __future__ import annotations

import torch
from torch import Tensor


class SegmentationMetric:
    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion: Tensor | None = None  # [label, prediction] pixel counts

    def update(self, pred: Tensor, label: Tensor) -> None:
        """``pred``: class indices (any shape) or scores [N, C, H, W] (or one image's [C, H, W]) with C =
        ``num_classes``; ``label``: indices of the same shape as the indices (values ``ignore_index`` skipped)."""
        if pred.dim() == label.dim() + 1:
            # the class axis is the one the label lacks: 1 for a batch, 0 for one image
            axis = 1 if pred.dim() == 4 else 0
            if pred.shape[axis] != self.num_classes or \
                    tuple(pred.shape[:axis]) + tuple(pred.shape[axis + 1:]) != tuple(label.shape):
                raise ValueError(f"scores of shape {tuple(pred.shape)} for labels of shape {tuple(label.shape)}: "
                                 f"expected [N, {self.num_classes}, H, W] or [{self.num_classes}, H, W]")
            pred = pred.argmax(axis)
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}")
        label = label.long()
        valid = label != self.ignore_index
        bad = label[valid & ((label < 0) | (label >= self.num_classes))]
        if bad.numel():
            raise ValueError(f"label value {int(bad[0])} is neither a class (0..{self.num_classes - 1}) nor "
                             f"ignore_index={self.ignore_index}")
        pred = pred.long()
        bad = pred[valid & ((pred < 0) | (pred >= self.num_classes))]
        if bad.numel():  # else e.g. 255 with 150 classes would land in another cell of the matrix
            raise ValueError(f"prediction value {int(bad[0])} is not a class (0..{self.num_classes - 1})")
        k = self.num_classes
        counts = torch.bincount(label[valid] * k + pred[valid], minlength=k * k).reshape(k, k)
        self.confusion = counts if self.confusion is None else self.confusion + counts

    def compute(self) -> dict[str, float | list[float]]:
        """``{"mIoU", "mAcc", "aAcc"}`` in percent and per-class ``"IoU"``/``"Acc"`` lists (NaN: class absent)."""
        if self.confusion is None:
            raise RuntimeError("SegmentationMetric.compute() before any update()")
        conf = self.confusion.double()
        intersect = conf.diag()
        area_label, area_pred = conf.sum(1), conf.sum(0)
        union = area_label + area_pred - intersect
        iou = intersect / union      # 0/0 -> NaN: a class neither predicted nor present
        acc = intersect / area_label
        return {"mIoU": 100 * float(iou.nanmean()), "mAcc": 100 * float(acc.nanmean()),
                "aAcc": 100 * float(intersect.sum() / area_label.sum()),
                "IoU": (100 * iou).tolist(), "Acc": (100 * acc).tolist()}
