"""Training diagnostics: their values on hand-made inputs, dense and class-parallel."""
import jax.numpy as jnp
import numpy as np
import pytest

from rice_jax import losses
from rice_jax.models.rice import batch_standardize
from rice_jax.sharding import make_mesh


def test_mean_pairwise_cosine_hand_made():
    e = np.eye(4, dtype=np.float32) * 3.0                       # orthogonal rows: 0
    assert abs(float(losses.mean_pairwise_cosine(jnp.asarray(e), jnp.ones(4, bool)))) < 1e-6
    same = np.tile([[1.0, 2.0, 2.0]], (5, 1)).astype(np.float32)  # identical rows: 1
    assert abs(float(losses.mean_pairwise_cosine(jnp.asarray(same), jnp.ones(5, bool))) - 1.0) < 1e-6
    # Two rows at 60 degrees plus a masked-out outlier that must not count.
    x = np.array([[1, 0], [0.5, np.sqrt(3) / 2], [-7, 3]], np.float32)
    got = float(losses.mean_pairwise_cosine(jnp.asarray(x), jnp.array([True, True, False])))
    assert abs(got - 0.5) < 1e-6
    # Against the brute-force mean over pairs i != j.
    r = np.random.default_rng(0).standard_normal((9, 5)).astype(np.float32)
    n = r / np.linalg.norm(r, axis=1, keepdims=True)
    g = n @ n.T
    want = (g.sum() - np.trace(g)) / (9 * 8)
    assert abs(float(losses.mean_pairwise_cosine(jnp.asarray(r), jnp.ones(9, bool))) - want) < 1e-5


def _hand_problem():
    # 3 classes along the axes of R^3; rows 0-2 sit on their class, row 3 on the wrong one, row 4 is padding.
    centers = np.eye(3, dtype=np.float32)
    feats = np.array([[1, 0, 0], [0, 2, 0], [0, 0, 1], [1, 0.1, 0], [5, 5, 5]], np.float32)
    labels = np.array([[0], [1], [2], [2], [-1]], np.int32)
    return feats, centers, labels


@pytest.mark.parametrize("use_mesh", [False, True])
def test_top1_and_cosines_hand_made(use_mesh):
    f, c, labels = _hand_problem()
    f8 = np.concatenate([f, np.zeros((3, 3), np.float32)])       # 8 rows so the 1x8 mesh divides the batch
    l8 = np.concatenate([labels, -np.ones((3, 1), np.int32)])
    _, aux = losses.margin_softmax_loss(jnp.asarray(f8), jnp.asarray(c), jnp.asarray(l8),
                                        mesh=make_mesh(1, 8) if use_mesh else None)
    assert abs(float(aux["top1_acc"]) - 3 / 4) < 1e-6           # rows 0-2 right, row 3 wrong
    cos3 = 0.1 / np.sqrt(1.01)                                  # row 3's cosine to its positive (class 2) is 0
    assert abs(float(aux["pos_cos_mean"]) - (3 * 1.0 + 0.0) / 4) < 1e-5
    # Negatives: rows 0-2 have cosine 0 to both other classes; row 3: (1/sqrt(1.01) + 0.1/sqrt(1.01)) / 2.
    want_neg = (0 + 0 + 0 + (1 / np.sqrt(1.01) + cos3) / 2) / 4
    assert abs(float(aux["neg_cos_mean"]) - want_neg) < 1e-5


def test_batch_standardize_ignores_invalid_rows():
    r = np.random.default_rng(1)
    x = r.standard_normal((4, 3, 6)).astype(np.float32) * 5 + 2
    valid = r.random((4, 3)) < 0.7
    x_bad = x.copy()
    x_bad[~valid] = 1e4                                          # padded rows must not move the statistics
    y = np.asarray(batch_standardize(jnp.asarray(x_bad), jnp.asarray(valid)))[valid]
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(y.std(0), 1.0, rtol=1e-3)
    ref = (x[valid] - x[valid].mean(0)) / np.sqrt(x[valid].var(0) + 1e-5)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
