"""Region features on disk, one set of files per record shard, written by the shard's owner.

    FEATURES_DIR/<shard>.feats.npy    [n, D] float16 (or bfloat16 as raw uint16, or float32), unit rows
    FEATURES_DIR/<shard>.ids.npy      [n, 3] int32: record index in the shard, region index, category
    FEATURES_DIR/<shard>.counts.npy   [num_records] int32: regions per record (what label files need)
    FEATURES_DIR/<shard>.json         what made them (extractor, image size, dimension, dtype, counts);
                                      written last: the shard's commit mark

At 2B regions and D = 1024 the features are 4 TB in fp16: each process of a clustering job extracts
only the shards it owns (:func:`rice_jax.data.records.owned_shards`) into its own local scratch
directory, and the k-means streams them back through :class:`FeatureShards` (memory-mapped, read a
batch at a time). Files are written whole or not at all; a rerun with the same settings skips every
shard whose mark matches (settings, record count and the shard file's fingerprint: a dataset rebuilt
in place is extracted anew), so a killed extraction resumes at shard granularity.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import ml_dtypes
import numpy as np

from rice_jax import errors, storage
from rice_jax.data import records
from rice_jax.losses import l2_normalize

DTYPES = ("float16", "bfloat16", "float32")


def _paths(features_dir, shard: str) -> dict[str, Path]:
    d = Path(features_dir)
    return {k: d / f"{shard}.{k}.npy" for k in ("feats", "ids", "counts")} | {"mark": d / f"{shard}.json"}


def _save(path: Path, arr: np.ndarray) -> None:
    with storage.atomic_local(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def _encode(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # numpy cannot store bfloat16 in .npy: keep its bits
        return x.astype(ml_dtypes.bfloat16).view(np.uint16)
    return x.astype(dtype)


def _decode(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return np.asarray(x).view(ml_dtypes.bfloat16).astype(np.float32)
    return np.asarray(x, np.float32)


def _mark_matches(path: Path, want: dict) -> bool:
    try:
        have = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    have.pop("num_regions", None)
    return have == want


def projected_bytes(manifest: dict, shards: Sequence[int], dim: int, dtype: str) -> int:
    """Bytes the feature files of ``shards`` will take: their share of the dataset's object regions
    (by record count; the manifest counts regions for the whole dataset) x D x the stored width, plus
    16 bytes of ids a region."""
    counts = np.asarray(manifest["shard_counts"], np.float64)
    share = counts[list(shards)].sum() / max(counts.sum(), 1.0)
    regions = share * float(manifest.get("num_object_regions") or 0)
    return int(regions * (dim * np.dtype(np.float32 if dtype == "float32" else np.float16).itemsize + 16))


def check_free_space(features_dir, manifest: dict, shards: Sequence[int], dim: int, dtype: str) -> None:
    """A one-line error before extraction starts when ``features_dir``'s disk cannot hold the
    projected features of ``shards`` (what is already there counts as written): at 2B regions and
    D = 1024, fp16 features are ~4 TB, 256 GB per host of a v5p-128, more than a 100 GB boot disk."""
    import shutil

    d = Path(features_dir)
    probe = next((p for p in [d, *d.parents] if p.exists()), Path("/"))
    need = projected_bytes(manifest, shards, dim, dtype)
    have = sum(f.stat().st_size for f in d.glob("*.npy")) if d.is_dir() else 0
    free = shutil.disk_usage(probe).free
    if need - have > free:
        gib = lambda b: f"{b / 2**30:,.1f} GiB"  # noqa: E731
        raise errors.InputError(f"--features-dir {d}: its disk has {gib(free)} free, this process's {len(shards)} "
                                f"shard(s) need ~{gib(need - have)} more of {dtype} features (D = {dim}); point "
                                "--features-dir at a larger local disk, or use more processes")


def extract_shards(src: records.RecordSource, shards: Sequence[int], extractor, features_dir, *, chunk: int,
                   dtype: str = "float16", settings: dict | None = None,
                   log: Callable[[str], None] = print) -> "FeatureShards":
    """Features of the object regions of ``shards`` (indices into ``src.paths``), one shard at a time;
    shards already extracted with the same ``settings`` are kept as they are."""
    if dtype not in DTYPES:
        raise errors.InputError(f"--feature-dtype {dtype!r}: use one of {DTYPES}")
    if src.skipped:
        raise errors.InputError(f"{src.skipped[0].path}: damaged; clustering needs every shard (repair or re-mine it)")
    d = Path(features_dir)
    d.mkdir(parents=True, exist_ok=True)
    mark = {**(settings or {}), "extractor": extractor.name, "dim": int(extractor.dim), "dtype": dtype}
    t0, done, redone = time.perf_counter(), 0, 0
    for s in shards:
        name = Path(src.paths[s]).name
        start, stop = src.shard_range(s)
        p = _paths(d, name)
        want = dict(mark, shard=name, num_records=stop - start, source=records.shard_fingerprint(src.paths[s]))
        if _mark_matches(p["mark"], want):
            done += 1
            continue
        view = records.ShardTally(src, s)   # counts and categories noted as the extractor reads
        ids, feats = [], []
        for chunk_ids, chunk_feats in extractor(view, chunk):
            ids.append(np.asarray(chunk_ids, np.int64).reshape(-1, 2))
            feats.append(_encode(l2_normalize(np.asarray(chunk_feats)), dtype))
        ids = np.concatenate(ids) if ids else np.zeros((0, 2), np.int64)
        feats = np.concatenate(feats) if feats else _encode(np.zeros((0, extractor.dim), np.float32), dtype)
        counts, objects = view.counts(), view.objects()
        category = dict(zip(map(tuple, objects[:, :2].tolist()), objects[:, 2].tolist()))
        cats = np.array([category[(int(i), int(r))] for i, r in ids], np.int64).reshape(-1, 1)
        _save(p["feats"], feats)
        _save(p["ids"], np.concatenate([ids, cats], 1).astype(np.int32))
        _save(p["counts"], counts)
        storage.write_text_atomic(p["mark"], json.dumps(dict(want, num_regions=int(len(ids)))))
        redone += 1
        log(f"[features] {name}: {len(ids)} object regions ({redone + done}/{len(shards)} shards, "
            f"{time.perf_counter() - t0:.0f} s)")
    if done:
        log(f"[features] {done} of {len(shards)} shards already extracted in {d}: kept")
    return FeatureShards(d, [Path(src.paths[s]).name for s in shards], dtype, int(extractor.dim))


class FeatureShards:
    """The rows of several shards' feature files as one ``[N, D]`` float32 array-like (``len``,
    ``shape``, slices and integer-array indexing): what the k-means backends read. Memory-mapped:
    only the rows asked for are read."""

    def __init__(self, features_dir, shards: Sequence[str], dtype: str, dim: int):
        self.dir, self.shard_names, self.dtype_on_disk, self.dim = Path(features_dir), list(shards), dtype, dim
        self._feats = [np.load(_paths(self.dir, s)["feats"], mmap_mode="r") for s in self.shard_names]
        self.starts = np.concatenate([[0], np.cumsum([len(f) for f in self._feats])]).astype(np.int64)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.dim)

    def ids(self) -> np.ndarray:
        """``[N, 4]`` int32 (16 bytes a region): position of the shard in :attr:`shard_names`, record in
        the shard, region, category."""
        out = [np.concatenate([np.full((len(a), 1), j, np.int32), a.astype(np.int32)], 1) for j, a in
               enumerate(np.load(_paths(self.dir, s)["ids"]) for s in self.shard_names)]
        return np.concatenate(out) if out else np.zeros((0, 4), np.int32)

    def counts(self, j: int) -> np.ndarray:
        return np.load(_paths(self.dir, self.shard_names[j])["counts"])

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, slice):
            lo, hi, step = idx.indices(len(self))
            if step != 1:
                return self[np.arange(lo, hi, step)]
            parts = []
            # Only the shards the slice covers, found by bisection: a k-means step reads one or two of
            # 40k shards, and a loop over all of them cost ~1.5 ms of Python a step.
            j = max(int(np.searchsorted(self.starts, lo, side="right")) - 1, 0)
            while j < len(self._feats) and self.starts[j] < hi:
                a, b = max(lo, self.starts[j]), min(hi, self.starts[j + 1])
                if a < b:
                    f = self._feats[j]
                    parts.append(_decode(f[a - self.starts[j]:b - self.starts[j]], self.dtype_on_disk))
                j += 1
            return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)
        idx = np.asarray(idx, np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index outside [0, {len(self)})")
        out = np.empty((len(idx), self.dim), np.float32)
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        for j in np.unique(shard):
            m = shard == j
            local = idx[m] - self.starts[j]
            order = np.argsort(local, kind="stable")     # memmaps read fastest in order
            rows = np.empty((m.sum(), self.dim), np.float32)
            rows[order] = _decode(self._feats[j][local[order]], self.dtype_on_disk)
            out[m] = rows
        return out

    def __array__(self, dtype=None, copy=None):
        arr = self[0:len(self)]
        return arr if dtype is None else arr.astype(dtype)
