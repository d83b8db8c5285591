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

Lloyd iterations stream the features once per pass. An empty cluster takes
half of a populated one (donors chosen greedily by squared error, the copies pushed apart
by ±1/1024; deterministic from the seed and pass).
``metric="cosine"`` is spherical k-means (unit rows, centres re-normalised;
score = cosine); ``"euclidean"`` minimises squared distance (score =
``2 x·c − |c|²``) and matches scikit-learn's Lloyd given the same init.
With ``checkpoint_dir`` the state is saved after every pass (Orbax, sharded),
and a rerun resumes from the last finished pass.
"""
from __future__ import annotations

import concurrent.futures
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rice_jax import cli, distributed, errors, sharding, storage
from rice_jax.losses import l2_normalize, padded_num_classes
from rice_jax.sharding import ALL_AXES

METRICS = ("cosine", "euclidean")
SCORE_BLOCK = 512   # centres scored at once per device (see _nearest_in_shard)
SPLIT_EPS = 1.0 / 1024   # relative push apart of the two halves of a split cluster (as faiss)


PRECISIONS = ("float32", "bfloat16")


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bfloat16`` where a matrix unit runs bf16 (TPU, GPU), ``float32`` on CPU (no bf16
    matrix unit: bf16 scoring measured 0.88-0.96x there); anything else as given, checked."""
    if precision == "auto":
        return "bfloat16" if jax.default_backend() in ("tpu", "gpu") else "float32"
    if precision not in PRECISIONS:
        raise errors.InputError(f"scoring precision {precision!r}: use auto or one of {PRECISIONS}")
    return precision


def _scores(x, c, metric, precision="float32"):
    """Higher is nearer: cosine of unit rows, or ``2 x·c − |c|²`` (= |x|² − squared distance).

    ``precision="bfloat16"``: bf16 inputs, fp32 accumulation (the MXU / tensor-core rate; the
    assignment agreement with fp32 is measured in docs/data.md); the update sums stay fp32."""
    if precision == "bfloat16":
        xc = jnp.dot(x.astype(jnp.bfloat16), c.astype(jnp.bfloat16).T, preferred_element_type=jnp.float32)
    else:
        xc = jnp.dot(x, c.T, precision=jax.lax.Precision.HIGHEST)
    if metric == "cosine":
        return xc
    return 2.0 * xc - jnp.sum(c * c, axis=-1)[None, :]


def _nearest_in_shard(x, c_s, offset, *, k_real, metric, block, precision="float32"):
    """(best score, first index reaching it) of every row over this shard's centres, ``block``
    centres at a time: the ``[B, block]`` scores stay in cache while they are reduced, instead of a
    ``[B, K/W]`` array being written and read twice (measured 3.3x faster on XLA:CPU at B = 8192,
    K/W = 10K). Ties go to the smallest index, as NumPy's argmax."""
    if precision == "bfloat16":
        return _nearest_in_shard_reranked(x, c_s, offset, k_real=k_real, metric=metric, block=block)
    ks = c_s.shape[0]
    nb = ks // block
    big = jnp.iinfo(jnp.int32).max
    cols = jnp.arange(block, dtype=jnp.int32)

    def body(carry, inp):
        best, arg = carry
        c_blk, j = inp
        first = offset + j * block
        score = _scores(x, c_blk, metric, precision)
        score = jnp.where((cols + first < k_real)[None, :], score, -jnp.inf)   # padded centres never win
        m = jnp.max(score, axis=-1)
        i = jnp.min(jnp.where(score == m[:, None], cols[None, :], big), axis=-1) + first
        better = m > best
        return (jnp.where(better, m, best), jnp.where(better, i, arg)), None

    init = (jnp.full((x.shape[0],), -jnp.inf, jnp.float32), jnp.full((x.shape[0],), big, jnp.int32))
    (best, arg), _ = jax.lax.scan(body, init, (c_s.reshape(nb, block, -1), jnp.arange(nb, dtype=jnp.int32)))
    return best, arg


def _top1(score, cols, big):
    """(max, first column reaching it) of every row."""
    m = jnp.max(score, axis=-1)
    return m, jnp.min(jnp.where(score == m[:, None], cols[None, :], big), axis=-1)


