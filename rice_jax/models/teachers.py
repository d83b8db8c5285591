"""Clustering teachers in JAX: the CLIP and SigLIP vision towers, HF-exact, on the accelerators.

The paper clusters region features of a CLIP-class teacher. ``transformers`` has no Flax models
any more, and its PyTorch towers on a TPU VM run on the host CPU; these Flax NNX towers load the
same local Hugging Face folders (``CLIPVisionModel``, ``CLIPModel``, ``SiglipVisionModel``,
``SiglipModel``: the vision tower of a full model) and reproduce ``transformers`` to float
rounding, at the config's image size or any other multiple of the patch (position embeddings
resized as ``interpolate_pos_encoding=True`` does: bicubic, ``align_corners=False``, A = -0.75).

They speak the backbone interface :class:`rice_jax.labelling.features.RegionFeatures` reads: ``cfg``
(``num_layers``, ``hidden_size``, ``image_size``), ``grid``, ``num_prefix_tokens`` and
``model(pixels, output_hidden_states=True)`` -> :class:`rice_jax.models.vit.ViTOutput` with HF's
``hidden_states`` convention (index 0 = the embeddings as the first block receives them: after
CLIP's pre-LN, SigLIP has none; index i = the output of block i). Pixels are normalised with the
teacher's own statistics (``pixel_mean``/``pixel_std``; None = CLIP's, the pipeline's own).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rice_jax import errors
from rice_jax.models.vit import LayerNorm, ViTOutput, attention

Array = jax.Array
FAMILIES = ("clip", "siglip")
# model_type in config.json -> (family, whether the vision tower is nested in a full two-tower model)
MODEL_TYPES = {"clip_vision_model": ("clip", False), "clip": ("clip", True),
               "siglip_vision_model": ("siglip", False), "siglip": ("siglip", True)}
SIGLIP_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))   # SiglipImageProcessor's defaults


def pixel_statistics(config: dict, preprocessor: Optional[dict]) -> tuple[Optional[tuple], Optional[tuple]]:
    """``(mean, std)`` a folder's pixels are normalised with: its ``preprocessor_config.json``'s when it
    has one, else its family's image-processor defaults (SigLIP: 0.5 / 0.5); ``(None, None)`` means
    CLIP's, the input pipeline's own. The one rule both teacher paths follow (the JAX tower and
    :class:`rice_jax.labelling.features.TransformersRegionFeatures`): a folder saved by ``save_pretrained``
    has no preprocessor file, and reading it with CLIP's statistics gives a SigLIP tower other inputs."""
    if preprocessor and "image_mean" in preprocessor and "image_std" in preprocessor:
        return tuple(preprocessor["image_mean"]), tuple(preprocessor["image_std"])
    family = MODEL_TYPES.get(config.get("model_type"), (None,))[0]
    return SIGLIP_MEAN_STD if family == "siglip" else (None, None)


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    family: str                      # "clip" or "siglip"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    image_size: int                  # the size the position embeddings were trained at
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"   # "quick_gelu" (CLIP) | "gelu_pytorch_tanh" (SigLIP) | "gelu"
    use_head: bool = False           # SigLIP's attention-pooling head (pooler_output)
    num_channels: int = 3
    dtype: str = "float32"           # compute dtype (parameters stay fp32); "bfloat16" on accelerators
    attention_impl: str = "auto"     # as rice_jax.models.vit.attention
    pixel_mean: Optional[tuple] = None  # None = CLIP's mean/std (what the input pipeline produces)
    pixel_std: Optional[tuple] = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise errors.InputError(f"teacher family {self.family!r}: choose from {FAMILIES}")
        if self.hidden_size % self.num_heads:
            raise errors.InputError(f"hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if self.hidden_act not in _ACTIVATIONS:
            raise errors.InputError(f"hidden_act {self.hidden_act!r} is not supported; known: {sorted(_ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_hf_dict(cls, d: dict, *, preprocessor: Optional[dict] = None, **runtime) -> "TeacherConfig":
        """From a ``config.json`` of a model type in :data:`MODEL_TYPES` (and its
        ``preprocessor_config.json``, for the pixel statistics)."""
        mt = d.get("model_type")
        if mt not in MODEL_TYPES:
            raise errors.InputError(f"model_type {mt!r} is not a JAX teacher; known: {sorted(MODEL_TYPES)}")
        family, nested = MODEL_TYPES[mt]
        v = d.get("vision_config") or {} if nested else d
        defaults = _HF_VISION_DEFAULTS[family]
        g = lambda k: v.get(k, defaults[k])
        mean, std = pixel_statistics(d, preprocessor)
        return cls(family=family, hidden_size=g("hidden_size"), intermediate_size=g("intermediate_size"),
                   num_layers=g("num_hidden_layers"), num_heads=g("num_attention_heads"), patch_size=g("patch_size"),
                   image_size=g("image_size"), layer_norm_eps=g("layer_norm_eps"), hidden_act=g("hidden_act"),
                   use_head=bool(v.get("vision_use_head", True)) if family == "siglip" else False,
                   num_channels=g("num_channels"), pixel_mean=mean, pixel_std=std, **runtime)


# The vision-config defaults of transformers' CLIPVisionConfig / SiglipVisionConfig (a config.json
# written by save_pretrained omits nothing, but hand-written ones may).
_HF_VISION_DEFAULTS = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 patch_size=32, image_size=224, layer_norm_eps=1e-5, hidden_act="quick_gelu", num_channels=3),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   patch_size=16, image_size=224, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                   num_channels=3),
}

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


