"""Region Transformer layer pieces: box -> patch visibility, and the region attention mask.

Token sequence in the region blocks: ``[cls; p_1..p_T; r_1..r_N]``.

Visibility rule (exact): the model input is split into a ``gh x gw`` grid;
patch (row i, col j) covers ``[j/gw, (j+1)/gw) x [i/gh, (i+1)/gh)`` in
normalised coordinates. It is visible to box ``(x0, y0, x1, y1)`` when the
open intersection of cell and box has positive area, i.e.
``j < x1·gw and j + 1 > x0·gw`` (same for rows): a box edge lying exactly on
a cell boundary does not pull in the neighbour. The patch containing the box
centre is always visible, so a box smaller than one patch (or degenerate)
still sees one patch. Padded regions (``region_valid=False``) see no patch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def box_patch_visibility(boxes: Array, region_valid: Array, grid_h: int, grid_w: int) -> Array:
    """``boxes [B,N,4]`` normalised xyxy -> visibility ``[B,N,T]`` bool over row-major patches."""
    boxes = boxes.astype(jnp.float32)
    x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
    cols = jnp.arange(grid_w, dtype=jnp.float32)
    rows = jnp.arange(grid_h, dtype=jnp.float32)
    col_in = (cols < (x1 * grid_w)[..., None]) & (cols + 1 > (x0 * grid_w)[..., None])   # [B,N,gw]
    row_in = (rows < (y1 * grid_h)[..., None]) & (rows + 1 > (y0 * grid_h)[..., None])   # [B,N,gh]
    cx = jnp.clip(jnp.floor((x0 + x1) * 0.5 * grid_w), 0, grid_w - 1)
    cy = jnp.clip(jnp.floor((y0 + y1) * 0.5 * grid_h), 0, grid_h - 1)
    col_in = col_in | (cols == cx[..., None])
    row_in = row_in | (rows == cy[..., None])
    vis = row_in[..., :, None] & col_in[..., None, :]                                      # [B,N,gh,gw]
    vis = vis.reshape(*vis.shape[:-2], grid_h * grid_w)
    return vis & region_valid[..., None].astype(bool)


def region_attention_mask(visibility: Array, *, attend_cls: bool = False) -> Array:
    """Boolean mask ``[B, 1, S, S]`` (broadcast over heads), ``S = 1 + T + N``.

    Image tokens see only image tokens, so the image path is exactly the plain
    ViT; region token l sees itself and the patches of box l (and cls if asked).
    """
    b, n, t = visibility.shape
    img = 1 + t
    top = jnp.concatenate([jnp.ones((b, img, img), bool), jnp.zeros((b, img, n), bool)], axis=2)
    cls_col = jnp.full((b, n, 1), attend_cls, bool)
    self_only = jnp.broadcast_to(jnp.eye(n, dtype=bool), (b, n, n))
    bottom = jnp.concatenate([cls_col, visibility.astype(bool), self_only], axis=2)
    return jnp.concatenate([top, bottom], axis=1)[:, None]


def roi_mean_pool(patch_tokens: Array, visibility: Array) -> Array:
    """Mean of the visible patch tokens per box: ``[B,T,D]`` x ``[B,N,T]`` -> ``[B,N,D]`` (zeros if none)."""
    vis = visibility.astype(patch_tokens.dtype)
    return jnp.einsum("bnt,btd->bnd", vis, patch_tokens) / jnp.maximum(vis.sum(-1, keepdims=True), 1.0)


def roi_align(patch_tokens: Array, boxes: Array, grid_h: int, grid_w: int, out_h: int, out_w: int) -> Array:
    """Box-aligned samples of the patch grid: ``[B,T,D]`` x ``boxes [B,N,4]`` -> ``[B,N,out_h,out_w,D]``.

    Sample ``(i, j)`` of a box is the bilinear interpolation of the patch tokens at the centre of
    cell ``(i, j)`` of an ``out_h x out_w`` split of the box (one point per cell, RoIAlign with
    sampling ratio 1). Patch ``(r, c)`` sits at its cell's centre ``((c+0.5)/gw, (r+0.5)/gh)``;
    points outside the centres' hull take the nearest edge patch. Unlike the mean pool, the
    result keeps *where in the box* each feature is, which reading a word needs."""
    b, t, d = patch_tokens.shape
    grid = patch_tokens.reshape(b, grid_h, grid_w, d)
    boxes = boxes.astype(jnp.float32)
    fy = (jnp.arange(out_h, dtype=jnp.float32) + 0.5) / out_h
    fx = (jnp.arange(out_w, dtype=jnp.float32) + 0.5) / out_w
    x0, y0, x1, y1 = (boxes[..., i, None] for i in range(4))
    ys = jnp.clip((y0 + (y1 - y0) * fy) * grid_h - 0.5, 0, grid_h - 1)      # [B,N,oh] in patch rows
    xs = jnp.clip((x0 + (x1 - x0) * fx) * grid_w - 0.5, 0, grid_w - 1)      # [B,N,ow]
    r0, c0 = jnp.floor(ys).astype(jnp.int32), jnp.floor(xs).astype(jnp.int32)
    r1, c1 = jnp.minimum(r0 + 1, grid_h - 1), jnp.minimum(c0 + 1, grid_w - 1)
    wy, wx = (ys - r0)[..., :, None, None], (xs - c0)[..., None, :, None]

    def take(r, c):   # [B,N,oh], [B,N,ow] -> [B,N,oh,ow,D]
        return jax.vmap(lambda g, rr, cc: g[rr[:, :, None], cc[:, None, :]])(grid, r, c)

    top = take(r0, c0) * (1 - wx) + take(r0, c1) * wx
    bottom = take(r1, c0) * (1 - wx) + take(r1, c1) * wx
    return (top * (1 - wy) + bottom * wy).astype(patch_tokens.dtype)