def _nearest_in_shard_reranked(x, c_s, offset, *, k_real, metric, block):
    """:func:`_nearest_in_shard` at bf16 matmul cost with float32's answer: every block is scored in
    bf16 (fp32 accumulation) keeping each row's two best centres, and those two are rescored in
    float32 at the end (a ``[B, 2, D]`` gather, ~2/K of the matmul). A bf16 score is off by ~1e-3,
    so the true nearest is missed only when two other centres both score above it in bf16 — then
    the one chosen is within that error of it. Ties go to the smaller index."""
    ks = c_s.shape[0]
    nb = ks // block
    big = jnp.iinfo(jnp.int32).max
    cols = jnp.arange(block, dtype=jnp.int32)
    rows = x.shape[0]

    def body(carry, inp):
        b1, i1, b2, i2 = carry
        c_blk, j = inp
        first = offset + j * block
        score = _scores(x, c_blk, metric, "bfloat16")
        score = jnp.where((cols + first < k_real)[None, :], score, -jnp.inf)   # padded centres never win
        m1, j1 = _top1(score, cols, big)
        m2, j2 = _top1(jnp.where(cols[None, :] == j1[:, None], -jnp.inf, score), cols, big)
        j1, j2 = j1 + first, j2 + first
        # Merge the carried two with the block's two (earlier blocks win ties: smaller indices).
        new_first = m1 > b1
        n1, k1 = jnp.where(new_first, m1, b1), jnp.where(new_first, j1, i1)
        sec_m = jnp.where(new_first, jnp.where(m2 > b1, m2, b1), jnp.where(m1 > b2, m1, b2))
        sec_i = jnp.where(new_first, jnp.where(m2 > b1, j2, i1), jnp.where(m1 > b2, j1, i2))
        return (n1, k1, sec_m, sec_i), None

    neg = jnp.full((rows,), -jnp.inf, jnp.float32)
    none = jnp.full((rows,), big, jnp.int32)
    (b1, i1, b2, i2), _ = jax.lax.scan(body, (neg, none, neg, none),
                                       (c_s.reshape(nb, block, -1), jnp.arange(nb, dtype=jnp.int32)))
    cand = jnp.stack([i1, i2], 1)                                   # [B, 2] global indices
    alive = jnp.stack([b1, b2], 1) > -jnp.inf
    c = jnp.take(c_s, jnp.clip(cand - offset, 0, ks - 1), axis=0)  # [B, 2, D]
    exact = jnp.einsum("bd,btd->bt", x, c, precision=jax.lax.Precision.HIGHEST)
    if metric != "cosine":
        exact = 2.0 * exact - jnp.sum(c * c, axis=-1)
    exact = jnp.where(alive, exact, -jnp.inf)
    second = (exact[:, 1] > exact[:, 0]) | ((exact[:, 1] == exact[:, 0]) & (cand[:, 1] < cand[:, 0]))
    return jnp.where(second, exact[:, 1], exact[:, 0]), jnp.where(second, cand[:, 1], cand[:, 0])


def _nearest_shard(c_s, x_s, valid_s, *, axis, k_real, metric, block, precision="float32"):
    """On one centre shard: global (best score, nearest index) of every row of the all-gathered batch."""
    x = jax.lax.all_gather(x_s, axis, tiled=True)
    valid = jax.lax.all_gather(valid_s, axis, tiled=True)
    if metric == "cosine":
        x = l2_normalize(x)
    offset = jax.lax.axis_index(axis) * c_s.shape[0]
    local_best, local_arg = _nearest_in_shard(x, c_s, offset, k_real=k_real, metric=metric, block=block,
                                              precision=precision)
    best = jax.lax.pmax(local_best, axis)
    big = jnp.iinfo(jnp.int32).max
    arg = jax.lax.pmin(jnp.where(local_best == best, local_arg, big), axis)
    return x, valid, best, arg, offset


def _topk_shard(c_s, x_s, valid_s, *, axis, k_real, metric, topk, precision="float32"):
    """The ``topk`` nearest centres of every row: local top-k per shard, then top-k of the gathered
    ``W·topk`` candidates (O(B·topk·W) communication, never ``[B, K]``)."""
    x = jax.lax.all_gather(x_s, axis, tiled=True)
    if metric == "cosine":
        x = l2_normalize(x)
    ks = c_s.shape[0]
    offset = jax.lax.axis_index(axis) * ks
    score = _scores(x, c_s, metric, precision)
    score = jnp.where((jnp.arange(ks) + offset < k_real)[None, :], score, -jnp.inf)
    val, idx = jax.lax.top_k(score, min(topk, ks))
    vals = jax.lax.all_gather(val, axis, axis=1, tiled=True)                 # [B, W·t], shard-major
    idxs = jax.lax.all_gather(idx.astype(jnp.int32) + offset, axis, axis=1, tiled=True)
    best, pos = jax.lax.top_k(vals, topk)
    return best, jnp.take_along_axis(idxs, pos, axis=1)


