"""MLCD/RICE vision transformer in Flax NNX, numerically the HF ``MLCDVisionModel``.

Layout choices made for speed without changing the maths (docs/design.md §6):
- the patch "conv" is a reshape + one matmul (stride == kernel, no bias);
- q, k and v come from one fused projection straight into ``[B, heads, T, Dh]``
  and the output projection contracts heads back, so no transposes are
  materialised;
- exact GELU is written as ``0.5·x·(1 + erf(x/√2))``, which XLA:CPU fuses far
  better than ``jax.nn.gelu(approximate=False)``;
- attention goes through :func:`attention`, which picks the fastest correct
  path per backend and takes an optional boolean mask (region layers).
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from rice_jax.models.config import ViTConfig

Array = jax.Array


@struct.dataclass
class ViTOutput:
    last_hidden_state: Array  # [B, 1+T, D], not post-normed (as HF)
    pooler_output: Array      # [B, D] = post_layernorm(last_hidden_state[:, 0])
    # With ``output_hidden_states``: (embeddings after the pre-LN, block 1, ..., block L), each
    # [B, 1+T, D] -- HF's ``hidden_states`` (index 0 = patch embedding, i = output of block i).
    hidden_states: Optional[tuple] = None


# ----------------------------------------------------------------------------- ops
def gelu_exact(x: Array) -> Array:
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def _resolve_attention_impl(impl: str) -> str:
    if impl != "auto":
        return impl
    # cuDNN flash attention on GPU; elsewhere the einsum path, which measured
    # ~2x faster than jax.nn.dot_product_attention on XLA:CPU (docs/design.md §6).
    return "cudnn" if jax.default_backend() == "gpu" else "einsum"


def attention(q: Array, k: Array, v: Array, mask: Optional[Array] = None, *, impl: str = "auto") -> Array:
    """Scaled dot-product attention on ``[B, heads, T, Dh]`` inputs.

    ``mask``: boolean, broadcastable to ``[B, heads, Tq, Tk]``; True = may attend.
    Softmax statistics are fp32 whatever the compute dtype. A query row with no
    visible key yields zeros instead of NaN (never happens for region tokens,
    which always see themselves).
    """
    if impl == "auto" and _resolve_attention_impl(impl) == "cudnn":
        if q.dtype not in CUDNN_DTYPES:   # fp32 compute (the `tiny` config): cuDNN has no fp32 kernel
            return attention(q, k, v, mask, impl="xla")
        try:  # cuDNN refuses some shapes at trace time; "auto" then takes XLA's fused path
            return attention(q, k, v, mask, impl="cudnn")
        except NotImplementedError:
            return attention(q, k, v, mask, impl="xla")
    impl = _resolve_attention_impl(impl)
    scale = q.shape[-1] ** -0.5
    if impl == "einsum":
        # Scale q (T·Dh) rather than the logits (T·T), and normalise after P·V (T·Dh) rather
        # than P (T·T): the same softmax with two fewer passes over the [B,H,T,T] array
        # (~1.5x faster forward and backward on XLA:CPU). Statistics stay fp32.
        logits = jnp.einsum("bhqd,bhkd->bhqk", q * jnp.asarray(scale, q.dtype), k,
                            preferred_element_type=jnp.float32)
        if mask is not None:
            logits = jnp.where(mask, logits, -jnp.inf)
        row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
        # A fully masked row has max -inf: shift by 0 instead, so it yields zeros, not NaN.
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
        p = jnp.exp(logits - row_max)
        denom = jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
        out = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return (out / denom).astype(v.dtype)
    if impl == "xla":
        return _fused_attention(q, k, v, mask, scale, "xla")
    if impl == "cudnn":
        qp, kp, vp, mp, lengths = _pad_tokens(q, k, v, mask, CUDNN_SEQ_MULTIPLE)
        return _fused_attention(qp, kp, vp, mp, scale, "cudnn", lengths)[:, :, :q.shape[2]]
    raise ValueError(f"unknown attention implementation {impl!r}")


# cuDNN's fused attention refuses a mask (lowered to a bias) on an odd sequence length when training
# (jax's check_is_flash_attention), and the ViT's 1 + h*w tokens are odd for every even grid: cuDNN
# calls pad the tokens to this multiple and mask the padding out.
CUDNN_SEQ_MULTIPLE = 2
# What cuDNN's fused attention computes in (jax raises ValueError, not NotImplementedError, for fp32).
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _fused_attention(q, k, v, mask, scale, impl, kv_lengths=None):
    """``jax.nn.dot_product_attention`` on our ``[B, heads, T, Dh]`` layout (it wants ``[B, T, heads, Dh]``)."""
    t = lambda x: jnp.swapaxes(x, 1, 2)
    if mask is not None and impl == "cudnn":  # cuDNN takes a full-shape mask only
        mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    out = jax.nn.dot_product_attention(t(q), t(k), t(v), mask=mask, scale=scale, implementation=impl,
                                       key_value_seq_lengths=kv_lengths)
    return t(out)


def _pad_tokens(q, k, v, mask, multiple):
    """Pad the token axis of q/k/v (self-attention, ``Tq == Tk``) to a multiple of ``multiple``.

    Returns ``(q, k, v, mask, kv_lengths)`` for :func:`_fused_attention`: without a mask the padded
    keys are hidden by sequence lengths (no bias, the cheap cuDNN path); with one, the mask is
    padded — padded keys invisible to every query, padded queries see the real keys (a row with
    no visible key is never formed) and are sliced off by the caller."""
    t = q.shape[2]
    pad = -t % multiple
    if not pad:
        return q, k, v, mask, None
    widths = ((0, 0), (0, 0), (0, pad), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    if mask is None:
        return q, k, v, None, jnp.full((q.shape[0],), t, jnp.int32)
    mask = jnp.broadcast_to(mask, (*mask.shape[:2], t, t))
    real_key = jnp.arange(t + pad) < t
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, pad)), constant_values=True) & real_key
    return q, k, v, mask, None


@jax.custom_vjp
def materialize_grad(x: Array) -> Array:
    """Identity whose cotangent XLA:CPU must compute once and store (the same arithmetic).

    The gradient of the residual stream is a running sum over every block above. Left alone,
    XLA:CPU fuses that sum of cheap elementwise terms into each block's consumers (the LayerNorm
    backward, the transposed operands of the weight-gradient matmuls) and recomputes the whole
    chain in each: work that grows with depth squared (ViT-B/16: a dozen 30-60 ms fusions per
    step, ``benchmarks/step_profile.py``). ``lax.optimization_barrier`` does not stop it (XLA:CPU
    expands barriers before fusion) and a division by a scalar 1 is rewritten into a cheap
    multiply; a conditional is never fused, so the cotangent passes through one whose predicate
    is always true but opaque to the simplifier. Used on the CPU backend only: XLA:GPU reads a
    conditional's predicate on the host, a sync per block.
    """
    return x


def _materialize_grad_fwd(x):
    bits = jax.lax.bitcast_convert_type(x.reshape(-1)[0].astype(jnp.float32), jnp.int32)
    return x, ((bits | 1) & 1) == 1  # always True, whatever x holds (NaN included)


def _materialize_grad_bwd(true, g):
    return (jax.lax.cond(true, lambda g: g, lambda g: -g, g),)


materialize_grad.defvjp(_materialize_grad_fwd, _materialize_grad_bwd)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """NeoX-style rotary embedding on ``x [B, H, S, Dh]`` with ``cos, sin [S, Dh/2]`` (or ``[B, 1, S, Dh/2]``: per-example angles).

    HF builds cos/sin over ``concat(angles, angles)``; rotating the two halves
    with the half-size tables is the same arithmetic with half the memory.
    Computed in fp32 as HF does, then cast back.
    """
    dtype = x.dtype
    x = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(dtype)


def rope_angles(cfg: ViTConfig, class_pos_emb: Array, grid_h: int, grid_w: int) -> Array:
    """Angles ``[1 + grid_h*grid_w, Dh/2]``: the learned class angles, then the patches row-major.

    Patch (r, c) gets ``concat(r·inv_freq, c·inv_freq)`` with ``inv_freq`` over Dh/4
    frequencies (HF ``MLCDRotaryEmbedding``, rope_type "axial").
    """
    rows = jnp.repeat(jnp.arange(grid_h, dtype=jnp.float32), grid_w)
    cols = jnp.tile(jnp.arange(grid_w, dtype=jnp.float32), grid_h)
    patch = position_angles(cfg, rows, cols)
    return jnp.concatenate([class_pos_emb.astype(jnp.float32).reshape(1, cfg.head_dim // 2), patch], axis=0)


def position_angles(cfg: ViTConfig, rows: Array, cols: Array) -> Array:
    """Rotary angles ``[..., Dh/2]`` of (possibly fractional) grid positions ``rows, cols [...]``,
    in patch units: ``concat(row·inv_freq, col·inv_freq)``, as the patches get them."""
    spatial = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
    rows, cols = jnp.asarray(rows, jnp.float32)[..., None], jnp.asarray(cols, jnp.float32)[..., None]
    return jnp.concatenate([rows * inv_freq, cols * inv_freq], axis=-1)


# ----------------------------------------------------------------------------- modules
def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


class LayerNorm(nnx.Module):
    """LayerNorm with fp32 statistics (two-pass variance, as torch) and configurable eps."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        xc = xf - mean
        var = jnp.mean(xc * xc, axis=-1, keepdims=True)
        # Fold 1/σ into the per-channel scale first: one multiply per element instead of two.
        y = xc * (jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32))
        return (y + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        d, h, dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        pd = jnp.dtype(cfg.param_dtype)
        in_std = d**-0.5 * (2 * cfg.num_layers) ** -0.5 * cfg.initializer_factor
        out_std = d**-0.5 * cfg.initializer_factor
        # Fused q/k/v kernel [D, 3, heads, Dh]; HF's q_proj/k_proj/v_proj are its slices.
        self.qkv_kernel = nnx.Param(_normal(in_std)(rngs.params(), (d, 3, h, dh), pd))
        self.qkv_bias = nnx.Param(jnp.zeros((3, h, dh), pd))
        self.out_kernel = nnx.Param(_normal(out_std)(rngs.params(), (h, dh, d), pd))
        self.out_bias = nnx.Param(jnp.zeros((d,), pd))
        self.dtype = jnp.dtype(cfg.dtype)
        self.impl = cfg.attention_impl

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Optional[Array] = None) -> Array:
        dt = self.dtype
        qkv = jnp.einsum("btd,dshk->sbhtk", x.astype(dt), self.qkv_kernel[...].astype(dt))
        qkv = qkv + self.qkv_bias[...].astype(dt)[:, None, :, None, :]
        q, k, v = qkv[0], qkv[1], qkv[2]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attention(q, k, v, mask, impl=self.impl)
        return jnp.einsum("bhtk,hkd->btd", o, self.out_kernel[...].astype(dt)) + self.out_bias[...].astype(dt)