# ----------------------------------------------------------------------------- position embeddings
def _torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out, in]`` weights of torch's ``interpolate(mode="bicubic", align_corners=False)`` along one
    axis: source = (dst + 0.5)·in/out − 0.5, four taps clamped at the border, Keys' cubic with A = −0.75."""
    a = -0.75
    cubic1 = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1          # |x| <= 1
    cubic2 = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a     # 1 < |x| < 2
    w = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for o in range(out_size):
        src = (o + 0.5) * scale - 0.5
        i0 = math.floor(src)
        t = src - i0
        for tap, weight in zip(range(i0 - 1, i0 + 3), (cubic2(t + 1), cubic1(t), cubic1(1 - t), cubic2(2 - t))):
            w[o, min(max(tap, 0), in_size - 1)] += weight
    return w


def resize_position_embeddings(pos: Array, grid_in: int, grid_h: int, grid_w: int) -> Array:
    """Patch position embeddings ``[grid_in², D]`` -> ``[grid_h·grid_w, D]`` as ``transformers`` does."""
    if (grid_h, grid_w) == (grid_in, grid_in):
        return pos
    wh = jnp.asarray(_torch_bicubic_matrix(grid_in, grid_h), jnp.float32)
    ww = jnp.asarray(_torch_bicubic_matrix(grid_in, grid_w), jnp.float32)
    p = pos.astype(jnp.float32).reshape(grid_in, grid_in, -1)
    out = jnp.einsum("hi,ijd,wj->hwd", wh, p, ww, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(grid_h * grid_w, -1).astype(pos.dtype)


# ----------------------------------------------------------------------------- modules
def _zeros(*shape):
    return nnx.Param(jnp.zeros(shape, jnp.float32))


class _Linear(nnx.Module):
    """``x @ kernel + bias`` with the kernel stored ``[in, out]`` (HF's weight transposed)."""

    def __init__(self, d_in: int, d_out: int, dtype):
        self.kernel = _zeros(d_in, d_out)
        self.bias = _zeros(d_out)
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        return x.astype(self.dtype) @ self.kernel[...].astype(self.dtype) + self.bias[...].astype(self.dtype)


class _MLP(nnx.Module):
    """``fc2(act(fc1(norm(x))))``: the feed-forward half of a block and of SigLIP's pooling head."""

    def __init__(self, cfg: TeacherConfig):
        dt, d = jnp.dtype(cfg.dtype), cfg.hidden_size
        self.norm = LayerNorm(d, cfg.layer_norm_eps, dtype=dt, param_dtype=jnp.float32)
        self.fc1 = _Linear(d, cfg.intermediate_size, dt)
        self.fc2 = _Linear(cfg.intermediate_size, d, dt)
        self.act = cfg.hidden_act

    def __call__(self, x: Array) -> Array:
        return self.fc2(_ACTIVATIONS[self.act](self.fc1(self.norm(x))))


class _Block(nnx.Module):
    """Pre-norm block (HF ``CLIPEncoderLayer`` / ``SiglipEncoderLayer``)."""

    def __init__(self, cfg: TeacherConfig):
        dt, d = jnp.dtype(cfg.dtype), cfg.hidden_size
        self.cfg = cfg
        self.layer_norm1 = LayerNorm(d, cfg.layer_norm_eps, dtype=dt, param_dtype=jnp.float32)
        # HF's q_proj / k_proj / v_proj side by side: one [D, 3D] matmul instead of three.
        self.qkv_proj = _Linear(d, 3 * d, dt)
        self.out_proj = _Linear(d, d, dt)
        self.mlp = _MLP(cfg)

    def __call__(self, x: Array) -> Array:
        b, t, _ = x.shape
        h, dh = self.cfg.num_heads, self.cfg.head_dim
        qkv = self.qkv_proj(self.layer_norm1(x)).reshape(b, t, 3, h, dh).transpose(2, 0, 3, 1, 4)
        o = attention(qkv[0], qkv[1], qkv[2], impl=self.cfg.attention_impl)
        x = x + self.out_proj(o.transpose(0, 2, 1, 3).reshape(b, t, h * dh))
        return x + self.mlp(x)


class _AttentionPoolingHead(nnx.Module):
    """SigLIP's ``SiglipMultiheadAttentionPoolingHead``: one learned probe attends over the tokens."""

    def __init__(self, cfg: TeacherConfig):
        dt, d = jnp.dtype(cfg.dtype), cfg.hidden_size
        self.cfg = cfg
        self.probe = _zeros(1, 1, d)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (_Linear(d, d, dt) for _ in range(4))
        self.mlp = _MLP(cfg)

    def __call__(self, x: Array) -> Array:
        b, t, _ = x.shape
        h, dh = self.cfg.num_heads, self.cfg.head_dim
        probe = jnp.broadcast_to(self.probe[...], (b, 1, x.shape[-1]))
        heads = lambda z: z.reshape(b, z.shape[1], h, dh).transpose(0, 2, 1, 3)
        o = attention(heads(self.q_proj(probe)), heads(self.k_proj(x)), heads(self.v_proj(x)), impl="einsum")
        y = self.out_proj(o.transpose(0, 2, 1, 3).reshape(b, 1, h * dh))
        y = y + self.mlp(y)
        return y[:, 0]


class VisionTeacher(nnx.Module):
    """A CLIP or SigLIP vision tower. ``model(pixels [B,H,W,C])`` -> :class:`ViTOutput`
    (``last_hidden_state`` and ``pooler_output`` as ``transformers`` defines them for the family)."""

    def __init__(self, cfg: TeacherConfig):
        d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        self.cfg = cfg
        dt = jnp.dtype(cfg.dtype)
        self.patch_kernel = _zeros(p, p, c, d)                       # HWIO
        self.patch_bias = _zeros(d) if cfg.family == "siglip" else None
        self.num_prefix_tokens = 1 if cfg.family == "clip" else 0
        self.class_embedding = _zeros(d) if cfg.family == "clip" else None
        self.position_embedding = _zeros(cfg.grid_size ** 2 + self.num_prefix_tokens, d)
        self.pre_layrnorm = LayerNorm(d, cfg.layer_norm_eps, dtype=dt, param_dtype=jnp.float32) \
            if cfg.family == "clip" else None
        self.blocks = nnx.List([_Block(cfg) for _ in range(cfg.num_layers)])
        self.post_layernorm = LayerNorm(d, cfg.layer_norm_eps, dtype=dt, param_dtype=jnp.float32)
        self.head = _AttentionPoolingHead(cfg) if cfg.use_head else None

    def grid(self, height: int, width: int) -> tuple[int, int]:
        p = self.cfg.patch_size
        if height % p or width % p:
            raise errors.InputError(f"image {height}x{width} is not a multiple of the patch size {p}")
        return height // p, width // p

    def embed(self, pixels: Array) -> Array:
        """``pixels [B,H,W,C]`` -> the tokens block 1 receives (HF's ``hidden_states[0]``)."""
        b, hh, ww, c = pixels.shape
        gh, gw = self.grid(hh, ww)
        p, dt = self.cfg.patch_size, jnp.dtype(self.cfg.dtype)
        patches = pixels.astype(dt).reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, -1)
        x = patches @ self.patch_kernel[...].astype(dt).reshape(p * p * c, -1)
        if self.patch_bias is not None:
            x = x + self.patch_bias[...].astype(dt)
        pos = self.position_embedding[...]
        n = self.num_prefix_tokens
        x = x + resize_position_embeddings(pos[n:], self.cfg.grid_size, gh, gw).astype(dt)
        if self.class_embedding is not None:
            cls = (self.class_embedding[...] + pos[0]).astype(dt)
            x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, x.shape[-1])), x], axis=1)
        return self.pre_layrnorm(x) if self.pre_layrnorm is not None else x

    def __call__(self, pixels: Array, output_hidden_states: bool = False) -> ViTOutput:
        x = self.embed(pixels)
        hidden = [x] if output_hidden_states else None
        for block in self.blocks:
            x = block(x)
            if hidden is not None:
                hidden.append(x)
        if self.cfg.family == "clip":
            last, pooled = x, self.post_layernorm(x[:, 0])
        else:
            last = self.post_layernorm(x)
            pooled = self.head(last) if self.head is not None else None
        return ViTOutput(last_hidden_state=last, pooler_output=pooled,
                         hidden_states=tuple(hidden) if hidden is not None else None)


