"""Semantic segmentation with a frozen encoder: the linear protocol, mIoU.

- Each image is resized whole to the encoder's ``S x S`` (no crop, no sliding window) and encoded
  once; the head reads the patch tokens at the probe layer.
- Head: per-patch standardisation (training-set statistics) and one linear layer to the classes:
  the linear protocol of DINOv2 / big_vision's linear segmentation probes, so the features, not a
  decoder, carry the result.
- Training: patch logits bilinearly resized to ``upsample x`` the patch grid, softmax
  cross-entropy against labels nearest-resized to that grid; ignored pixels (-1) weigh nothing.
- Evaluation at the original resolution: logits bilinearly resized to ``H x W``, arg-max, one
  confusion matrix per split -> mIoU over the classes present (and pixel accuracy).

ADE20K (``tfds:scene_parse150``): 150 classes, label 0 ("other") ignored; synthetic data: its 12
categories plus background (13 classes).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from rice_jax import errors
from rice_jax.data.pipeline import image_input
from rice_jax.downstream import common, metrics
from rice_jax.downstream.encoders import FrozenEncoder, encode_images


@dataclasses.dataclass(frozen=True)
class SemSegConfig:
    upsample: int = 4
    train: common.HeadTraining = common.HeadTraining(steps=1000, batch_size=16, learning_rate=1e-3)


class LinearSegHead(nnx.Module):
    """``[B, gh, gw, D]`` -> class logits ``[B, C, gh*r, gw*r]`` (standardise, linear, bilinear)."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, num_classes: int, grid, upsample: int, rngs: nnx.Rngs):
        self.mean, self.std = nnx.Variable(jnp.asarray(mean)), nnx.Variable(jnp.asarray(std))
        self.linear = nnx.Linear(len(mean), num_classes, rngs=rngs)
        gh, gw = grid
        self.rh = nnx.Variable(jnp.asarray(common.bilinear_matrix(gh * upsample, gh)))
        self.rw = nnx.Variable(jnp.asarray(common.bilinear_matrix(gw * upsample, gw)))

    def patch_logits(self, patches):
        x = (patches.astype(jnp.float32) - self.mean[...]) / self.std[...]
        return jnp.moveaxis(self.linear(x), -1, 1)                 # [B, C, gh, gw]

    def __call__(self, patches):
        return jnp.einsum("Hh,bchw,Ww->bcHW", self.rh[...], self.patch_logits(patches), self.rw[...])


def loss_fn(head: LinearSegHead, batch) -> jax.Array:
    logits = head(batch["patches"])
    labels = batch["labels"]
    keep = labels >= 0
    logp = jax.nn.log_softmax(logits, axis=1)
    nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[:, None], axis=1)[:, 0]
    return jnp.sum(nll * keep) / jnp.maximum(keep.sum(), 1)


def _labels_at(labels: np.ndarray, h: int, w: int) -> np.ndarray:
    """A label map nearest-resized to ``h x w`` (ignore -1 kept)."""
    return np.asarray(Image.fromarray((labels + 1).astype(np.int32)).resize((w, h), Image.NEAREST), np.int64) - 1


def run(encoder: FrozenEncoder, source, *, train_split: str = "train", eval_splits=None,
        cfg: SemSegConfig = SemSegConfig(), train_images: int | None = None, eval_images: int | None = None,
        log=print) -> dict:
    t0 = time.perf_counter()
    quiet = log is None            # None: no log lines, no progress bars
    log = log or (lambda s: None)
    gh, gw = encoder.grid
    oh, ow = gh * cfg.upsample, gw * cfg.upsample
    images, labels = [], []
    for img, lab in source.examples("semantic", train_split, train_images):
        images.append(image_input(img, encoder.image_size))
        labels.append(_labels_at(lab, oh, ow).astype(np.int16))
    if not images:
        raise errors.InputError(f"{type(source).__name__}: split {train_split!r} has no labelled image")
    feats = encode_images(encoder, images, progress=None if quiet else "encoding (train)")["patches"]
    labels = np.stack(labels)
    flat = feats.reshape(-1, feats.shape[-1]).astype(np.float32)
    mean, std = flat.mean(0), flat.std(0) + 1e-6
    head = LinearSegHead(mean, std, source.num_classes, (gh, gw), cfg.upsample, nnx.Rngs(cfg.train.seed))
    log(f"semseg: {len(images)} train images, {source.num_classes} classes, features {feats.shape[1:]} -> {oh}x{ow}")
    losses = common.train_head(head, loss_fn, lambda idx: {"patches": feats[idx], "labels": labels[idx]},
                               len(images), cfg.train, log=None if quiet else log)
    predict = jax.jit(lambda mean, std, w, b, p: jnp.moveaxis(((p.astype(jnp.float32) - mean) / std) @ w + b, -1, 1))
    params = (head.mean[...], head.std[...], head.linear.kernel[...], head.linear.bias[...])
    results = {}
    for split in eval_splits or [s for s in source.splits if s != train_split]:
        acc = metrics.SemanticIoU(source.num_classes, ignore_index=-1)
        for chunk in common.chunks(source.examples("semantic", split, eval_images), 64):
            ev = encode_images(encoder, [image_input(img, encoder.image_size) for img, _ in chunk])["patches"]
            logits = np.asarray(predict(*params, jnp.asarray(ev)))
            for lg, (_, lab) in zip(logits, chunk):      # at the original resolution
                acc.update(common.upsample(lg, *lab.shape).argmax(0)[None], lab[None])
        if acc.confusion.sum():
            res = acc.result()
            results[split] = {k: res[k] for k in ("miou", "pixel_acc", "classes_present")}
            log(f"semseg {split}: mIoU {res['miou']:.4f}, pixel accuracy {res['pixel_acc']:.4f}")
    return {"task": "semseg", "splits": results, "train_images": len(images), "num_classes": source.num_classes,
            "head_loss": losses, "skipped": dict(source.skipped), "seconds": time.perf_counter() - t0,
            "config": dataclasses.asdict(cfg)}
