"""Segmentation metrics as the downstream literature reports them, accumulated batch by batch.

- **cIoU** (referring segmentation, LISA / ReLA): cumulative intersection over cumulative union,
  ``sum_i |P_i ∩ G_i| / sum_i |P_i ∪ G_i|`` over every expression of a split — large objects weigh
  more. **gIoU**: the mean of the per-expression IoUs, an empty prediction of an empty target
  counting as 1 (every expression weighs the same).
- **mIoU** (semantic segmentation, ADE20K): per class, intersection over union summed over the whole
  split (a confusion matrix), averaged over the classes present in the targets or predictions;
  pixels labelled ``ignore_index`` count nowhere.

Accumulators hold integer counts only (int64), so a split of any size is one pass with constant
memory and the result does not depend on how the split was batched.
"""
from __future__ import annotations

import numpy as np


class ReferringIoU:
    """Accumulates cIoU and gIoU over binary masks ``pred, target [B, H, W]`` (bool or 0/1)."""

    def __init__(self):
        self.intersection = 0
        self.union = 0
        self.iou_sum = 0.0
        self.count = 0

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        pred, target = np.asarray(pred).astype(bool), np.asarray(target).astype(bool)
        if pred.shape != target.shape:
            raise ValueError(f"prediction {pred.shape} and target {target.shape} differ")
        axes = tuple(range(1, pred.ndim))
        inter = np.logical_and(pred, target).sum(axes, dtype=np.int64)
        union = np.logical_or(pred, target).sum(axes, dtype=np.int64)
        self.intersection += int(inter.sum())
        self.union += int(union.sum())
        self.iou_sum += float(np.where(union > 0, inter / np.maximum(union, 1), 1.0).sum())
        self.count += len(inter)

    def result(self) -> dict:
        return {"ciou": self.intersection / self.union if self.union else 1.0,
                "giou": self.iou_sum / self.count if self.count else float("nan"), "expressions": self.count}


class SemanticIoU:
    """Accumulates a ``num_classes x num_classes`` confusion matrix over label maps ``[B, H, W]``."""

    def __init__(self, num_classes: int, ignore_index: int = -1):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = np.zeros((num_classes, num_classes), np.int64)   # [target, prediction]

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        pred, target = np.asarray(pred, np.int64).ravel(), np.asarray(target, np.int64).ravel()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        bad = (target < 0) | (target >= self.num_classes) | (pred < 0) | (pred >= self.num_classes)
        if bad.any():
            raise ValueError(f"labels outside [0, {self.num_classes}) (and not ignore_index {self.ignore_index})")
        self.confusion += np.bincount(target * self.num_classes + pred,
                                      minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)

    def result(self) -> dict:
        c = self.confusion
        inter = np.diag(c).astype(np.float64)
        union = c.sum(0) + c.sum(1) - np.diag(c)
        present = union > 0
        iou = np.where(present, inter / np.maximum(union, 1), np.nan)
        return {"miou": float(np.nanmean(iou)) if present.any() else float("nan"),
                "pixel_acc": float(inter.sum() / max(c.sum(), 1)), "classes_present": int(present.sum()),
                "per_class_iou": [None if np.isnan(v) else float(v) for v in iou]}
