"""rice_jax.downstream: metrics against hand-computed values."""
import numpy as np
import pytest

from rice_jax.downstream.metrics import ReferringIoU, SemanticIoU


def _mask(h, w, cells):
    m = np.zeros((h, w), bool)
    for r, c in cells:
        m[r, c] = True
    return m


def test_ciou_and_giou_by_hand():
    # Expression 1: pred 4 px, target 2 px inside it -> I 2, U 4, IoU 0.5.
    # Expression 2: pred 1 px, target 3 px, overlap 1 -> I 1, U 3, IoU 1/3.
    # Expression 3: both empty -> counts as IoU 1, adds nothing to the cumulative sums.
    p1, g1 = _mask(3, 3, [(0, 0), (0, 1), (1, 0), (1, 1)]), _mask(3, 3, [(0, 0), (1, 1)])
    p2, g2 = _mask(3, 3, [(2, 2)]), _mask(3, 3, [(2, 0), (2, 1), (2, 2)])
    p3 = g3 = np.zeros((3, 3), bool)
    m = ReferringIoU()
    m.update(np.stack([p1, p2]), np.stack([g1, g2]))
    m.update(p3[None], g3[None])                        # batching does not matter
    r = m.result()
    assert r["ciou"] == pytest.approx(3 / 7)            # (2 + 1) / (4 + 3)
    assert r["giou"] == pytest.approx((0.5 + 1 / 3 + 1) / 3)
    assert r["expressions"] == 3
    one = ReferringIoU()
    one.update(np.stack([p1, p2, p3]), np.stack([g1, g2, g3]))
    assert one.result() == r


def test_miou_by_hand_with_ignored_pixels():
    target = np.array([[0, 0, 1], [1, 2, -1]])
    pred = np.array([[0, 1, 1], [1, 0, 2]])
    m = SemanticIoU(num_classes=4, ignore_index=-1)
    m.update(pred[None], target[None])
    r = m.result()
    # class 0: I 1 (0,0), U = target{(0,0),(0,1),} + pred{(0,0),(1,1)} -> {(0,0),(0,1),(1,1)} = 3 -> 1/3
    # class 1: I 2 {(0,2),(1,0)}, U {(0,1),(0,2),(1,0)} = 3 -> 2/3
    # class 2: I 0, U {(1,1)} = 1 -> 0; class 3: absent everywhere -> not averaged
    assert r["per_class_iou"][:3] == pytest.approx([1 / 3, 2 / 3, 0.0]) and r["per_class_iou"][3] is None
    assert r["miou"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert r["pixel_acc"] == pytest.approx(3 / 5) and r["classes_present"] == 3
    with pytest.raises(ValueError, match="outside"):
        m.update(np.array([[5]]), np.array([[0]]))
