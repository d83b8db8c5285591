"""A frozen encoder for the downstream heads, whatever the backbone: one call, the same outputs.

``FrozenEncoder(spec)`` takes every backbone spec the project knows (:mod:`rice_jax.backbones`):
``ckpt:RUN`` (a RICE run is read as its RICE model, so its region tokens come too), ``hf:DIR``
(MLCD / RICE weights, or a CLIP / SigLIP folder, which runs as our JAX teacher tower), ``hub:ID``;
plus ``transformers:DIR`` for any other Hugging Face vision encoder in a local folder (DINOv2, ...)
run in PyTorch (``layer`` indexes its ``hidden_states`` the same way: for an MLCD folder both paths
give the same patch tokens, which the tests check). A model object (an untrained ``RICEModel`` for the random-init row) is accepted too.

``encoder(x [B,S,S,3] uint8, boxes [B,N,4] normalised xyxy, valid [B,N])`` returns numpy

- ``patches`` ``[B, gh, gw, D]``: patch tokens at ``layer`` (default the penultimate block, what the
  project's probes and LLaVA-style users read), the input of the segmentation heads;
- ``roi`` ``[B, N, D]``: those tokens mean-pooled inside each box (region classification);
- ``region_token`` ``[B, N, D]``: the post-LN region tokens of a RICE model (absent otherwise).

The encoder is frozen: the heads train on its outputs, never through it, so features are computed
once per image and cached by the task (:func:`encode_images`).
"""
from __future__ import annotations

import numpy as np

from rice_jax import backbones
from rice_jax.evaluate import DEFAULT_LAYER
from rice_jax.labelling.features import RegionFeatures, TransformersRegionFeatures, resolve_layer
from rice_jax.models.region import box_patch_visibility


class FrozenEncoder:
    def __init__(self, spec, image_size: int | None = None, layer: int = DEFAULT_LAYER):
        self.spec = spec if isinstance(spec, str) else type(spec).__name__
        self.layer = layer
        source = backbones.parse(spec, what="--backbone") if isinstance(spec, str) else None
        if source is not None and source.scheme == "transformers":
            self._hf = TransformersRegionFeatures(source.where, image_size)
            self.image_size, self.patch = self._hf.image_size, self._hf.patch
            self.grid = (self.image_size // self.patch,) * 2
            self.dim = self._hf.dim
            self.region_tokens = False
            return
        self._hf = None
        model = backbones.load(spec, regions=True) if isinstance(spec, str) else spec
        vit = getattr(model, "backbone", model)
        self.image_size = image_size or int(getattr(vit.cfg, "image_size"))
        self.grid = tuple(vit.grid(self.image_size, self.image_size))
        self.dim = int(vit.cfg.hidden_size)
        self.region_tokens = vit is not model
        self._key = str(resolve_layer(layer, vit.cfg.num_layers))
        self._feats = RegionFeatures(model, self.image_size, layers=(layer,), keep_tokens=True)

    def __call__(self, x: np.ndarray, boxes: np.ndarray, valid: np.ndarray) -> dict:
        b = x.shape[0]
        gh, gw = self.grid
        if self._hf is not None:
            tokens = self._hf.patch_tokens(x, self.layer)
            vis = np.asarray(box_patch_visibility(np.asarray(boxes, np.float32), np.asarray(valid, bool), gh, gw),
                             np.float32)
            roi = np.einsum("bnt,btd->bnd", vis, tokens) / np.maximum(vis.sum(-1, keepdims=True), 1.0)
            return {"patches": tokens.reshape(b, gh, gw, -1), "roi": roi}
        out = self._feats(x, boxes, valid)
        res = {"patches": out["tokens"][self._key].reshape(b, gh, gw, -1), "roi": out["roi"][self._key]}
        if "region_token" in out["roi"]:
            res["region_token"] = out["roi"]["region_token"]
        return res


def encode_images(encoder: FrozenEncoder, images, boxes=None, batch_size: int = 32, dtype=np.float16,
                  progress: str | None = None) -> dict:
    """Run the frozen encoder over ``images`` (a sequence of ``[S,S,3]`` uint8) once.

    ``boxes``: per image an ``[n_i, 4]`` normalised xyxy array (or None: patch features only).
    Returns ``patches [I, gh, gw, D]`` (``dtype``: float16 halves the cache, the heads compute in
    float32) and, with boxes, ``roi`` / ``region_token`` as lists of ``[n_i, D]`` float32 arrays.
    Memory: ``I * gh * gw * D * 2`` bytes -- 10K images of a ViT-L/14 at 336 px are 11.8 GB;
    subsample with the task's ``train_images`` on a smaller host.
    """
    n = len(images)
    patches = None
    per_box = {}
    it = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=progress, unit="batch", leave=False)
    for s in it:
        x = np.stack(images[s:s + batch_size])
        b = len(x)
        nb = [len(boxes[i]) for i in range(s, s + b)] if boxes is not None else [0] * b
        m = max(max(nb), 1)
        bx, valid = np.zeros((b, m, 4), np.float32), np.zeros((b, m), bool)
        for j in range(b):
            if nb[j]:
                bx[j, :nb[j]], valid[j, :nb[j]] = boxes[s + j], True
        out = encoder(x, bx, valid)
        if patches is None:
            patches = np.zeros((n,) + out["patches"].shape[1:], dtype)
        patches[s:s + b] = out["patches"]
        if boxes is not None:
            for key in ("roi", "region_token"):
                if key in out:
                    per_box.setdefault(key, []).extend(np.asarray(out[key][j, :nb[j]], np.float32) for j in range(b))
    return {"patches": patches, **per_box}