def _accumulate_shard(c_s, sums_s, counts_s, sse_s, x_s, valid_s, *, axis, k_real, metric, block,
                      precision="float32"):
    x, valid, best, arg, offset = _nearest_shard(c_s, x_s, valid_s, axis=axis, k_real=k_real, metric=metric,
                                                 block=block, precision=precision)
    ks = c_s.shape[0]
    mine = valid & (arg >= offset) & (arg < offset + ks)
    local = jnp.where(mine, arg - offset, ks)  # ks = "not mine": dropped by the scatters
    d2 = _sq_dist(x, best, valid, metric)
    sums_s = sums_s.at[local].add(x, mode="drop")
    counts_s = counts_s.at[local].add(1, mode="drop")
    sse_s = sse_s.at[local].add(d2, mode="drop")
    return sums_s, counts_s, sse_s, jnp.sum(d2), jnp.where(valid, arg, -1)


def _sq_dist(x, best, valid, metric):
    """Squared distance of every valid row to its nearest centre (unit centres for cosine); 0 if invalid."""
    d2 = 2.0 - 2.0 * best if metric == "cosine" else jnp.sum(x * x, axis=-1) - best
    return jnp.where(valid, jnp.maximum(d2, 0.0), 0.0)


def _rows_at(feats, idx: np.ndarray, offset: int) -> np.ndarray:
    """Rows at sorted *global* indices ``idx``, assembled from the processes that hold them."""
    mine = (idx >= offset) & (idx < offset + len(feats))
    rows = np.zeros((len(idx), feats.shape[1]), np.float32)
    if mine.any():
        rows[mine] = np.asarray(feats[idx[mine] - offset], np.float32)
    return distributed.sum_over_processes(rows)  # one owner per row


def greedy_donors(weight: np.ndarray, n: int) -> np.ndarray:
    """``n`` donor clusters for empty ones, largest ``weight`` first, where a cluster chosen j times
    competes with ``weight / 2^j`` (each split halves what it has to give). Clusters of weight 0 are
    never chosen (fewer than ``n`` donors come back when no cluster has weight); ties go to the
    smaller index. Only the ``n`` heaviest clusters can be chosen (their first choices already
    outrank every other cluster's), so the heap holds at most ``n`` of them, never all K."""
    import heapq

    weight = np.asarray(weight, np.float64)
    live = np.nonzero(weight > 0)[0]
    if n <= 0 or not len(live):
        return np.zeros(0, np.int64)
    top = live[np.argsort(-weight[live], kind="stable")[:n]]
    heap = [(-float(weight[i]), int(i)) for i in top]
    heapq.heapify(heap)
    donors = np.empty(n, np.int64)
    for t in range(n):
        v, i = heapq.heappop(heap)
        donors[t] = i
        heapq.heappush(heap, (v / 2.0, i))
    return donors


