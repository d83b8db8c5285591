"""The batch contract: what one training batch holds, in one place (docs/design.md §3.2).

The input pipeline produces it, the train step and the loss consume it, the planner and the
benchmarks build abstract or random stand-ins for it: all of them read the keys, shapes, dtypes
and region kinds from here, so a change to the contract is one edit. Storage (the record schema
in :mod:`rice_jax.data.records`) uses the same kind codes, imported from this module.

Per batch of ``B`` images, ``N`` region slots, ``M`` label columns:

=================  ===============  =========  ==================================================
key                shape            dtype      meaning
=================  ===============  =========  ==================================================
``image``          ``[B,S,S,3]``    uint8      RGB pixels (normalised in the step: :func:`model_pixels`)
``boxes``          ``[B,N,4]``      float32    xyxy, normalised to the model input
``region_valid``   ``[B,N]``        bool       slot holds a region (padding otherwise)
``region_kind``    ``[B,N]``        int32      :data:`KIND_OBJECT` or :data:`KIND_TEXT`
``labels``         ``[B,N,M]``      int32      object: cluster in column 0; text: token ids; −1 pad
``image_ok``       ``[B]``          bool       image decoded (False: no valid region, counted)
=================  ===============  =========  ==================================================

Those are the :data:`TRAIN_KEYS` the jitted step takes. The pipeline adds bookkeeping keys the
step never sees (:data:`INFO_KEYS`): ``category [B,N]`` (ground truth, −1 unknown; evaluation),
``region_index [B,N]`` (index in the record, −1 pad), ``image_index [B]`` (global record index)
and ``image_id [B]`` (str).
"""
from __future__ import annotations

import numpy as np

# Region kinds: the same codes in the stored records, the batch and the loss.
KIND_OBJECT, KIND_TEXT = 0, 1
KIND_NAMES = {KIND_OBJECT: "object", KIND_TEXT: "text"}

TRAIN_KEYS = ("image", "boxes", "region_valid", "region_kind", "labels", "image_ok")
INFO_KEYS = ("category", "region_index", "image_index", "image_id")


# The one image normalisation of the code base: CLIP mean/std (what MLCD/RICE use; a teacher trained
# with other statistics, e.g. SigLIP's 0.5/0.5, passes its own to model_pixels).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def model_pixels(image, mean=CLIP_MEAN, std=CLIP_STD):
    """uint8 RGB pixels ``[..., 3]`` -> the float32 model input ``(pixel / 255 - mean) / std``.

    Runs inside the jitted step (and the feature extractors), so what crosses from host to device is
    the pipeline's uint8 image: 1 byte per channel instead of 4. A float input is taken as already
    normalised and passed through (callers that build model inputs themselves)."""
    import jax.numpy as jnp

    if jnp.issubdtype(image.dtype, jnp.floating):
        return image
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    return (image.astype(jnp.float32) * (1.0 / 255.0) - mean) / std


def train_shapes(batch: int, image_size: int, num_regions: int, max_labels: int) -> dict:
    """``{key: (shape, numpy dtype)}`` of the :data:`TRAIN_KEYS` for a batch of ``batch`` images."""
    b, s, n, m = batch, image_size, num_regions, max_labels
    return {"image": ((b, s, s, 3), np.uint8), "boxes": ((b, n, 4), np.float32),
            "region_valid": ((b, n), np.bool_), "region_kind": ((b, n), np.int32),
            "labels": ((b, n, m), np.int32), "image_ok": ((b,), np.bool_)}


def empty_example(image_size: int, num_regions: int, max_labels: int, index: int = 0) -> dict:
    """One example of the pipeline's output with no region and no image (``image_ok`` False): what a
    record contributes before (or instead of, when its image is unreadable) being filled in."""
    out = {k: np.zeros(shape[1:], dt) for k, (shape, dt) in train_shapes(1, image_size, num_regions,
                                                                          max_labels).items()}
    out["labels"][:] = -1
    out.update(category=np.full(num_regions, -1, np.int32), region_index=np.full(num_regions, -1, np.int32),
               image_index=np.int64(index), image_id="")
    return out


def abstract_batch(batch: int, image_size: int, num_regions: int, max_labels: int, shardings: dict) -> dict:
    """The :data:`TRAIN_KEYS` as ``jax.ShapeDtypeStruct`` with ``shardings[key]``: what ahead-of-time
    compilation (``rice_jax.preflight.plan``) lowers the train step with, instead of a real batch."""
    import jax

    return {k: jax.ShapeDtypeStruct(shape, dt, sharding=shardings[k])
            for k, (shape, dt) in train_shapes(batch, image_size, num_regions, max_labels).items()}


def random_batch(batch: int, image_size: int, num_regions: int, max_labels: int, num_labels: int,
                 seed: int = 0) -> dict:
    """A per-process batch of the :data:`TRAIN_KEYS` with random content (every slot valid, ~30 %
    text): timing the train step without the input pipeline (benchmarks)."""
    r = np.random.default_rng(seed)
    lo = r.uniform(0, 0.6, (batch, num_regions, 2))
    out = {"image": r.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8),
           "boxes": np.concatenate([lo, lo + 0.3], -1).clip(0, 1).astype(np.float32),
           "region_valid": np.ones((batch, num_regions), bool),
           "region_kind": np.where(r.random((batch, num_regions)) < 0.3, KIND_TEXT, KIND_OBJECT).astype(np.int32),
           "labels": r.integers(0, num_labels, (batch, num_regions, max_labels)).astype(np.int32),
           "image_ok": np.ones(batch, bool)}
    check(out, batch, image_size, num_regions, max_labels)
    return out


def check(batch_dict: dict, batch: int, image_size: int, num_regions: int, max_labels: int) -> None:
    """Raise a ValueError naming the first key that is missing or off the contract."""
    for k, (shape, dt) in train_shapes(batch, image_size, num_regions, max_labels).items():
        if k not in batch_dict:
            raise ValueError(f"batch has no {k!r} (the train step needs {TRAIN_KEYS})")
        a = np.asarray(batch_dict[k])
        if a.shape != shape or a.dtype != dt:
            raise ValueError(f"batch[{k!r}] is {a.dtype}{list(a.shape)}, the contract says "
                             f"{np.dtype(dt)}{list(shape)}")