class MLP(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        pd = jnp.dtype(cfg.param_dtype)
        fc1_std = (2 * d) ** -0.5 * cfg.initializer_factor
        fc2_std = d**-0.5 * (2 * cfg.num_layers) ** -0.5 * cfg.initializer_factor
        self.fc1_kernel = nnx.Param(_normal(fc1_std)(rngs.params(), (d, f), pd))
        self.fc1_bias = nnx.Param(jnp.zeros((f,), pd))
        self.fc2_kernel = nnx.Param(_normal(fc2_std)(rngs.params(), (f, d), pd))
        self.fc2_bias = nnx.Param(jnp.zeros((d,), pd))
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x: Array) -> Array:
        dt = self.dtype
        h = x.astype(dt) @ self.fc1_kernel[...].astype(dt) + self.fc1_bias[...].astype(dt)
        h = gelu_exact(h)
        return h @ self.fc2_kernel[...].astype(dt) + self.fc2_bias[...].astype(dt)


class Block(nnx.Module):
    """Pre-norm transformer block (HF ``MLCDEncoderLayer``)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.attn = Attention(cfg, rngs=rngs)
        self.norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Optional[Array] = None) -> Array:
        if jax.default_backend() == "cpu":
            x = materialize_grad(x)
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


def _run_block(block: Block, x, cos, sin, mask):
    return block(x, cos, sin, mask)


class ViT(nnx.Module):
    """The MLCD/RICE backbone. ``model(pixels [B,H,W,3])`` -> :class:`ViTOutput`.

    The pieces (``embed``, ``rope``, ``blocks``, ``post_norm``) are public so the
    RICE model can run the last blocks on an extended token sequence.
    """

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        pd = jnp.dtype(cfg.param_dtype)
        f = cfg.initializer_factor
        # Patch embedding kernel in Flax conv layout HWIO [p, p, C, D], no bias.
        self.patch_kernel = nnx.Param(_normal(cfg.initializer_range * f)(rngs.params(), (p, p, c, d), pd))
        self.class_embedding = nnx.Param(_normal(d**-0.5 * f)(rngs.params(), (d,), pd))
        self.class_pos_emb = nnx.Param(_normal((cfg.head_dim // 2) ** -0.5 * f)(rngs.params(), (1, cfg.head_dim // 2), pd))
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=pd)
        self.pre_norm = LayerNorm(d, cfg.layer_norm_eps, **kw)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.post_norm = LayerNorm(d, cfg.layer_norm_eps, **kw)
        self.num_prefix_tokens = 1        # the class token precedes the patch tokens
        if cfg.remat_policy == "none":
            self._block_fn = _run_block
        else:
            policy = getattr(jax.checkpoint_policies, cfg.remat_policy)
            self._block_fn = nnx.remat(_run_block, policy=policy)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        p = self.cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"image {height}x{width} is not a multiple of the patch size {p}")
        return height // p, width // p

    def embed(self, pixels: Array) -> Array:
        """``pixels [B, H, W, C]`` -> pre-normed tokens ``[B, 1 + T, D]`` (class token first)."""
        b, hh, ww, c = pixels.shape
        gh, gw = self.grid(hh, ww)
        p, dt = self.cfg.patch_size, jnp.dtype(self.cfg.dtype)
        patches = pixels.astype(dt).reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, gh * gw, p * p * c)
        x = patches @ self.patch_kernel[...].astype(dt).reshape(p * p * c, -1)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(dt), (b, 1, x.shape[-1]))
        return self.pre_norm(jnp.concatenate([cls, x], axis=1))

    def rope(self, grid_h: int, grid_w: int, num_extra: int = 0) -> tuple[Array, Array]:
        """cos/sin ``[1 + T + num_extra, Dh/2]``; extra (region) tokens reuse the class angles."""
        ang = rope_angles(self.cfg, self.class_pos_emb[...], grid_h, grid_w)
        if num_extra:
            ang = jnp.concatenate([ang, jnp.broadcast_to(ang[:1], (num_extra, ang.shape[1]))], axis=0)
        return jnp.cos(ang), jnp.sin(ang)

    def run_block(self, i: int, x: Array, cos: Array, sin: Array, mask: Optional[Array] = None) -> Array:
        return self._block_fn(self.blocks[i], x, cos, sin, mask)

    def run_blocks(self, x: Array, cos: Array, sin: Array, start: int = 0, stop: Optional[int] = None,
                   mask: Optional[Array] = None, hidden: Optional[list] = None) -> Array:
        """Blocks ``start .. stop-1`` on ``x``; each block's output is appended to ``hidden`` when given.

        The one block loop: the plain forward, the RICE model (blocks before and on the region
        tokens) and feature extraction (per-block outputs) all run through it."""
        stop = self.cfg.num_layers if stop is None else stop
        for i in range(start, stop):
            x = self.run_block(i, x, cos, sin, mask)
            if hidden is not None:
                hidden.append(x)
        return x

    def encode(self, pixels: Array, stop: Optional[int] = None, hidden: Optional[list] = None) -> Array:
        """``pixels [B,H,W,C]`` -> tokens ``[B,1+T,D]`` after blocks ``0 .. stop-1`` (all by default);
        the embeddings and each block's output are appended to ``hidden`` when given."""
        gh, gw = self.grid(pixels.shape[1], pixels.shape[2])
        x = self.embed(pixels)
        if hidden is not None:
            hidden.append(x)
        cos, sin = self.rope(gh, gw)
        return self.run_blocks(x, cos, sin, stop=stop, hidden=hidden)

    def __call__(self, pixels: Array, output_hidden_states: bool = False) -> ViTOutput:
        hidden = [] if output_hidden_states else None
        x = self.encode(pixels, hidden=hidden)
        return ViTOutput(last_hidden_state=x, pooler_output=self.post_norm(x[:, 0]),
                         hidden_states=tuple(hidden) if hidden is not None else None)
