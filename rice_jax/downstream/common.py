"""What the downstream heads share: resampling between the patch grid and pixels, and the head
training loop (AdamW, warmup + cosine, a fixed seed: the same head budget for every backbone)."""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """``[out_size, in_size]`` weights of half-pixel-centred bilinear resampling (edges clamped):
    ``y = R @ x`` resizes a 1-D signal; ``R_h @ X @ R_w.T`` an image. One matrix for training (in
    JAX) and for evaluation at the original resolution (in numpy), so both see the same upsampling."""
    pos = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
    pos = np.clip(pos, 0, in_size - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = pos - lo
    r = np.zeros((out_size, in_size), np.float32)
    r[np.arange(out_size), lo] += 1 - frac
    r[np.arange(out_size), hi] += frac
    return r


def upsample(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """``x [..., h, w]`` -> ``[..., height, width]`` (bilinear, :func:`bilinear_matrix`), numpy float32."""
    rh, rw = bilinear_matrix(height, x.shape[-2]), bilinear_matrix(width, x.shape[-1])
    return np.einsum("Hh,...hw,Ww->...HW", rh, np.asarray(x, np.float32), rw, optimize=True)


def chunks(it, n: int):
    """Lists of ``n`` consecutive items of ``it`` (the last one shorter): evaluation streams a split
    in chunks of images, so a split's full-resolution masks or labels are never held at once."""
    chunk = []
    for x in it:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def area_resize(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A full-resolution mask ``[H, W]`` -> the share of each target cell it covers (soft target)."""
    from PIL import Image

    return np.asarray(Image.fromarray(mask.astype(np.float32), mode="F").resize((width, height), Image.BOX),
                      np.float32)


@dataclasses.dataclass(frozen=True)
class HeadTraining:
    """The head's optimisation, identical for every backbone of a comparison."""
    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    seed: int = 0


def train_head(head: nnx.Module, loss_fn, batch_of, n: int, cfg: HeadTraining, log=None) -> list[float]:
    """Fit ``head`` minimising ``loss_fn(head, batch) -> scalar`` over batches ``batch_of(indices)``
    (a dict of arrays) of ``n`` examples drawn with replacement by a seeded generator (features are
    looked up per batch, never duplicated per example). Returns the loss every 100 steps."""
    warm = min(cfg.warmup_steps, max(1, cfg.steps // 10))
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warm, max(cfg.steps, warm + 1))
    opt = nnx.Optimizer(head, optax.adamw(sched, weight_decay=cfg.weight_decay), wrt=nnx.Param)

    graphdef, state = nnx.split((head, opt))

    @jax.jit   # split/merge around a pure step: no graph traversal per call
    def step(state, batch):
        head, opt = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(head, batch)
        opt.update(head, grads)
        return nnx.state((head, opt)), loss

    rng = np.random.default_rng(cfg.seed)
    losses, t0 = [], time.perf_counter()
    for i in range(cfg.steps):
        idx = rng.integers(0, n, min(cfg.batch_size, n))
        state, loss = step(state, jax.tree.map(jnp.asarray, batch_of(idx)))
        if i % 100 == 0 or i == cfg.steps - 1:
            losses.append(float(loss))
            if log:
                log(f"  head step {i + 1}/{cfg.steps}: loss {float(loss):.4f} ({time.perf_counter() - t0:.0f} s)")
    nnx.update(head, nnx.state(nnx.merge(graphdef, state)[0]))
    return losses
