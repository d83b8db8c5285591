"""Plain numpy (float64) reference of the margin-softmax loss and its analytic gradient.

Written independently of rice_jax.losses: explicit per-row Python sets for the
positive and negative classes, no log-sum-exp tricks beyond a max shift.
"""
from __future__ import annotations

import numpy as np


def _phi(c, m, kind):
    if kind == "arcface":
        c = np.clip(c, -1 + 1e-6, 1 - 1e-6)
        th = np.arccos(c)
        return np.cos(th + m), np.sin(th + m) / np.sqrt(1 - c * c)
    return c - m, np.ones_like(c)


def _log1p_sumexp(z):
    """log(1 + Σ exp(z)) and the softmax weights exp(z)/(1 + Σ exp(z))."""
    if z.size == 0:
        return 0.0, z
    mx = max(0.0, z.max())
    e = np.exp(z - mx)
    denom = np.exp(-mx) + e.sum()
    return mx + np.log(denom), e / denom


def reference_loss(features, centers, labels, *, scale=64.0, margin=0.3, margin_type="arcface",
                   negatives=None, num_classes=None):
    """Returns (loss, dloss/dfeatures, dloss/dcenters).

    ``negatives``: optional per-row iterable of allowed negative classes (the
    PartialFC sample); default all classes < num_classes that are not positives.
    """
    f = np.asarray(features, np.float64)
    c = np.asarray(centers, np.float64)
    labels = np.asarray(labels)
    k = c.shape[0] if num_classes is None else num_classes
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    cn = c / np.linalg.norm(c, axis=1, keepdims=True)
    cos = fn @ cn.T
    g_cos = np.zeros_like(cos)
    rows = [i for i in range(len(f)) if (labels[i] >= 0).any()]
    total = 0.0
    for i in rows:
        pos = sorted({int(x) for x in labels[i] if x >= 0})
        cand = range(k) if negatives is None else negatives[i]
        neg = sorted(set(int(j) for j in cand) - set(pos))
        phi, dphi = _phi(cos[i, pos], margin, margin_type)
        lp, wp = _log1p_sumexp(-scale * phi)
        ln, wn = _log1p_sumexp(scale * cos[i, neg])
        total += lp + ln
        g_cos[i, pos] += -scale * dphi * wp
        g_cos[i, neg] += scale * wn
    n = max(len(rows), 1)
    g_cos /= n
    g_fn = g_cos @ cn
    g_cn = g_cos.T @ fn

    def back(x, xn, g):
        nrm = np.linalg.norm(x, axis=1, keepdims=True)
        return (g - xn * np.sum(xn * g, axis=1, keepdims=True)) / nrm

    return total / n, back(f, fn, g_fn), back(c, cn, g_cn)
