"""Backbone features of boxes: the one sharded ROI extractor (clustering and evaluation use it).

A frozen ViT runs on a batch of images; the patch tokens after chosen blocks are
mean-pooled inside each box (:func:`rice_jax.models.region.roi_mean_pool`), and
optionally the model also runs as a RICE model whose last ``k`` blocks carry one
region token per box (the model's own region embedding). The batch is split over
every device of a data-parallel mesh; parameters are replicated.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rice_jax import errors, sharding, storage
from rice_jax.batch import CLIP_MEAN, CLIP_STD, model_pixels
from rice_jax.models import teachers
from rice_jax.models.region import box_patch_visibility, roi_align, roi_mean_pool
from rice_jax.models.rice import ROI_SEED_GRID, RICEConfig, RICEModel
from rice_jax.models.vit import ViT


def resolve_layer(layer: int, num_layers: int) -> int:
    """Index into the hidden states ``[embeddings, block 1, ..., block L]`` of an L-block model.

    ``0`` is the patch embedding (after the pre-LN), ``i`` the output of block
    ``i``; negative values count from the end (``-1`` = last block, ``-2`` = the
    penultimate block, i.e. what LLaVA-style users take).
    """
    idx = layer if layer >= 0 else num_layers + 1 + layer
    if not 0 <= idx <= num_layers:
        raise errors.InputError(f"--layer {layer} is outside [-{num_layers + 1}, {num_layers}] for a {num_layers}-block model")
    return idx


def _require_pixels(x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise errors.InputError(f"feature extraction takes uint8 RGB pixels (rice_jax.data.pipeline.image_input), "
                                f"got {x.dtype}: pass the image before normalising")
    return x


class RegionFeatures:
    """``features(x [B,H,W,3] uint8 pixels, boxes [B,N,4] normalised xyxy, valid [B,N])`` -> numpy dict:

    ``roi``: ``{str(layer index): [B, N, D]}``, plus with ``last_hidden`` ``"last"``, the model's
    ``last_hidden_state`` as ``transformers`` defines it for its family (MLCD, CLIP: the last block's
    output, the same as ``str(num_layers)``; SigLIP: after ``post_layernorm``), which is what
    clustering reads, and ``"region_token"`` for a RICE model or with ``region_layers``,
    ``tokens``: ``{str(layer index): [B, T, D]}`` when ``keep_tokens``, ``layout``:
    ``{str(layer index): [B, N, 8·D]}`` for each of ``layout_layers`` (the box's 2 x 4 RoIAlign
    samples, ``ROI_SEED_GRID``, the layout a ``region_seed='roi'`` token starts from, of the
    patch tokens, concatenated row-major: where in the box each feature sits, which
    the mean pool loses and reading a word needs), ``pooled``: ``[B, D]``
    (the model's ``pooler_output``: MLCD/CLIP's post-LN class token, SigLIP's attention-pooled
    head; the mean last token when a model has neither). Any B: batches are padded to a multiple
    of the device count. ``vit``: our MLCD ViT, a :mod:`rice_jax.models.teachers` tower, or a
    trained :class:`RICEModel` (``backbones.load(spec, regions=True)``), whose region tokens run
    with the settings and region parameters it was trained with.
    """

    def __init__(self, vit, image_size: int, *, layers: Sequence[int] = (-1,), region_layers: int = 0,
                 keep_tokens: bool = False, layout_layers: Sequence[int] = (), last_hidden: bool = False):
        rice = None
        if isinstance(vit, RICEModel):   # a trained RICE model: its own region settings and parameters
            rice, vit = vit, vit.backbone
        elif region_layers:              # a ViT read with the paper's parameter-free region tokens
            if not isinstance(vit, ViT):
                raise errors.InputError(f"region_layers={region_layers}: region tokens run on an MLCD/RICE "
                                        f"backbone, not on a {type(vit).__name__}")
            rice = RICEModel(RICEConfig(backbone=vit.cfg, region_layers=region_layers), rngs=nnx.Rngs(0), backbone=vit)
        self.num_layers = num_layers = vit.cfg.num_layers
        self.layers = sorted({resolve_layer(l, num_layers) for l in layers})
        layout_idxs = sorted({resolve_layer(l, num_layers) for l in layout_layers})
        self.image_size = image_size
        graphdef, state = nnx.split(rice if rice is not None else vit)
        # This process's devices: extraction is per-process work (each process reads its own records).
        self.mesh = sharding.make_mesh(data=-1, fsdp=1, devices=jax.local_devices())
        self._state = jax.device_put(state, sharding.replicated(self.mesh))
        gh, gw = vit.grid(image_size, image_size)
        idxs = self.layers
        n = vit.num_prefix_tokens            # class token (MLCD, CLIP) or none (SigLIP)
        # uint8 pixels are normalised on the device with the model's own statistics: CLIP's for MLCD
        # and CLIP, a teacher's from its config otherwise (SigLIP: 0.5/0.5).
        mean = getattr(vit.cfg, "pixel_mean", None)
        std = getattr(vit.cfg, "pixel_std", None)
        mean, std = (CLIP_MEAN, CLIP_STD) if mean is None or std is None else (mean, std)

        @jax.jit
        def fwd(state, x, boxes, valid):
            model = nnx.merge(graphdef, state)
            x = model_pixels(x, mean, std)
            # The models' own forwards. Patch features come from the plain ViT (what users export
            # and run; XLA drops the hidden states nobody reads); region tokens from the RICE model,
            # whose blocks before the region blocks are the same computation (XLA shares it).
            res = (model.backbone if rice is not None else model)(x, output_hidden_states=True)
            hidden = res.hidden_states
            vis = box_patch_visibility(boxes, valid, gh, gw)
            pooled = res.pooler_output if res.pooler_output is not None else jnp.mean(res.last_hidden_state[:, n:], 1)
            out = {"roi": {str(i): roi_mean_pool(hidden[i][:, n:], vis) for i in idxs}, "pooled": pooled}
            if last_hidden:
                out["roi"]["last"] = roi_mean_pool(res.last_hidden_state[:, n:], vis)
            if keep_tokens:
                out["tokens"] = {str(i): hidden[i][:, n:] for i in idxs}
            if layout_idxs:
                b, nb = boxes.shape[:2]
                out["layout"] = {str(i): roi_align(hidden[i][:, n:], boxes, gh, gw, *ROI_SEED_GRID).reshape(b, nb, -1)
                                 for i in layout_idxs}
            if rice is not None:  # no head, no batch-standardising: the post-LN region tokens
                out["roi"]["region_token"] = model.backbone.post_norm(model(x, boxes, valid).region_hidden)
            return out

        self._fwd = fwd

    def __call__(self, x: np.ndarray, boxes: np.ndarray, valid: np.ndarray) -> dict:
        _require_pixels(x)
        b = x.shape[0]
        pad = -b % self.mesh.size
        if pad:
            x, boxes, valid = (np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) for a in (x, boxes, valid))
        put = lambda a: jax.device_put(a, sharding.batch_sharding(self.mesh, a.ndim))
        out = self._fwd(self._state, put(np.asarray(x, np.uint8)), put(np.asarray(boxes, np.float32)),
                        put(np.asarray(valid, bool)))
        return jax.tree.map(lambda a: np.asarray(a)[:b], out)


class TransformersRegionFeatures:
    """ROI features from any Hugging Face vision encoder in a local folder (PyTorch, CPU or GPU):
    ``CLIPVisionModel``, ``SiglipVisionModel``, ``Dinov2Model``, ``MLCDVisionModel``, or a full
    ``CLIPModel``/``SiglipModel`` (its vision tower is used). The paper clustered CLIP region features.

    The encoder's last hidden state minus its prefix tokens (class / register tokens: whatever
    precedes the ``(H/p)·(W/p)`` patch tokens) is mean-pooled inside each box with the same
    visibility rule as ours (:func:`rice_jax.models.region.box_patch_visibility`). Pixels are
    normalised with the folder's ``preprocessor_config.json`` mean/std when present, CLIP's otherwise.
    """

    def __init__(self, path: str, image_size: int | None = None, device: str | None = None):
        import inspect
        import json
        import os

        import torch
        from transformers import AutoConfig, AutoModel

        local = storage.download_dir(path)
        model = AutoModel.from_pretrained(local)
        if hasattr(model, "vision_model") and not type(model).__name__.endswith("VisionModel"):
            model = model.vision_model
        cfg = AutoConfig.from_pretrained(local)
        cfg = getattr(cfg, "vision_config", cfg)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.eval().to(self.device)
        self.patch = int(cfg.patch_size if not isinstance(cfg.patch_size, (list, tuple)) else cfg.patch_size[0])
        self.image_size = image_size or int(cfg.image_size if not isinstance(cfg.image_size, (list, tuple))
                                            else cfg.image_size[0])
        if self.image_size % self.patch:
            raise errors.InputError(f"{path}: image size {self.image_size} is not a multiple of the patch size {self.patch}")
        self.dim = int(cfg.hidden_size)
        pre = os.path.join(local, "preprocessor_config.json")
        with open(os.path.join(local, "config.json")) as f:
            config = json.load(f)
        preprocessor = None
        if os.path.exists(pre):
            with open(pre) as f:
                preprocessor = json.load(f)
        mean, std = teachers.pixel_statistics(config, preprocessor)   # the JAX teacher's rule
        mean, std = (CLIP_MEAN, CLIP_STD) if mean is None else (mean, std)
        self._mean, self._std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        # At a size other than the one its position embeddings were trained at, CLIP and SigLIP
        # interpolate them only when asked (bicubic, as the JAX tower does); DINOv2 always does.
        native = int(cfg.image_size if not isinstance(cfg.image_size, (list, tuple)) else cfg.image_size[0])
        self._forward_kwargs = {}
        takes_flag = "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters
        if self.image_size != native and takes_flag:
            self._forward_kwargs["interpolate_pos_encoding"] = True

    def patch_tokens(self, x: np.ndarray, layer: int | None = None) -> np.ndarray:
        """``x [B,S,S,3]`` uint8 pixels -> patch tokens ``[B, (S/p)^2, D]`` of the last hidden state,
        or with ``layer`` of ``hidden_states[layer]`` (``0`` the embeddings, ``i`` block ``i``, negative
        from the end: the indexing of :func:`resolve_layer`)."""
        import torch

        x = (_require_pixels(x).astype(np.float32) / 255.0 - self._mean) / self._std
        with torch.no_grad():
            pix = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(self.device)
            out = self.model(pixel_values=pix, output_hidden_states=layer is not None, **self._forward_kwargs)
            hidden = (out.last_hidden_state if layer is None else out.hidden_states[layer]).float().cpu().numpy()
        gh, gw = x.shape[1] // self.patch, x.shape[2] // self.patch
        return hidden[:, hidden.shape[1] - gh * gw:]

    def __call__(self, x: np.ndarray, boxes: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """``x [B,S,S,3]`` uint8 pixels (as :func:`rice_jax.data.pipeline.image_input`) -> ``[B,N,D]``."""
        tokens = self.patch_tokens(x)
        gh, gw = x.shape[1] // self.patch, x.shape[2] // self.patch
        vis = np.asarray(box_patch_visibility(np.asarray(boxes, np.float32), np.asarray(valid, bool), gh, gw),
                         np.float32)
        return np.einsum("bnt,btd->bnd", vis, tokens) / np.maximum(vis.sum(-1, keepdims=True), 1.0)
