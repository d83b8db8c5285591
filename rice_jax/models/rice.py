"""RICE = the MLCD ViT whose last ``k`` blocks also carry N region tokens.

One forward pass yields the global class embedding and N region embeddings.
The region blocks reuse the backbone blocks' weights; the region tokens start
from the class-token state entering the first region block and reuse its
rotary angles, so the region machinery adds no backbone parameter and
``export.save_hf`` of a RICE model writes the plain ViT. The optional head (a
linear projection to the embedding size) is training-only.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from rice_jax import errors
from rice_jax.models.config import RUNTIME_FIELDS, ViTConfig, get_preset
from rice_jax.models.region import box_patch_visibility, region_attention_mask, roi_align
from rice_jax.models.vit import ViT, position_angles

Array = jax.Array

# Rows x columns of box samples a ``region_seed="roi"`` token starts from: a word is one row of
# text a few letters wide; objects get a coarse 2 x 4 layout of their box.
ROI_SEED_GRID = (2, 4)


@dataclasses.dataclass(frozen=True)
class RICEConfig:
    backbone: ViTConfig = ViTConfig()
    region_layers: int = 2            # last k blocks run on [cls; patches; regions]
    region_attend_cls: bool = False   # let region tokens also see the class token
    # Where a region token sits for the rotary embedding. "class": the class token's learned angles
    # (every region the same query position, so a region sees its patches at *image* positions).
    # "box": its box's centre in patch units, so a region sees its patches at positions *relative
    # to the box* — the same word anywhere in the image looks the same to its region token.
    # No parameter either way: the exported ViT is unchanged.
    region_rope: str = "class"
    # What a region token starts from. "class": the class-token state entering the first region
    # block (the paper; no parameter). "roi": that state plus a learned projection of the box's
    # patch tokens sampled on a rows x cols grid (RoIAlign, :data:`ROI_SEED_GRID`), so the token
    # starts out knowing *what is where in its box* — attention pooling alone averages the
    # patches' values and loses their layout, which reading a word needs (benchmarks/reading.py).
    # The projection is a training-time parameter like ``head``: the exported ViT is unchanged.
    region_seed: str = "class"
    embed_dim: int = 0                # head output E; 0 (or None, or == D) means identity (no head)
    # Standardise the embeddings over the batch (valid rows only; no parameters, training-only).
    # Region tokens start from the class-token state, so at initialisation every region of every
    # image embeds to nearly the same vector (mean pairwise cosine ~0.9): removing the batch mean
    # leaves the part that differs between regions for the margin softmax to act on.
    embed_batchnorm: bool = False

    def __post_init__(self):
        if self.region_rope not in ("class", "box"):
            raise errors.InputError(f"region_rope must be 'class' or 'box', got {self.region_rope!r}")
        if self.region_seed not in ("class", "roi"):
            raise errors.InputError(f"region_seed must be 'class' or 'roi', got {self.region_seed!r}")
        if not 1 <= self.region_layers <= self.backbone.num_layers:
            raise errors.InputError(f"region_layers must be in [1, {self.backbone.num_layers}], got {self.region_layers}")


def settings_defaults() -> dict:
    """The flat model settings a training config exposes (``c.model``), with their defaults.

    Every :class:`RICEConfig` field but ``backbone``, plus ``backbone`` as a preset name and the
    ViT runtime fields (:data:`RUNTIME_FIELDS`), and ``num_layers`` (0 = the preset's depth; a
    smaller value keeps the first blocks, e.g. for CPU runs): derived from the dataclasses, so a
    field and its default exist once. :func:`config_from_settings` is the inverse."""
    out = {f.name: f.default for f in dataclasses.fields(RICEConfig) if f.name != "backbone"}
    vit = {f.name: f.default for f in dataclasses.fields(ViTConfig)}
    out.update(backbone="vit_b16_224", num_layers=0, **{k: vit[k] for k in RUNTIME_FIELDS})
    return out


def config_from_settings(settings) -> RICEConfig:
    """A :class:`RICEConfig` from flat settings (a mapping with the keys of :func:`settings_defaults`)."""
    settings = dict(settings)
    unknown = set(settings) - set(settings_defaults())
    if unknown:
        raise errors.InputError(f"unknown model settings {sorted(unknown)}; known: {sorted(settings_defaults())}")
    overrides = {k: settings.pop(k) for k in RUNTIME_FIELDS if k in settings}
    depth = int(settings.pop("num_layers", 0) or 0)
    if depth:
        overrides["num_layers"] = depth
    backbone = get_preset(settings.pop("backbone"), **overrides)
    return RICEConfig(backbone=backbone, **settings)


@struct.dataclass
class RICEOutput:
    last_hidden_state: Array   # [B, 1+T, D]   image path, identical to the plain ViT
    pooler_output: Array       # [B, D]
    global_embed: Array        # [B, E]        head(post-LN class token)
    region_embed: Array        # [B, N, E]     head(post-LN region tokens) (batch-standardised if configured)
    region_hidden: Array       # [B, N, D]     region tokens before post-LN
    # With ``output_hidden_states``: the image path's (embeddings, block 1, ..., block L), as
    # :attr:`rice_jax.models.vit.ViTOutput.hidden_states` (image tokens never see region tokens).
    hidden_states: Optional[tuple] = None


def batch_standardize(x: Array, valid: Optional[Array] = None, eps: float = 1e-5) -> Array:
    """Per-feature zero mean / unit variance over all leading axes of ``x [..., E]``, rows where ``valid``.

    Statistics in fp32 over the *global* batch (under jit with a sharded batch the sums
    become cross-device reductions). Invalid rows are standardised with the same
    statistics but do not contribute to them.
    """
    xf = x.astype(jnp.float32)
    flat = xf.reshape(-1, x.shape[-1])
    w = jnp.ones(flat.shape[:1], jnp.float32) if valid is None else valid.reshape(-1).astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    mean = jnp.sum(flat * w[:, None], axis=0) / n
    var = jnp.sum(jnp.square(flat - mean) * w[:, None], axis=0) / n
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RICEModel(nnx.Module):
    def __init__(self, cfg: RICEConfig, *, rngs: nnx.Rngs, backbone: Optional[ViT] = None):
        self.cfg = cfg
        self.backbone = backbone if backbone is not None else ViT(cfg.backbone, rngs=rngs)
        d = cfg.backbone.hidden_size
        if not cfg.embed_dim or cfg.embed_dim == d:
            self.head = None
        else:
            self.head = nnx.Linear(d, cfg.embed_dim, use_bias=False, param_dtype=jnp.dtype(cfg.backbone.param_dtype),
                                   dtype=jnp.dtype(cfg.backbone.dtype),
                                   kernel_init=nnx.initializers.normal(d**-0.5), rngs=rngs)
        if cfg.region_seed == "roi":
            k = ROI_SEED_GRID[0] * ROI_SEED_GRID[1] * d
            self.region_seed = nnx.Linear(k, d, param_dtype=jnp.dtype(cfg.backbone.param_dtype),
                                          dtype=jnp.dtype(cfg.backbone.dtype),
                                          kernel_init=nnx.initializers.normal(k**-0.5), rngs=rngs)
        else:
            self.region_seed = None

    @property
    def first_region_block(self) -> int:
        return self.cfg.backbone.num_layers - self.cfg.region_layers

    def _project(self, x: Array, valid: Optional[Array] = None) -> Array:
        x = x if self.head is None else self.head(x)
        if self.cfg.embed_batchnorm:
            x = batch_standardize(x, valid)
        return x

    def region_blocks(self, x: Array, grid: tuple[int, int], boxes: Array, region_valid: Array,
                      start: Optional[int] = None, hidden: Optional[list] = None) -> tuple[Array, Array]:
        """Run blocks ``start..L-1`` on ``x [B,1+T,D]`` plus region tokens made from ``x[:, 0]``.

        Returns ``(image tokens [B,1+T,D], region tokens [B,N,D])``; each block's image tokens are
        appended to ``hidden`` when given.
        """
        vit = self.backbone
        start = self.first_region_block if start is None else start
        b, n = boxes.shape[:2]
        gh, gw = grid
        t = 1 + gh * gw
        regions = jnp.broadcast_to(x[:, :1], (b, n, x.shape[-1]))
        if self.region_seed is not None:
            roi = roi_align(x[:, 1:t], boxes, gh, gw, *ROI_SEED_GRID)
            regions = regions + self.region_seed(roi.reshape(b, n, -1)).astype(regions.dtype)
        xe = jnp.concatenate([x, regions], axis=1)
        if self.cfg.region_rope == "box":
            cos, sin = vit.rope(gh, gw)                                   # [1+T, Dh/2]
            bx = boxes.astype(jnp.float32)
            ang = position_angles(vit.cfg, (bx[..., 1] + bx[..., 3]) * 0.5 * gh - 0.5,
                                  (bx[..., 0] + bx[..., 2]) * 0.5 * gw - 0.5)   # [B, N, Dh/2]
            cos = jnp.concatenate([jnp.broadcast_to(cos, (b, t, cos.shape[-1])), jnp.cos(ang)], axis=1)[:, None]
            sin = jnp.concatenate([jnp.broadcast_to(sin, (b, t, sin.shape[-1])), jnp.sin(ang)], axis=1)[:, None]
        else:
            cos, sin = vit.rope(gh, gw, num_extra=n)
        vis = box_patch_visibility(boxes, region_valid, gh, gw)
        mask = region_attention_mask(vis, attend_cls=self.cfg.region_attend_cls)
        extended = [] if hidden is not None else None
        xe = vit.run_blocks(xe, cos, sin, start=start, mask=mask, hidden=extended)
        if hidden is not None:
            hidden.extend(h[:, :t] for h in extended)
        return xe[:, :t], xe[:, t:]

    def __call__(self, pixels: Array, boxes: Optional[Array] = None,
                 region_valid: Optional[Array] = None, output_hidden_states: bool = False) -> RICEOutput:
        """``pixels [B,H,W,3]``; ``boxes [B,N,4]`` normalised xyxy; ``region_valid [B,N]``."""
        vit = self.backbone
        grid = vit.grid(pixels.shape[1], pixels.shape[2])
        hidden = [] if output_hidden_states else None
        if boxes is not None and boxes.shape[1]:
            if region_valid is None:
                region_valid = jnp.ones(boxes.shape[:2], bool)
            x = vit.encode(pixels, stop=self.first_region_block, hidden=hidden)
            x, r = self.region_blocks(x, grid, boxes, region_valid, hidden=hidden)
        else:
            x = vit.encode(pixels, hidden=hidden)
            r = jnp.zeros((x.shape[0], 0, x.shape[-1]), x.dtype)
        pooled = vit.post_norm(x[:, 0])
        return RICEOutput(
            last_hidden_state=x, pooler_output=pooled, global_embed=self._project(pooled),
            region_embed=self._project(vit.post_norm(r), region_valid), region_hidden=r,
            hidden_states=tuple(hidden) if hidden is not None else None)