class MeshKMeans:
    """k-means whose centres live sharded along K over ``mesh`` (default: every device)."""

    def __init__(self, k: int, dim: int, *, metric: str = "cosine", mesh=None, batch_size: int = 16384,
                 seed: int = 0, checkpoint_dir: Optional[str] = None, log: Callable[[str], None] = print,
                 precision: str = "auto"):
        if metric not in METRICS:
            raise errors.InputError(f"metric {metric!r}: use one of {METRICS}")
        self.precision = precision = resolve_precision(precision)
        if k < 1:
            raise errors.InputError(f"k must be >= 1, got {k}")
        self.k, self.dim, self.metric, self.seed, self.log = k, dim, metric, seed, log
        self.mesh = mesh if mesh is not None else sharding.make_mesh(-1, 1)
        w = self.mesh.size
        # Centres are scored SCORE_BLOCK at a time inside a shard: pad K to a multiple of W·block.
        self.block = min(SCORE_BLOCK, -(-k // w))
        self.k_pad = padded_num_classes(k, w * self.block)
        self.batch_size = max(w, -(-batch_size // w) * w)
        self.checkpoint_dir = checkpoint_dir
        self.row_sharding = NamedSharding(self.mesh, P(ALL_AXES, None))
        self.vec_sharding = NamedSharding(self.mesh, P(ALL_AXES))
        self.centers = None
        self.passes_done = 0
        self._topk_fns = {}
        kw = dict(axis=ALL_AXES, k_real=k, metric=metric, block=self.block, precision=precision)
        shard_map = functools.partial(jax.shard_map, mesh=self.mesh, check_vma=False)
        rows, vec = P(ALL_AXES, None), P(ALL_AXES)
        self._accumulate = jax.jit(shard_map(
            functools.partial(_accumulate_shard, **kw), in_specs=(rows, rows, vec, vec, rows, vec),
            out_specs=(rows, vec, vec, P(), P())), donate_argnums=(1, 2, 3))
        # The Lloyd update, shard-local: mean of the assigned rows (an empty cluster keeps its centre
        # until re-seeded), re-seeding, re-normalising.
        self._mean = jax.jit(lambda s, c, old: jnp.where((c > 0)[:, None], s / jnp.maximum(c, 1)[:, None], old),
                             out_shardings=self.row_sharding)
        self._reseed = jax.jit(lambda c, i, r: c.at[i].set(r), out_shardings=self.row_sharding)
        self._take = jax.jit(lambda c, i: c[i], out_shardings=NamedSharding(self.mesh, P()))
        self._normalize = jax.jit(l2_normalize, out_shardings=self.row_sharding)
        self._nearest = jax.jit(shard_map(
            lambda c, x, v: _nearest_shard(c, x, v, **kw)[1:4], in_specs=(rows, rows, vec),
            out_specs=(P(), P(), P())))

    # ---------------------------------------------------------------- state
    def _zeros(self):
        sums = jax.device_put(np.zeros((self.k_pad, self.dim), np.float32), self.row_sharding)
        counts = jax.device_put(np.zeros((self.k_pad,), np.int32), self.vec_sharding)
        sse = jax.device_put(np.zeros((self.k_pad,), np.float32), self.vec_sharding)
        return sums, counts, sse

    def set_centers(self, centers: np.ndarray) -> None:
        """Initial (or given) centres ``[K, D]``; rows are placed shard by shard."""
        centers = np.asarray(centers, np.float32)
        if centers.shape != (self.k, self.dim):
            raise ValueError(f"centres {centers.shape}, expected {(self.k, self.dim)}")
        full = np.zeros((self.k_pad, self.dim), np.float32)
        full[: self.k] = l2_normalize(centers) if self.metric == "cosine" else centers
        self.centers = jax.make_array_from_callback(full.shape, self.row_sharding, lambda idx: full[idx])

    def init_random(self, feats) -> None:
        """K distinct random rows of ``feats`` (global indices, deterministic from the seed) as the
        initial centres. Each process reads only the chosen rows it holds and they travel to their
        centre shards device to device (:meth:`place_rows`): no host or device ever holds the
        ``[P, K, D]`` (or even ``[K, D]``) array a host-side gather would build."""
        offset, total = distributed.slice_offsets(len(feats))
        if total < self.k:
            raise errors.InputError(f"{total} feature rows for K = {self.k}: need at least K rows (lower K)")
        chosen = np.sort(np.random.default_rng(self.seed).choice(total, self.k, replace=False))
        mine = np.nonzero((chosen >= offset) & (chosen < offset + len(feats)))[0]
        rows = np.asarray(feats[chosen[mine] - offset], np.float32).reshape(-1, self.dim)
        if self.metric == "cosine":
            rows = l2_normalize(rows)
        self.centers = self.place_rows(rows, mine)

    def place_rows(self, rows: np.ndarray, dest: np.ndarray) -> jax.Array:
        """This process's ``rows [n, D]`` at centre indices ``dest [n]`` (each index given by exactly one
        process; the rest stay 0) as the ``[K_pad, D]`` centre matrix sharded along K.

        The host splits its rows over its own devices and buckets each device's rows by the device
        whose centre shard they go to; one ``all_to_all`` delivers the buckets and every device
        scatters what it received into its shard. Per device that is about ``K/W`` rows in flight;
        per host, its own rows."""
        w = self.mesh.size
        per_shard = self.k_pad // w
        flat = NamedSharding(self.mesh, P(ALL_AXES))
        local = sorted(int(ix[0].start or 0) for ix in flat.addressable_devices_indices_map((w,)).values())
        dest = np.asarray(dest, np.int64)
        src_dev = np.asarray(local, np.int64)[np.arange(len(dest)) % len(local)]
        dst_dev = dest // per_shard
        counts = np.zeros((w, w), np.int64)
        np.add.at(counts, (src_dev, dst_dev), 1)
        cap = max(1, distributed.max_over_processes(int(counts.max(initial=0))))
        send_rows = {d: np.zeros((1, w, cap, self.dim), np.float32) for d in local}
        send_idx = {d: np.full((1, w, cap), per_shard, np.int32) for d in local}   # per_shard = nothing
        slot = np.zeros((w, w), np.int64)
        for i in range(len(dest)):
            a, b = src_dev[i], dst_dev[i]
            send_rows[a][0, b, slot[a, b]] = rows[i]
            send_idx[a][0, b, slot[a, b]] = dest[i] % per_shard
            slot[a, b] += 1
        x = jax.make_array_from_callback((w, w, cap, self.dim), flat, lambda ix: send_rows[ix[0].start or 0])
        idx = jax.make_array_from_callback((w, w, cap), flat, lambda ix: send_idx[ix[0].start or 0])

        def deliver(r, j):  # r [1, W, cap, D] -> the W buckets addressed to this device
            r = jax.lax.all_to_all(r, ALL_AXES, split_axis=1, concat_axis=0, tiled=True)
            j = jax.lax.all_to_all(j, ALL_AXES, split_axis=1, concat_axis=0, tiled=True)
            shard = jnp.zeros((per_shard, r.shape[-1]), r.dtype)
            return shard.at[j.reshape(-1)].set(r.reshape(-1, r.shape[-1]), mode="drop")

        fn = jax.jit(jax.shard_map(deliver, mesh=self.mesh, in_specs=(P(ALL_AXES), P(ALL_AXES)),
                                   out_specs=P(ALL_AXES, None), check_vma=False))
        return fn(x, idx)

    def init_kmeans_plusplus(self, feats, sample: int = 65536) -> None:
        """k-means++ on a random sample (for small K; it is O(K · sample))."""
        from sklearn.cluster import kmeans_plusplus

        offset, total = distributed.slice_offsets(len(feats))
        rng = np.random.default_rng(self.seed)
        x = _rows_at(feats, np.sort(rng.choice(total, min(total, max(sample, self.k)), replace=False)), offset)
        if self.metric == "cosine":
            x = l2_normalize(x)
        centers, _ = kmeans_plusplus(x, self.k, random_state=self.seed)
        self.set_centers(centers.astype(np.float32))

    # ---------------------------------------------------------------- passes
    def _batches(self, feats):
        """Global batches ``(start, x [B, D], valid [B], local rows)`` over this process's ``feats``.

        Every process passes its own slice of the features; a global batch is the concatenation of
        the processes' local batches (``make_array_from_process_local_data``). All processes step
        the same number of times (the largest slice sets it; shorter slices pad with invalid rows).
        ``local rows`` are the global batch positions holding this process's rows, in order. The
        next chunk is read (memmap pages, fp16 -> fp32) on a thread while the device scores this one."""
        n, lb = len(feats), self.batch_size // jax.process_count()
        steps = distributed.max_over_processes(-(-n // lb))
        read = lambda i: np.asarray(feats[i * lb:(i + 1) * lb], np.float32).reshape(-1, self.dim)  # noqa: E731
        positions = None
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            ahead = pool.submit(read, 0)
            for i in range(steps):
                chunk = ahead.result()
                if i + 1 < steps:
                    ahead = pool.submit(read, i + 1)
                valid = np.zeros(lb, bool)
                valid[: len(chunk)] = True
                if len(chunk) < lb:
                    chunk = np.concatenate([chunk, np.zeros((lb - len(chunk), self.dim), np.float32)])
                x = jax.make_array_from_process_local_data(self.row_sharding, chunk)
                v = jax.make_array_from_process_local_data(self.vec_sharding, valid)
                if positions is None:
                    spans = sorted({(s.index[0].start or 0, x.shape[0] if s.index[0].stop is None else s.index[0].stop)
                                    for s in x.addressable_shards})
                    positions = np.concatenate([np.arange(a, b) for a, b in spans])
                yield i * lb, x, v, positions

    def lloyd_pass(self, feats) -> float:
        """One assignment sweep over ``feats`` + the centre update; returns the sweep's inertia."""
        sums, counts, sse = self._zeros()
        inertia = 0.0
        for _, x, valid, _ in self._batches(feats):
            sums, counts, sse, part, _ = self._accumulate(self.centers, sums, counts, sse, x, valid)
            # Fetching the partial inertia also bounds the dispatch queue to one step: on XLA:CPU a
            # deep queue of collective programs can starve one emulated device past the 40 s
            # rendezvous timeout (measured: the process aborts at 1M x 256, K = 10K, 8 devices).
            inertia += float(part)
        self.centers = self._update(sums, counts, sse)
        self.passes_done += 1
        return inertia

    def _update(self, sums, counts, sse):
        counts_host = distributed.to_host(counts)[: self.k]
        new = self._mean(sums, counts, self.centers)
        empty = np.nonzero(counts_host == 0)[0]
        if len(empty):
            # Donors: clusters of >= 2 rows, by their squared-error sum.
            weight = np.where(counts_host >= 2, distributed.to_host(sse)[: self.k].astype(np.float64), 0.0)
            new = self._split_into_empty(new, empty, weight)
            self.log(f"[kmeans] pass {self.passes_done + 1}: {len(empty)} empty cluster(s) filled by "
                     f"splitting large ones")
        return self._normalize(new) if self.metric == "cosine" else new

    def _split_into_empty(self, centers, empty: np.ndarray, weight: np.ndarray):
        """Give every empty cluster half of a populated one.

        As faiss, the empty centre becomes a copy of a donor's and the two copies are pushed
        apart by a relative ±1/1024 (random signs per coordinate), so the next assignment divides
        the donor's rows between them. Unlike faiss (donors drawn at random ∝ size − 1), the donors
        are chosen greedily by ``weight``, their squared-error sum: the largest error first, and a
        cluster that gives keeps half its weight for the next choice (:func:`greedy_donors`).
        Splitting where the error is lowers the inertia most; measured against faiss over sizes
        and seeds in docs/data.md (``benchmarks/kmeans.py --sweep``). Earlier rules, same
        features and init (100K x 128, K = 4000, 5 passes, seeds 0-2, final inertia / faiss):
        greedy 0.99625, 0.99529, 0.99576; donors drawn ∝ error 1.00060, 0.99881, 0.99994.
        A donor chosen m times is split m + 1 ways. Deterministic (the same choice on every
        process); the signs come from the seed and the pass number."""
        rng = np.random.default_rng([self.seed, self.passes_done])
        donors = greedy_donors(weight, len(empty))
        if not len(donors):                 # every cluster is a singleton or empty: nothing to split
            return centers
        empty = empty[: len(donors)]
        rows = distributed.to_host(self._take(centers, jnp.asarray(donors, jnp.int32)))
        signs = np.where(rng.random((len(empty), self.dim)) < 0.5, -1.0, 1.0).astype(np.float32)
        copies = rows * (1.0 + SPLIT_EPS * signs)
        # Each donor moves opposite to its first copy.
        first = np.unique(donors, return_index=True)[1]
        donor_rows = rows[first] * (1.0 - SPLIT_EPS * signs[first])
        idx = np.concatenate([empty, donors[first]]).astype(np.int32)
        return self._reseed(centers, jnp.asarray(idx), jnp.asarray(np.concatenate([copies, donor_rows])))

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
            raise errors.InputError(f"init {init!r}: use random, kmeans++, or given (after set_centers)")
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
        """Nearest centre of every row of ``feats`` (this process's rows) and their total inertia."""
        labels = np.full(len(feats), -1, np.int32)
        inertia = 0.0
        for start, x, valid, pos in self._batches(feats):
            _, best, arg = self._nearest(self.centers, x, valid)
            n = max(0, min(len(pos), len(feats) - start))
            if not n:
                continue
            xs = np.asarray(feats[start:start + n], np.float32)
            best = np.asarray(best)[pos[:n]]
            labels[start:start + n] = np.asarray(arg)[pos[:n]]
            if self.metric == "cosine":
                d2 = 2.0 - 2.0 * best
            else:
                d2 = np.sum(xs.astype(np.float64) ** 2, axis=1) - best
            inertia += float(np.sum(np.maximum(d2, 0.0)))
        return labels, inertia

    def centers_numpy(self) -> np.ndarray:
        return distributed.to_host(self.centers)[: self.k]

    def assign_topk(self, feats, topk: int) -> tuple[np.ndarray, np.ndarray]:
        """``(labels [R, topk], scores [R, topk])``: the ``topk`` nearest centres of every row, nearest
        first (multi-label use: a region's several clusters)."""
        if not 1 <= topk <= self.k:
            raise errors.InputError(f"topk {topk} must be in [1, K={self.k}]")
        key = ("topk", topk)
        if key not in self._topk_fns:
            rows, vec = P(ALL_AXES, None), P(ALL_AXES)
            self._topk_fns[key] = jax.jit(jax.shard_map(
                functools.partial(_topk_shard, axis=ALL_AXES, k_real=self.k, metric=self.metric, topk=topk,
                                  precision=self.precision),
                mesh=self.mesh, in_specs=(rows, rows, vec), out_specs=(P(), P()), check_vma=False))
        labels = np.empty((len(feats), topk), np.int32)
        scores = np.empty((len(feats), topk), np.float32)
        for start, x, valid, pos in self._batches(feats):
            best, arg = self._topk_fns[key](self.centers, x, valid)
            n = max(0, min(len(pos), len(feats) - start))
            labels[start:start + n], scores[start:start + n] = np.asarray(arg)[pos[:n]], np.asarray(best)[pos[:n]]
        return labels, scores

    # ---------------------------------------------------------------- checkpoints
    def _checkpoints(self):
        if not self.checkpoint_dir:
            return None
        import orbax.checkpoint as ocp

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
            raise errors.InputError(f"{self.checkpoint_dir}: k-means state for K={int(state['k'])}, seed={int(state['seed'])}; "
                             f"this run has K={self.k}, seed={self.seed} (use another checkpoint dir)")
        self.centers = state["centers"]
        self.passes_done = int(state["passes_done"])


class HierarchicalKMeans:
    """Two-level k-means for very large K (the large-scale data-curation recipe): ``k1 ≈ √K`` coarse
    centres over all rows, then each coarse cluster split into a share of the K fine centres
    proportional to its size. A row scores ``k1 + K/k1`` centres instead of K — at K = 1M about
    2000 instead of 1M — so a pass costs ~500x fewer FLOPs than a flat one; the price is that a
    row can only join fine centres of its own coarse cluster. Both levels run on the mesh
    (:class:`MeshKMeans`). Fine centres are numbered coarse cluster by coarse cluster.

    Several processes: each passes its own rows, as to :class:`MeshKMeans`; cluster sizes are
    summed over processes, so every process fits the same fine levels in the same order.
    ``checkpoint_dir``: the coarse level and every fine one keep their passes there
    (``coarse/``, ``fine_<c>/``); a rerun resumes each where it stopped, finished ones at once.
    """

    def __init__(self, k: int, dim: int, *, k1: Optional[int] = None, metric: str = "cosine", mesh=None,
                 batch_size: int = 16384, seed: int = 0, log: Callable[[str], None] = print,
                 checkpoint_dir: Optional[str] = None, precision: str = "auto"):
        self.k, self.dim, self.metric, self.mesh, self.seed, self.log = k, dim, metric, mesh, seed, log
        # Resolved here: the fine levels' state is named by it, so "auto" must not mean two things.
        self.checkpoint_dir, self.precision = checkpoint_dir, resolve_precision(precision)
        self.k1 = int(k1 or max(1, round(math.sqrt(k))))
        if not 1 <= self.k1 <= k:
            raise errors.InputError(f"k1 {self.k1} must be in [1, K={k}]")
        self.batch_size = batch_size
        self.coarse: Optional[MeshKMeans] = None
        self.fine: list[Optional[MeshKMeans]] = []
        self.offsets = np.zeros(self.k1 + 1, np.int64)

    def _split(self, sizes: np.ndarray) -> np.ndarray:
        """Fine centres per coarse cluster: ∝ size (largest remainder), ≥ 1 for a non-empty cluster,
        never more than its rows, summing to K when the rows allow it."""
        share = self.k * sizes / max(sizes.sum(), 1)
        n = np.minimum(np.maximum(np.floor(share).astype(np.int64), (sizes > 0).astype(np.int64)), sizes)
        for i in np.argsort(-(share - np.floor(share))):
            if n.sum() >= self.k:
                break
            if n[i] < sizes[i]:
                n[i] += 1
        return n

    def _state(self, name: str) -> Optional[str]:
        return None if not self.checkpoint_dir else str(storage.path(self.checkpoint_dir) / self._run / name)

    def fit(self, feats, passes: int = 20, coarse_passes: Optional[int] = None) -> "HierarchicalKMeans":
        # The fine levels depend on everything before them: their state lives under a name of the
        # settings and data size, so a rerun with other settings never resumes a mismatched level.
        total = distributed.slice_offsets(len(feats))[1]
        self._run = (f"k{self.k}_k1{self.k1}_p{passes}_c{coarse_passes or passes}_s{self.seed}_{self.precision}"
                     f"_n{total}")
        self.coarse = MeshKMeans(self.k1, self.dim, metric=self.metric, mesh=self.mesh, batch_size=self.batch_size,
                                 seed=self.seed, log=self.log, checkpoint_dir=self._state("coarse"),
                                 precision=self.precision)
        self.coarse.fit(feats, passes=coarse_passes or passes)
        coarse_labels, _ = self.coarse.assign(feats)
        # Global sizes: every process must fit the same fine levels with the same settings.
        sizes = distributed.sum_over_processes(np.bincount(coarse_labels, minlength=self.k1).astype(np.int64))
        counts = self._split(sizes)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.fine = []
        for c in range(self.k1):
            if counts[c] == 0:
                self.fine.append(None)
                continue
            rows = np.nonzero(coarse_labels == c)[0]
            km = MeshKMeans(int(counts[c]), self.dim, metric=self.metric, mesh=self.mesh,
                            batch_size=int(min(self.batch_size, sizes[c])), seed=self.seed + 1 + c,
                            log=lambda s: None, checkpoint_dir=self._state(f"fine_{c}"), precision=self.precision)
            km.fit(np.asarray(feats[rows], np.float32).reshape(-1, self.dim), passes=passes)
            self.fine.append(km)
        self.log(f"[kmeans] hierarchical: {self.k1} coarse x {int(self.offsets[-1])} fine centres")
        return self

    def assign(self, feats) -> tuple[np.ndarray, float]:
        """Coarse cluster, then the nearest fine centre inside it: ``(global fine labels, inertia)``."""
        coarse_labels, _ = self.coarse.assign(feats)
        labels = np.full(len(feats), -1, np.int32)
        inertia = 0.0
        for c, km in enumerate(self.fine):
            if km is None:    # no rows anywhere (every process agrees: the sizes are global)
                continue
            rows = np.nonzero(coarse_labels == c)[0]
            lab, part = km.assign(np.asarray(feats[rows], np.float32).reshape(-1, self.dim))
            labels[rows] = lab + self.offsets[c]
            inertia += part
        return labels, inertia

    def centers_numpy(self) -> np.ndarray:
        return np.concatenate([km.centers_numpy() for km in self.fine if km is not None])


def process_file(name: str, pid: int, nproc: int) -> str:
    """``labels.npy`` -> ``labels.process1.npy`` for process 1 of several (each writes its own rows)."""
    if nproc == 1:
        return name
    stem, dot, ext = name.rpartition(".") if "." in name.rsplit("/", 1)[-1] else (name, "", "")
    return f"{stem}.process{pid}{dot}{ext}"


def main(argv=None):
    """Cluster a feature file on the mesh; with several processes each reads its own contiguous slice.

        python -m rice_jax.labelling.kmeans --features F.npy --k K --out centers.npy [--labels labels.npy]
        # multi-host: the same command on every process, plus the distributed flags
    """
    import argparse

    ap = argparse.ArgumentParser(prog="python -m rice_jax.labelling.kmeans", description=main.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", required=True, help="[R, D] float32 .npy (memory-mapped, never loaded whole)")
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--metric", choices=METRICS, default="cosine")
    ap.add_argument("--passes", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16384, help="global rows per step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", choices=("random", "kmeans++"), default="random")
    ap.add_argument("--state-dir", default=None, help="save the state after every pass; a rerun resumes")
    ap.add_argument("--out", required=True, help="centres [K, D] .npy, local or gs://... (written by process 0)")
    ap.add_argument("--labels", default=None,
                    help="also write this process's labels (.npy; labels.process<i>.npy with several processes)")
    ap.add_argument("--score-precision", choices=PRECISIONS, default="float32",
                    help="bfloat16: bf16 inputs, fp32 accumulation (the accelerators' matmul rate)")
    distributed.add_flags(ap)
    a = ap.parse_args(argv)
    distributed.join(a)

    feats = np.load(storage.require_local(a.features, "a feature file", "copy it locally or mount the bucket"),
                    mmap_mode="r")
    n, pid, nproc = len(feats), jax.process_index(), jax.process_count()
    mine = feats[pid * n // nproc:(pid + 1) * n // nproc]
    log = print if pid == 0 else (lambda s: None)
    km = MeshKMeans(a.k, feats.shape[1], metric=a.metric, batch_size=a.batch_size, seed=a.seed,
                    checkpoint_dir=a.state_dir, log=log, precision=a.score_precision)
    km.fit(mine, passes=a.passes, init=a.init)
    centers = km.centers_numpy()
    labels, inertia = km.assign(mine)
    total = float(np.sum(distributed.gather_rows(np.asarray([inertia], np.float64))))
    if pid == 0:
        with storage.open_atomic(a.out) as f:
            np.save(f, centers)
        print(f"[kmeans] K={a.k} over {n} rows on {jax.device_count()} devices / {nproc} process(es): "
              f"inertia {total:.6g}; centres in {a.out}", flush=True)
    if a.labels:
        with storage.open_atomic(process_file(a.labels, pid, nproc)) as f:
            np.save(f, labels)


if __name__ == "__main__":
    cli.run(main)
