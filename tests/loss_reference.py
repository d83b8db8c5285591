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


def partial_fc_reference(features, centers, labels, *, scale=64.0, margin=0.3, sampled=None):
    """insightface / unicom PartialFC with ArcFace, as their papers and README describe it, in float64:
    returns (loss, dloss/dfeatures, dloss/dcenters).

    Single-label rows (``labels [B]`` or ``[B, 1]``, −1 = ignored row). Logits are the cosines of
    the normalised features and the *sampled* centres (``sampled``: class ids; all classes when None;
    every row's label is in it, as PartialFC guarantees), clamped to [-1, 1]. The target logit is
    replaced by cos(arccos(c_y) + m) in place under ``no_grad``, so the margin changes the value but
    not the gradient; then all logits are multiplied by s and the loss is the softmax cross-entropy at
    the label, averaged over the rows that have one.
    """
    f = np.asarray(features, np.float64)
    c = np.asarray(centers, np.float64)
    y = np.asarray(labels).reshape(len(f), -1)[:, 0]
    cls = np.arange(len(c)) if sampled is None else np.asarray(sorted({int(j) for j in sampled}))
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    cn = c / np.linalg.norm(c, axis=1, keepdims=True)
    logits = np.clip(fn @ cn[cls].T, -1.0, 1.0)
    rows = np.flatnonzero(y >= 0)
    col = {int(j): i for i, j in enumerate(cls)}
    z = logits.copy()
    for i in rows:
        j = col[int(y[i])]
        z[i, j] = np.cos(np.arccos(logits[i, j]) + margin)   # value only
    z *= scale
    g_logits = np.zeros_like(z)
    total = 0.0
    for i in rows:
        j = col[int(y[i])]
        mx = z[i].max()
        p = np.exp(z[i] - mx)
        p /= p.sum()
        total += -np.log(p[j])
        onehot = np.zeros_like(p)
        onehot[j] = 1.0
        g_logits[i] = scale * (p - onehot)                    # straight through the margin
    n = max(len(rows), 1)
    g_cos = np.zeros((len(f), len(c)))
    g_cos[:, cls] = g_logits / n
    g_fn, g_cn = g_cos @ cn, g_cos.T @ fn

    def back(x, xn, g):
        nrm = np.linalg.norm(x, axis=1, keepdims=True)
        return (g - xn * np.sum(xn * g, axis=1, keepdims=True)) / nrm

    return total / n, back(f, fn, g_fn), back(c, cn, g_cn)