# ----------------------------------------------------------------------------- weights
def _vision_state(state: dict[str, np.ndarray], nested: bool) -> dict[str, np.ndarray]:
    """The vision tower's tensors with HF's ``vision_model.`` prefix removed (a full two-tower model
    also holds text-tower and projection tensors, which a vision teacher does not read)."""
    prefix = "vision_model."
    if nested or any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def from_hf_state(cfg: TeacherConfig, state: dict[str, np.ndarray], *, nested: bool = False,
                  source: str = "checkpoint") -> VisionTeacher:
    """Build the tower and copy every tensor in; missing or unexpected tensors and shape mismatches
    are one error listing them (the vision-tower tensors of ``state`` must be used up exactly)."""
    state = {k: v for k, v in _vision_state(state, nested).items() if not k.endswith("position_ids")}
    model = VisionTeacher(cfg)
    used, problems = set(), []

    def take(key: str, transform=lambda a: a):
        if key not in state:
            problems.append(f"missing {key}")
            return None
        used.add(key)
        return np.asarray(transform(np.asarray(state[key], np.float32)), np.float32)

    def put_value(param, value: np.ndarray, key: str):
        if value.shape != param[...].shape:
            problems.append(f"{key}: {value.shape} in the file, {param[...].shape} expected")
            return
        param[...] = jnp.asarray(value)

    def put(param, key: str, transform=lambda a: a):
        value = take(key, transform)
        if value is not None:
            put_value(param, value, key)

    def linear(mod: _Linear, key: str):
        put(mod.kernel, key + ".weight", lambda w: w.T)
        put(mod.bias, key + ".bias")

    def norm(mod: LayerNorm, key: str):
        put(mod.scale, key + ".weight")
        put(mod.bias, key + ".bias")

    put(model.patch_kernel, "embeddings.patch_embedding.weight", lambda w: w.transpose(2, 3, 1, 0))
    if model.patch_bias is not None:
        put(model.patch_bias, "embeddings.patch_embedding.bias")
    if model.class_embedding is not None:
        put(model.class_embedding, "embeddings.class_embedding")
    put(model.position_embedding, "embeddings.position_embedding.weight")
    if model.pre_layrnorm is not None:
        norm(model.pre_layrnorm, "pre_layrnorm")
    for i, blk in enumerate(model.blocks):
        pre = f"encoder.layers.{i}."
        norm(blk.layer_norm1, pre + "layer_norm1")
        qkv = [take(f"{pre}self_attn.{n}.{w}") for n in ("q_proj", "k_proj", "v_proj") for w in ("weight", "bias")]
        if all(a is not None for a in qkv):
            put_value(blk.qkv_proj.kernel, np.concatenate([qkv[0].T, qkv[2].T, qkv[4].T], 1), pre + "self_attn.qkv")
            put_value(blk.qkv_proj.bias, np.concatenate([qkv[1], qkv[3], qkv[5]]), pre + "self_attn.qkv")
        linear(blk.out_proj, pre + "self_attn.out_proj")
        norm(blk.mlp.norm, pre + "layer_norm2")
        linear(blk.mlp.fc1, pre + "mlp.fc1")
        linear(blk.mlp.fc2, pre + "mlp.fc2")
    norm(model.post_layernorm, "post_layernorm")
    if model.head is not None:
        d = cfg.hidden_size
        put(model.head.probe, "head.probe")
        w_in, b_in = take("head.attention.in_proj_weight"), take("head.attention.in_proj_bias")
        if w_in is not None and b_in is not None and (w_in.shape != (3 * d, d) or b_in.shape != (3 * d,)):
            problems.append(f"head.attention.in_proj: {w_in.shape} / {b_in.shape} in the file, "
                            f"{(3 * d, d)} / {(3 * d,)} expected")
        elif w_in is not None and b_in is not None:
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):   # torch packs q, k, v row-wise
                getattr(model.head, name).kernel[...] = jnp.asarray(w_in[j * d:(j + 1) * d].T)
                getattr(model.head, name).bias[...] = jnp.asarray(b_in[j * d:(j + 1) * d])
        linear(model.head.out_proj, "head.attention.out_proj")
        norm(model.head.mlp.norm, "head.layernorm")
        linear(model.head.mlp.fc1, "head.mlp.fc1")
        linear(model.head.mlp.fc2, "head.mlp.fc2")
    unexpected = sorted(set(state) - used)
    if not cfg.use_head:
        unexpected = [k for k in unexpected if not k.startswith("head.")]  # a head the config turns off
    problems += [f"unexpected {k}" for k in unexpected]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... {len(problems) - 6} more" if len(problems) > 6 else "")
        raise errors.InputError(f"{source}: the {cfg.family} vision tower does not match its weights: {shown}")
    return model


def load_teacher(path: str | Path, config: dict, state: dict[str, np.ndarray], **runtime) -> VisionTeacher:
    """The tower of a local HF folder whose ``config.json`` (``config``) names a teacher model type."""
    path = Path(path)
    unknown = set(runtime) - {"dtype", "attention_impl"}
    if unknown:
        raise errors.InputError(f"{path}: a {config['model_type']} teacher takes only dtype and attention_impl, "
                                f"not {sorted(unknown)}")
    pre_file = path / "preprocessor_config.json"
    preprocessor = json.loads(pre_file.read_text()) if pre_file.exists() else None
    cfg = TeacherConfig.from_hf_dict(config, preprocessor=preprocessor, **runtime)
    return from_hf_state(cfg, state, nested=MODEL_TYPES[config["model_type"]][1], source=str(path))
