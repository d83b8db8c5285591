"""Hugging Face / PyTorch conversion of the backbone (docs/design.md §3, §4): the layer below the loaders.

``load_hf(dir)`` builds our JAX :class:`ViT` from a local ``MLCDVisionModel``
directory (``config.json`` + safetensors, sharded or not, keys with or without
the ``vision_model.`` prefix of older checkpoints); ``save_hf(model, dir)``
writes one that ``transformers.MLCDVisionModel.from_pretrained`` loads with no
missing or unexpected keys. Only the backbone is exported: RICE heads, region
tokens and centres are training-only.

Users load weights through :func:`rice_jax.backbones.load` (``hf:DIR``, ``ckpt:DIR``, ``hub:ID``)
and export them with the command ``python -m rice_jax.export --from SPEC --to-hf OUT``; this
module is the key mapping and file format both of them use.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rice_jax import errors, storage
from rice_jax.models import teachers
from rice_jax.models.config import ViTConfig
from rice_jax.models.vit import ViT

HF_PREFIX = "vision_model."
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_STATE_DICT = "pytorch_model.bin"


class CheckpointMismatchError(errors.InputError):
    """A checkpoint whose keys or shapes do not match the configured model."""


# ----------------------------------------------------------------------------- key mapping
def _backbone(model) -> ViT:
    """The ViT inside ``model`` (a ViT itself or a RICE model that wraps one)."""
    vit = getattr(model, "backbone", model)
    if not isinstance(vit, ViT):
        raise TypeError(f"expected a ViT or a model with a .backbone ViT, got {type(model).__name__}")
    return vit


def vit_to_hf_state(model) -> dict[str, np.ndarray]:
    """Our parameters as an HF ``MLCDVisionModel`` state dict (fp32 numpy, ``[out, in]`` linears)."""
    vit = _backbone(model)
    cfg = vit.cfg
    d, h, dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    a = lambda p: np.asarray(jax.device_get(p[...]), dtype=np.float32)
    out = {
        "class_pos_emb": a(vit.class_pos_emb),
        "embeddings.class_embedding": a(vit.class_embedding),
        "embeddings.patch_embedding.weight": a(vit.patch_kernel).transpose(3, 2, 0, 1),
        "pre_layrnorm.weight": a(vit.pre_norm.scale),
        "pre_layrnorm.bias": a(vit.pre_norm.bias),
        "post_layernorm.weight": a(vit.post_norm.scale),
        "post_layernorm.bias": a(vit.post_norm.bias),
    }
    for i, blk in enumerate(vit.blocks):
        pre = f"encoder.layers.{i}."
        qkv_w, qkv_b = a(blk.attn.qkv_kernel), a(blk.attn.qkv_bias)
        for s, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[pre + f"self_attn.{name}.weight"] = qkv_w[:, s].reshape(d, h * dh).T
            out[pre + f"self_attn.{name}.bias"] = qkv_b[s].reshape(h * dh)
        out[pre + "self_attn.out_proj.weight"] = a(blk.attn.out_kernel).reshape(h * dh, d).T
        out[pre + "self_attn.out_proj.bias"] = a(blk.attn.out_bias)
        for ln, ours in (("layer_norm1", blk.norm1), ("layer_norm2", blk.norm2)):
            out[pre + f"{ln}.weight"] = a(ours.scale)
            out[pre + f"{ln}.bias"] = a(ours.bias)
        out[pre + "mlp.fc1.weight"] = a(blk.mlp.fc1_kernel).T
        out[pre + "mlp.fc1.bias"] = a(blk.mlp.fc1_bias)
        out[pre + "mlp.fc2.weight"] = a(blk.mlp.fc2_kernel).T
        out[pre + "mlp.fc2.bias"] = a(blk.mlp.fc2_bias)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def vit_to_hf_state_abstract(vit: ViT) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of :func:`vit_to_hf_state` without touching any data."""
    cfg = vit.cfg
    d, f, p, c, dh = cfg.hidden_size, cfg.intermediate_size, cfg.patch_size, cfg.num_channels, cfg.head_dim
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    out = {
        "class_pos_emb": s(1, dh // 2), "embeddings.class_embedding": s(d),
        "embeddings.patch_embedding.weight": s(d, c, p, p),
        "pre_layrnorm.weight": s(d), "pre_layrnorm.bias": s(d),
        "post_layernorm.weight": s(d), "post_layernorm.bias": s(d),
    }
    for i in range(cfg.num_layers):
        pre = f"encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[pre + f"self_attn.{name}.weight"] = s(d, d)
            out[pre + f"self_attn.{name}.bias"] = s(d)
        for ln in ("layer_norm1", "layer_norm2"):
            out[pre + f"{ln}.weight"] = s(d)
            out[pre + f"{ln}.bias"] = s(d)
        out[pre + "mlp.fc1.weight"], out[pre + "mlp.fc1.bias"] = s(f, d), s(f)
        out[pre + "mlp.fc2.weight"], out[pre + "mlp.fc2.bias"] = s(d, f), s(d)
    return out


def check_hf_state(cfg: ViTConfig, state: dict[str, np.ndarray], source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` listing every missing/unexpected key and bad shape."""
    want = {k: v.shape for k, v in vit_to_hf_state_abstract(_AbstractViT(cfg)).items()}
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    bad = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {want[k]}"
                 for k in set(want) & set(state) if tuple(state[k].shape) != tuple(want[k]))
    if missing or unexpected or bad:
        lines = [f"{source} does not match the configured MLCD ViT "
                 f"(D={cfg.hidden_size}, layers={cfg.num_layers}, heads={cfg.num_heads}, patch={cfg.patch_size}):"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", bad)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointMismatchError("\n".join(lines))


class _AbstractViT:
    """Just enough of a ViT for :func:`vit_to_hf_state_abstract` (config only)."""

    def __init__(self, cfg: ViTConfig):
        self.cfg = cfg


def vit_from_hf_state(cfg: ViTConfig, state: dict[str, np.ndarray], source: str = "checkpoint") -> ViT:
    """Build a ViT whose parameters are ``state`` (an HF state dict without prefix)."""
    check_hf_state(cfg, state, source)
    d, h, dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    pd = jnp.dtype(cfg.param_dtype)
    g = lambda k: np.asarray(state[k], dtype=np.float32)
    # Build the module without random init work, then fill every parameter.
    vit = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))

    def put(param, value):
        param.set_value(jnp.asarray(value, dtype=pd))

    put(vit.class_pos_emb, g("class_pos_emb"))
    put(vit.class_embedding, g("embeddings.class_embedding"))
    put(vit.patch_kernel, g("embeddings.patch_embedding.weight").transpose(2, 3, 1, 0))
    put(vit.pre_norm.scale, g("pre_layrnorm.weight"))
    put(vit.pre_norm.bias, g("pre_layrnorm.bias"))
    put(vit.post_norm.scale, g("post_layernorm.weight"))
    put(vit.post_norm.bias, g("post_layernorm.bias"))
    for i, blk in enumerate(vit.blocks):
        pre = f"encoder.layers.{i}."
        qkv_w = np.stack([g(pre + f"self_attn.{n}.weight").T.reshape(d, h, dh) for n in ("q_proj", "k_proj", "v_proj")], 1)
        qkv_b = np.stack([g(pre + f"self_attn.{n}.bias").reshape(h, dh) for n in ("q_proj", "k_proj", "v_proj")], 0)
        put(blk.attn.qkv_kernel, qkv_w)
        put(blk.attn.qkv_bias, qkv_b)
        put(blk.attn.out_kernel, g(pre + "self_attn.out_proj.weight").T.reshape(h, dh, d))
        put(blk.attn.out_bias, g(pre + "self_attn.out_proj.bias"))
        for ln, ours in (("layer_norm1", blk.norm1), ("layer_norm2", blk.norm2)):
            put(ours.scale, g(pre + f"{ln}.weight"))
            put(ours.bias, g(pre + f"{ln}.bias"))
        put(blk.mlp.fc1_kernel, g(pre + "mlp.fc1.weight").T)
        put(blk.mlp.fc1_bias, g(pre + "mlp.fc1.bias"))
        put(blk.mlp.fc2_kernel, g(pre + "mlp.fc2.weight").T)
        put(blk.mlp.fc2_bias, g(pre + "mlp.fc2.bias"))
    return vit


# ----------------------------------------------------------------------------- files
def _strip_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Accept keys with the ``vision_model.`` prefix (older hub checkpoints) or without."""
    if any(k.startswith(HF_PREFIX) for k in state):
        return {k[len(HF_PREFIX):] if k.startswith(HF_PREFIX) else k: v for k, v in state.items()}
    return state


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a local HF model directory under their stored names, as numpy (safetensors
    preferred; a legacy ``pytorch_model.bin`` through torch)."""
    from safetensors.numpy import load_file

    path = Path(path)
    if (path / SAFETENSORS).exists():
        state = load_file(path / SAFETENSORS)
    elif (path / SAFETENSORS_INDEX).exists():
        index = json.loads((path / SAFETENSORS_INDEX).read_text())
        state = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(load_file(path / shard))
    elif (path / TORCH_STATE_DICT).exists():
        import torch  # only needed for legacy .bin checkpoints

        sd = torch.load(path / TORCH_STATE_DICT, map_location="cpu", weights_only=True)
        state = {k: v.float().numpy() for k, v in sd.items()}
    else:
        raise errors.MissingInput(
            f"{path}: no {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_STATE_DICT} found "
            "(expected a Hugging Face MLCDVisionModel directory)")
    return state


def read_hf_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The MLCD tensors of a local HF model directory, ``vision_model.`` prefix removed."""
    # Drop non-persistent buffers some exporters include.
    return {k: v for k, v in _strip_prefix(read_tensors(path)).items() if not k.endswith("position_ids")}


def load_hf(path: str | os.PathLike, *, from_hub: bool = False, revision: str | None = None, **runtime) -> ViT:
    """Build the JAX ViT from a local HF ``MLCDVisionModel`` directory (a CLIP or SigLIP folder gives
    the JAX teacher of :mod:`rice_jax.models.teachers`, chosen by ``config.json``'s ``model_type``).

    ``from_hub=True`` treats ``path`` as a hub id (e.g.
    ``"DeepGlint-AI/rice-vit-large-patch14-560"``) and downloads it first; this is
    the only code path that touches the network, and only when asked.
    ``runtime`` sets our runtime options (``dtype``, ``remat_policy``, ...).
    """
    if from_hub:
        from huggingface_hub import snapshot_download

        path = snapshot_download(str(path), revision=revision,
                                 allow_patterns=["*.json", "*.safetensors", "*.bin"])
    # Remote folders (gs://, s3://...) are copied to a temp dir first: safetensors and torch read local files.
    path = Path(storage.download_dir(path))
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise errors.MissingInput(f"{cfg_file} not found (expected a Hugging Face MLCDVisionModel directory)")
    config = json.loads(cfg_file.read_text())
    if config.get("model_type") in teachers.MODEL_TYPES:  # a CLIP / SigLIP teacher for clustering
        return teachers.load_teacher(path, config, read_tensors(path), **runtime)
    cfg = ViTConfig.from_hf_dict(config, **runtime)
    return vit_from_hf_state(cfg, read_hf_state(path), source=str(path))


def save_hf(model, path: str | os.PathLike, *, torch_state_dict: bool = False):
    """Write ``config.json`` + ``model.safetensors`` (+ optional ``pytorch_model.bin``) to a local or
    remote (``gs://``...) folder; returns the folder."""
    from safetensors.numpy import save_file

    vit = _backbone(model)
    dst = storage.path(path)
    local = Path(tempfile.mkdtemp(prefix="rice_jax_export_")) if storage.is_remote(dst) else Path(dst)
    local.mkdir(parents=True, exist_ok=True)
    state = vit_to_hf_state(vit)
    (local / "config.json").write_text(json.dumps(vit.cfg.to_hf_dict(), indent=2) + "\n")
    save_file(state, str(local / SAFETENSORS), metadata={"format": "pt"})
    if torch_state_dict:
        import torch

        torch.save({k: torch.from_numpy(v.copy()) for k, v in state.items()}, local / TORCH_STATE_DICT)
    if storage.is_remote(dst):
        storage.upload_dir(local, dst)
        shutil.rmtree(local, ignore_errors=True)
    return dst


# ----------------------------------------------------------------------------- parity check
def compare_with_transformers(model, hf_dir: str | os.PathLike, pixels_nhwc: np.ndarray) -> dict[str, float]:
    """Max abs differences of our outputs vs ``transformers.MLCDVisionModel`` on the same input."""
    import torch
    from transformers import MLCDVisionModel

    vit = _backbone(model)
    hf = MLCDVisionModel.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2))))
    ours = vit(jnp.asarray(pixels_nhwc))
    return {
        "last_hidden_state": float(np.max(np.abs(np.asarray(ours.last_hidden_state) - ref.last_hidden_state.numpy()))),
        "pooler_output": float(np.max(np.abs(np.asarray(ours.pooler_output) - ref.pooler_output.numpy()))),
    }
