"""Region classification with a frozen encoder: ground-truth boxes -> ROI features -> linear probe.

Each image is resized whole to ``S x S``; every ground-truth box (crowd boxes excluded) becomes one
feature: the probe layer's patch tokens mean-pooled inside the box (the visibility rule of
:func:`rice_jax.models.region.box_patch_visibility`), and, for a RICE model, its own region token
as well. A standardised multinomial logistic regression (the probe of :mod:`rice_jax.evaluate`) is
fitted on the training split; top-1 accuracy on every other split. COCO: 80 categories.
"""
from __future__ import annotations

import time

import numpy as np

from rice_jax import errors
from rice_jax.data.pipeline import image_input
from rice_jax.downstream.encoders import FrozenEncoder, encode_images
from rice_jax.evaluate import _linear_probe


def _features(encoder, source, split, limit):
    images, boxes, labels = [], [], []
    for img, b, c in source.examples("regions", split, limit):
        images.append(image_input(img, encoder.image_size))
        boxes.append(np.clip(b / np.array([img.width, img.height] * 2, np.float32), 0, 1))
        labels.append(c)
    if not images:
        return None, None
    out = encode_images(encoder, images, boxes)
    feats = {k: np.concatenate(out[k]) for k in ("roi", "region_token") if k in out}
    return feats, np.concatenate(labels)


def run(encoder: FrozenEncoder, source, *, train_split: str = "train", eval_splits=None,
        train_images: int | None = None, eval_images: int | None = None, log=print) -> dict:
    t0 = time.perf_counter()
    quiet = log is None            # None: no log lines, no progress bars
    log = log or (lambda s: None)
    xtr, ytr = _features(encoder, source, train_split, train_images)
    if xtr is None:
        raise errors.InputError(f"{type(source).__name__}: split {train_split!r} has no categorised box")
    log(f"regcls: {len(ytr)} train regions, {len(np.unique(ytr))} categories")
    results = {}
    for split in eval_splits or [s for s in source.splits if s != train_split]:
        xte, yte = _features(encoder, source, split, eval_images)
        if xte is None:
            continue
        res = {"regions": int(len(yte))}
        for key in xtr:                 # "roi" (mean-pooled patch tokens); "region_token" (RICE models)
            pred, _, _ = _linear_probe(xtr[key], ytr, xte[key])
            res["top1" if key == "roi" else "region_token_top1"] = float(np.mean(pred == yte))
        results[split] = res
        log(f"regcls {split}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items() if isinstance(v, float)))
    return {"task": "regcls", "splits": results, "train_regions": int(len(ytr)), "skipped": dict(source.skipped),
            "seconds": time.perf_counter() - t0}
