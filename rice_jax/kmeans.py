"""k-means on the device mesh, with the centres sharded along K like the loss's centre matrices.

    km = MeshKMeans(k=1_000_000, dim=256, metric="cosine")
    km.fit(features)                 # a [R, D] array or memmap, streamed in batches
    labels, inertia = km.assign(features)

Why on the mesh: the paper clusters ~2B region features into K = 1M centres. At
that size no single device should hold the ``[K, D]`` centres, their running
sums, or a ``[B, K]`` score matrix — the same constraint the class-parallel
loss solves (``docs/design.md §5``), so clustering uses the same layout:

- centres ``[K, D]`` sharded along K over every device (``P(("data", "fsdp"))``);
  K padded to a multiple of the device count, padded rows never win;
- per step the batch ``[B, D]`` is all-gathered (O(B·D)), each device scores
  its own centre shard (``[B, K/W]``), and the global nearest centre comes
  from a cross-shard max of the score followed by a min of the index among
  the shards that reach it (ties resolve to the smallest index, as in NumPy);
- each device adds the rows assigned to *its* centres into its shard of the
  running sums / counts, so the Lloyd update needs no communication at all.

Lloyd iterations stream the features once per pass. Empty clusters are
re-seeded with random feature rows (deterministic from the seed and pass).
``metric="cosine"`` is spherical k-means (unit rows, centres re-normalised;
score = cosine); ``"euclidean"`` minimises squared distance (score =
``2 x·c − |c|²``) and matches scikit-learn's Lloyd given the same init.
With ``checkpoint_dir`` the state is saved after every pass (Orbax, sharded),
and a rerun resumes from the last finished pass.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rice_jax import sharding
from rice_jax.losses import padded_num_classes
from rice_jax.sharding import ALL_AXES

METRICS = ("cosine", "euclidean")


def _normalize(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _scores(x, c, metric):
    """Higher is nearer: cosine of unit rows, or ``2 x·c − |c|²`` (= |x|² − squared distance)."""
    xc = jnp.dot(x, c.T, precision=jax.lax.Precision.HIGHEST)
    if metric == "cosine":
        return xc
    return 2.0 * xc - jnp.sum(c * c, axis=-1)[None, :]


def _nearest_shard(c_s, x_s, valid_s, *, axis, k_real, metric):
    """On one centre shard: global (best score, nearest index) of every row of the all-gathered batch."""
    x = jax.lax.all_gather(x_s, axis, tiled=True)
    valid = jax.lax.all_gather(valid_s, axis, tiled=True)
    if metric == "cosine":
        x = _normalize(x)
    ks = c_s.shape[0]
    offset = jax.lax.axis_index(axis) * ks
    score = _scores(x, c_s, metric)
    score = jnp.where((jnp.arange(ks) + offset < k_real)[None, :], score, -jnp.inf)
    local_best = jnp.max(score, axis=-1)
    local_arg = jnp.argmax(score, axis=-1).astype(jnp.int32) + offset
    best = jax.lax.pmax(local_best, axis)
    big = jnp.iinfo(jnp.int32).max
    arg = jax.lax.pmin(jnp.where(local_best == best, local_arg, big), axis)
    return x, valid, best, arg, offset


def _topk_shard(c_s, x_s, valid_s, *, axis, k_real, metric, topk):
    """The ``topk`` nearest centres of every row: local top-k per shard, then top-k of the gathered
    ``W·topk`` candidates (O(B·topk·W) communication, never ``[B, K]``)."""
    x = jax.lax.all_gather(x_s, axis, tiled=True)
    if metric == "cosine":
        x = _normalize(x)
    ks = c_s.shape[0]
    offset = jax.lax.axis_index(axis) * ks
    score = _scores(x, c_s, metric)
    score = jnp.where((jnp.arange(ks) + offset < k_real)[None, :], score, -jnp.inf)
    val, idx = jax.lax.top_k(score, min(topk, ks))
    vals = jax.lax.all_gather(val, axis, axis=1, tiled=True)                 # [B, W·t], shard-major
    idxs = jax.lax.all_gather(idx.astype(jnp.int32) + offset, axis, axis=1, tiled=True)
    best, pos = jax.lax.top_k(vals, topk)
    return best, jnp.take_along_axis(idxs, pos, axis=1)


def _accumulate_shard(c_s, sums_s, counts_s, x_s, valid_s, *, axis, k_real, metric):
    x, valid, best, arg, offset = _nearest_shard(c_s, x_s, valid_s, axis=axis, k_real=k_real, metric=metric)
    ks = c_s.shape[0]
    mine = valid & (arg >= offset) & (arg < offset + ks)
    local = jnp.where(mine, arg - offset, ks)  # ks = "not mine": dropped by the scatters
    sums_s = sums_s.at[local].add(x, mode="drop")
    counts_s = counts_s.at[local].add(1, mode="drop")
    return sums_s, counts_s, _inertia(x, best, valid, metric), jnp.where(valid, arg, -1)


def _inertia(x, best, valid, metric):
    """Sum of squared distances of the valid rows to their nearest centre (unit centres for cosine)."""
    d2 = 2.0 - 2.0 * best if metric == "cosine" else jnp.sum(x * x, axis=-1) - best
    return jnp.sum(jnp.where(valid, jnp.maximum(d2, 0.0), 0.0))


class MeshKMeans:
    """k-means whose centres live sharded along K over ``mesh`` (default: every device)."""

    def __init__(self, k: int, dim: int, *, metric: str = "cosine", mesh=None, batch_size: int = 16384,
                 seed: int = 0, checkpoint_dir: Optional[str] = None, log: Callable[[str], None] = print):
        if metric not in METRICS:
            raise ValueError(f"metric {metric!r}: use one of {METRICS}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k, self.dim, self.metric, self.seed, self.log = k, dim, metric, seed, log
        self.mesh = mesh if mesh is not None else sharding.make_mesh(-1, 1)
        w = self.mesh.size
        self.k_pad = padded_num_classes(k, w)
        self.batch_size = max(w, -(-batch_size // w) * w)
        self.checkpoint_dir = checkpoint_dir
        self.row_sharding = NamedSharding(self.mesh, P(ALL_AXES, None))
        self.vec_sharding = NamedSharding(self.mesh, P(ALL_AXES))
        self.centers = None
        self.passes_done = 0
        self._topk_fns = {}
        kw = dict(axis=ALL_AXES, k_real=k, metric=metric)
        shard_map = functools.partial(jax.shard_map, mesh=self.mesh, check_vma=False)
        rows, vec = P(ALL_AXES, None), P(ALL_AXES)
        self._accumulate = jax.jit(shard_map(
            functools.partial(_accumulate_shard, **kw), in_specs=(rows, rows, vec, rows, vec),
            out_specs=(rows, vec, P(), P())), donate_argnums=(1, 2))
        self._nearest = jax.jit(shard_map(
            lambda c, x, v: _nearest_shard(c, x, v, **kw)[1:4], in_specs=(rows, rows, vec),
            out_specs=(P(), P(), P())))

    # ---------------------------------------------------------------- state
    def _zeros(self):
        sums = jax.device_put(np.zeros((self.k_pad, self.dim), np.float32), self.row_sharding)
        counts = jax.device_put(np.zeros((self.k_pad,), np.int32), self.vec_sharding)
        return sums, counts

    def set_centers(self, centers: np.ndarray) -> None:
        """Initial (or given) centres ``[K, D]``; rows are placed shard by shard."""
        centers = np.asarray(centers, np.float32)
        if centers.shape != (self.k, self.dim):
            raise ValueError(f"centres {centers.shape}, expected {(self.k, self.dim)}")
        full = np.zeros((self.k_pad, self.dim), np.float32)
        full[: self.k] = centers / np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-12) \
            if self.metric == "cosine" else centers
        self.centers = jax.make_array_from_callback(full.shape, self.row_sharding, lambda idx: full[idx])

    def init_random(self, feats) -> None:
        """K distinct random rows of ``feats`` as the initial centres (deterministic from the seed)."""
        if len(feats) < self.k:
            raise ValueError(f"{len(feats)} feature rows for K = {self.k}: need at least K rows (lower K)")
        rng = np.random.default_rng(self.seed)
        idx = np.sort(rng.choice(len(feats), self.k, replace=False))
        self.set_centers(np.asarray(feats[idx], np.float32))

    def init_kmeans_plusplus(self, feats, sample: int = 65536) -> None:
        """k-means++ on a random sample (for small K; it is O(K · sample))."""
        from sklearn.cluster import kmeans_plusplus

        rng = np.random.default_rng(self.seed)
        idx = np.sort(rng.choice(len(feats), min(len(feats), max(sample, self.k)), replace=False))
        x = np.asarray(feats[idx], np.float32)
        if self.metric == "cosine":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        centers, _ = kmeans_plusplus(x, self.k, random_state=self.seed)
        self.set_centers(centers)

    # ---------------------------------------------------------------- passes
    def _batches(self, feats):
        """Global batches ``(x [B, D], valid [B])`` over ``feats`` in order, the last one padded."""
        n, b = len(feats), self.batch_size
        for start in range(0, n, b):
            chunk = np.asarray(feats[start:start + b], np.float32)
            valid = np.zeros(b, bool)
            valid[: len(chunk)] = True
            if len(chunk) < b:
                chunk = np.concatenate([chunk, np.zeros((b - len(chunk), self.dim), np.float32)])
            yield start, jax.device_put(chunk, self.row_sharding), jax.device_put(valid, self.vec_sharding)

    def lloyd_pass(self, feats) -> float:
        """One assignment sweep over ``feats`` + the centre update; returns the sweep's inertia."""
        sums, counts = self._zeros()
        inertia = 0.0
        for _, x, valid in self._batches(feats):
            sums, counts, part, _ = self._accumulate(self.centers, sums, counts, x, valid)
            inertia += float(part)
        self.centers = self._update(sums, counts, feats)
        self.passes_done += 1
        return inertia

    def _update(self, sums, counts, feats):
        counts_host = np.asarray(jax.device_get(counts))[: self.k]
        empty = np.nonzero(counts_host == 0)[0]
        new = jax.jit(lambda s, c: s / jnp.maximum(c, 1)[:, None].astype(s.dtype),
                      out_shardings=self.row_sharding)(sums, counts)
        keep = jax.jit(lambda n, o, c: jnp.where((c > 0)[:, None], n, o), out_shardings=self.row_sharding)
        new = keep(new, self.centers, counts)
        if len(empty):
            # Re-seed empty clusters with random rows (deterministic from seed and pass).
            rng = np.random.default_rng([self.seed, self.passes_done])
            rows = np.asarray(feats[np.sort(rng.choice(len(feats), len(empty), replace=len(feats) < len(empty)))],
                              np.float32)
            new = jax.jit(lambda c, i, r: c.at[i].set(r), out_shardings=self.row_sharding)(
                new, jnp.asarray(empty, jnp.int32), jnp.asarray(rows))
            self.log(f"[kmeans] pass {self.passes_done + 1}: {len(empty)} empty cluster(s) re-seeded")
        if self.metric == "cosine":
            new = jax.jit(_normalize, out_shardings=self.row_sharding)(new)
        return new

    def fit(self, feats, passes: int = 20, init: str = "random") -> "MeshKMeans":
        """``passes`` Lloyd iterations from ``init`` (``random`` | ``kmeans++`` | ``given``), resuming
        from ``checkpoint_dir`` when a previous run saved passes there."""
        mngr = self._checkpoints()
        if mngr is not None and mngr.latest_step() is not None:
            self._restore(mngr)
            self.log(f"[kmeans] resumed after pass {self.passes_done}")
        elif init == "random":
            self.init_random(feats)
        elif init == "kmeans++":
            self.init_kmeans_plusplus(feats)
        elif init != "given" or self.centers is None:
            raise ValueError(f"init {init!r}: use random, kmeans++, or given (after set_centers)")
        while self.passes_done < passes:
            inertia = self.lloyd_pass(feats)
            self.log(f"[kmeans] pass {self.passes_done}/{passes}: inertia {inertia:.6g} (before the update)")
            if mngr is not None:
                self._save(mngr)
        if mngr is not None:
            mngr.wait_until_finished()
            mngr.close()
        return self

    def assign(self, feats) -> tuple[np.ndarray, float]:
        """Nearest centre of every row of ``feats`` and the total inertia (squared distances)."""
        labels = np.empty(len(feats), np.int32)
        inertia = 0.0
        for start, x, valid in self._batches(feats):
            _, best, arg = self._nearest(self.centers, x, valid)
            xs = np.asarray(feats[start:start + self.batch_size], np.float32)
            n = len(xs)
            best = np.asarray(best)[:n]
            labels[start:start + n] = np.asarray(arg)[:n]
            if self.metric == "cosine":
                d2 = 2.0 - 2.0 * best
            else:
                d2 = np.sum(xs.astype(np.float64) ** 2, axis=1) - best
            inertia += float(np.sum(np.maximum(d2, 0.0)))
        return labels, inertia

    def centers_numpy(self) -> np.ndarray:
        return np.asarray(jax.device_get(self.centers))[: self.k]

    def assign_topk(self, feats, topk: int) -> tuple[np.ndarray, np.ndarray]:
        """``(labels [R, topk], scores [R, topk])``: the ``topk`` nearest centres of every row, nearest
        first (multi-label use: a region's several clusters)."""
        if not 1 <= topk <= self.k:
            raise ValueError(f"topk {topk} must be in [1, K={self.k}]")
        key = ("topk", topk)
        if key not in self._topk_fns:
            rows, vec = P(ALL_AXES, None), P(ALL_AXES)
            self._topk_fns[key] = jax.jit(jax.shard_map(
                functools.partial(_topk_shard, axis=ALL_AXES, k_real=self.k, metric=self.metric, topk=topk),
                mesh=self.mesh, in_specs=(rows, rows, vec), out_specs=(P(), P()), check_vma=False))
        labels = np.empty((len(feats), topk), np.int32)
        scores = np.empty((len(feats), topk), np.float32)
        for start, x, valid in self._batches(feats):
            best, arg = self._topk_fns[key](self.centers, x, valid)
            n = min(self.batch_size, len(feats) - start)
            labels[start:start + n], scores[start:start + n] = np.asarray(arg)[:n], np.asarray(best)[:n]
        return labels, scores

    # ---------------------------------------------------------------- checkpoints
    def _checkpoints(self):
        if not self.checkpoint_dir:
            return None
        import orbax.checkpoint as ocp

        from rice_jax import storage

        return ocp.CheckpointManager(storage.path(self.checkpoint_dir),
                                     options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                                                          enable_async_checkpointing=False))

    def _save(self, mngr) -> None:
        import orbax.checkpoint as ocp

        scalar = lambda v: np.asarray(v, np.int64)
        state = {"centers": self.centers, "passes_done": scalar(self.passes_done), "k": scalar(self.k),
                 "seed": scalar(self.seed)}
        mngr.save(self.passes_done, args=ocp.args.StandardSave(state), force=True)

    def _restore(self, mngr) -> None:
        import orbax.checkpoint as ocp

        abstract = {"centers": jax.ShapeDtypeStruct((self.k_pad, self.dim), jnp.float32, sharding=self.row_sharding),
                    "passes_done": np.zeros((), np.int64), "k": np.zeros((), np.int64), "seed": np.zeros((), np.int64)}
        state = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(abstract))
        if int(state["k"]) != self.k or int(state["seed"]) != self.seed:
            raise ValueError(f"{self.checkpoint_dir}: k-means state for K={int(state['k'])}, seed={int(state['seed'])}; "
                             f"this run has K={self.k}, seed={self.seed} (use another checkpoint dir)")
        self.centers = state["centers"]
        self.passes_done = int(state["passes_done"])


def compiled_memory_per_device(k: int, dim: int, batch_size: int, mesh=None) -> dict:
    """Per-device bytes of one accumulation step compiled for ``k`` centres (abstract shapes only:
    nothing is allocated). For sizing, and for the test that memory falls as 1/W."""
    km = MeshKMeans.__new__(MeshKMeans)
    MeshKMeans.__init__(km, k, dim, mesh=mesh, batch_size=batch_size, log=lambda s: None)
    rows = lambda n: jax.ShapeDtypeStruct((n, dim), jnp.float32, sharding=km.row_sharding)
    vec = lambda n, dt: jax.ShapeDtypeStruct((n,), dt, sharding=km.vec_sharding)
    b = km.batch_size
    mem = km._accumulate.lower(rows(km.k_pad), rows(km.k_pad), vec(km.k_pad, jnp.int32), rows(b),
                               vec(b, jnp.bool_)).compile().memory_analysis()
    return {"argument_bytes": int(mem.argument_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes),
            "total_bytes": int(mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes)}
