"""Cluster labels beside the record shards: one label file per shard, written by the shard's owner,
read lazily, refused when stale.

    DATA/cluster_labels/<shard>.labels.npy    int32 [num_records + 1 + num_regions]: region offsets
                                              per record, then one label per region (-1: none)
    DATA/cluster_labels/<shard>.labels.json   fingerprint: shard name, record and region counts,
                                              the clustering run; written last (the shard's commit mark)
    DATA/cluster_labels/index.json            every shard's fingerprint in manifest order: written
                                              once all shards are (the labelling's commit mark)

At the paper's scale (2B regions) the labels are ~8 GB: no process reads them whole. A clustering
process writes the files of the shards it owns (atomic, so a killed run leaves whole files or
none; a rerun skips shards whose fingerprint already names this run), and the input pipeline maps
one shard's file when it first needs a record of it (``np.load(mmap_mode="r")``): memory per
process and per Grain worker does not depend on the dataset's size, and pickling the reader into a
worker copies paths, not labels.

Labels are keyed by a record's position in its shard, so they are only valid for the records they
were made from. Opening reads the one index file (not 40k shard marks: one open per process at
any shard count) and checks every shard's fingerprint in it against the manifest (names, record
counts, the clustering run); reading checks each record's region count against the label
offsets. A mismatch (records re-mined or re-imported after clustering) stops with one line naming
the shard and the command to rerun.
"""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import threading
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from rice_jax import errors, storage
from rice_jax.data import records

LABELS_DIR = "cluster_labels"
LEGACY_FILE = "cluster_labels.npz"   # the single-file sidecar of earlier versions
INDEX_FILE = "index.json"
READ_THREADS = 32   # shard marks read at once when the index is built (latency-bound on gcsfuse/NFS)


class StaleLabels(errors.InputError):
    """Labels that do not belong to the records they would be applied to."""


def _rerun(data_dir) -> str:
    return f"rerun `python -m rice_jax.labelling.clustering --data {data_dir} --k K ...` (or --extractor oracle)"


def run_id(manifest: dict, **settings) -> str:
    """A clustering run's name: a hash of the dataset's shards and the settings that decide the labels.
    Deterministic, so a rerun of the same command recognises the label files it already wrote."""
    key = json.dumps({"shards": manifest["shards"], "counts": manifest["shard_counts"], **settings}, sort_keys=True,
                     default=str)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def _paths(data_dir, shard: str) -> tuple[Path, Path]:
    d = Path(data_dir) / LABELS_DIR
    return d / f"{shard}.labels.npy", d / f"{shard}.labels.json"


def shard_done(data_dir, shard: str, run: str) -> bool:
    """Whether ``shard``'s label file is complete and written by ``run``."""
    _, meta = _paths(data_dir, shard)
    try:
        return json.loads(meta.read_text()).get("run") == run
    except (OSError, ValueError):
        return False


def write_shard(data_dir, shard: str, counts: np.ndarray, local_ids: np.ndarray, values: np.ndarray,
                run: str) -> None:
    """The label file of one shard: ``counts [num_records]`` regions per record, ``local_ids [n, 2]``
    (record index in the shard, region index) with their ``values [n]``; every other region gets -1."""
    counts = np.asarray(counts, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    flat = np.full(int(offsets[-1]), -1, np.int32)
    local_ids = np.asarray(local_ids, np.int64).reshape(-1, 2)
    if len(local_ids):
        if (local_ids[:, 1] >= counts[local_ids[:, 0]]).any():
            raise ValueError(f"{shard}: a labelled region index exceeds its record's region count")
        flat[offsets[local_ids[:, 0]] + local_ids[:, 1]] = values
    data, meta = _paths(data_dir, shard)
    data.parent.mkdir(parents=True, exist_ok=True)
    with storage.atomic_local(data) as tmp, open(tmp, "wb") as f:
        np.save(f, np.concatenate([offsets, flat]).astype(np.int32))
    storage.write_text_atomic(meta, json.dumps({"shard": shard, "num_records": int(len(counts)),
                                                "num_regions": int(offsets[-1]), "run": run}))


class ClusterLabels:
    """Lazy reader: ``labels.of(dataset_index, num_regions)`` -> the record's labels ``[num_regions]``.

    ``shards``/``counts``: every shard of the manifest in order (damaged ones included, so dataset
    indices line up); only the shards actually read are opened."""

    def __init__(self, data_dir, shards: Sequence[str], counts: Sequence[int], run: str,
                 max_open: int = records.MAX_OPEN_SHARDS):
        self.data_dir = str(data_dir)
        self.shards = list(shards)
        self.starts = np.concatenate([[0], np.cumsum(np.asarray(counts, np.int64))])
        self.run = run
        self.max_open = int(max_open)   # label maps mapped at once (a map holds a file descriptor)
        self._open: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):  # a Grain worker gets paths, never mapped arrays
        return {k: v for k, v in self.__dict__.items() if k not in ("_open", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _open=collections.OrderedDict(), _lock=threading.Lock())

    def _shard(self, s: int) -> np.ndarray:
        """Shard ``s``'s label map; the least recently used beyond ``max_open`` are dropped (a map is
        unmapped once no batch still holds a view of it)."""
        with self._lock:
            arr = self._open.get(s)
            if arr is None:
                data, _ = _paths(self.data_dir, self.shards[s])
                try:
                    arr = self._open[s] = np.load(data, mmap_mode="r")
                except (OSError, ValueError) as e:
                    raise StaleLabels(f"{data}: cannot be read ({errors.first_line(e)}); "
                                      f"{_rerun(self.data_dir)}") from None
                while len(self._open) > self.max_open:
                    self._open.popitem(last=False)
            else:
                self._open.move_to_end(s)
            return arr

    def of(self, dataset_index: int, num_regions: int) -> np.ndarray:
        s = int(np.searchsorted(self.starts, dataset_index, side="right") - 1)
        local = dataset_index - int(self.starts[s])
        n_rec = int(self.starts[s + 1] - self.starts[s])
        arr = self._shard(s)
        lo, hi = int(arr[local]), int(arr[local + 1])
        if hi - lo != num_regions:
            raise StaleLabels(f"{Path(self.data_dir) / self.shards[s]}:{local}: the record has {num_regions} regions, "
                              f"its cluster labels {hi - lo}: the records changed after clustering; "
                              f"{_rerun(self.data_dir)}")
        return np.asarray(arr[n_rec + 1 + lo:n_rec + 1 + hi])


def _check_mark(data_dir, shard: str, n: int, run: str) -> dict:
    _, meta_path = _paths(data_dir, shard)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        raise StaleLabels(f"{meta_path}: missing or unreadable, so shard {shard} has no labels (clustering did not "
                          f"finish); {_rerun(data_dir)}") from None
    if meta.get("run") != run or meta.get("shard") != shard or meta.get("num_records") != int(n):
        raise StaleLabels(f"{meta_path}: labels of run {meta.get('run')} for {meta.get('num_records')} records; the "
                          f"manifest names run {run} and {n} records in {shard}; {_rerun(data_dir)}")
    return meta


def commit(data_dir, manifest: dict, run: str) -> dict:
    """Check every shard's mark against ``manifest`` and ``run`` (:data:`READ_THREADS` at a time) and
    write the index the readers open: the labelling's commit mark, written once by process 0 after
    every owner wrote its shards. Returns the index."""
    d = Path(data_dir)
    pairs = list(zip(manifest["shards"], manifest["shard_counts"]))
    with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
        metas = list(pool.map(lambda p: _check_mark(d, p[0], p[1], run), pairs))
    index = {"run": run, "shards": [m["shard"] for m in metas], "num_records": [int(m["num_records"]) for m in metas],
             "num_regions": [int(m["num_regions"]) for m in metas]}
    storage.write_text_atomic(d / LABELS_DIR / INDEX_FILE, json.dumps(index))
    return index


def open_labels(data_dir, manifest: dict) -> Optional[ClusterLabels]:
    """The dataset's labels, checked against its manifest; None when it has none (never clustered).
    One file is read whatever the number of shards: the index :func:`commit` wrote."""
    d = Path(data_dir)
    if not (d / LABELS_DIR).is_dir():
        if (d / LEGACY_FILE).exists():
            raise StaleLabels(f"{d / LEGACY_FILE}: cluster labels in the single-file format of earlier versions; "
                              f"{_rerun(d)} to write them per shard")
        return None
    run = (manifest.get("clustering") or {}).get("run")
    if not run:
        raise StaleLabels(f"{d / LABELS_DIR}: labels without a clustering run in {d}/manifest.json (the records were "
                          f"rebuilt after clustering, or clustering did not finish); {_rerun(d)}")
    path = d / LABELS_DIR / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        raise StaleLabels(f"{path}: missing or unreadable (clustering did not finish); {_rerun(d)}") from None
    if index.get("run") != run:
        raise StaleLabels(f"{path}: labels of run {index.get('run')}; the manifest names run {run}; {_rerun(d)}")
    want = list(zip(manifest["shards"], map(int, manifest["shard_counts"])))
    have = list(zip(index.get("shards", []), index.get("num_records", [])))
    if have != want:
        bad = next((i for i, (a, b) in enumerate(zip(have, want)) if a != b), min(len(have), len(want)))
        said = f"{have[bad][1]} records in {have[bad][0]}" if bad < len(have) else "no entry"
        wanted = f"{want[bad][1]} records in {want[bad][0]}" if bad < len(want) else "no shard"
        raise StaleLabels(f"{path}: shard {bad} has {said}, the manifest {wanted} (the records changed after "
                          f"clustering); {_rerun(d)}")
    return ClusterLabels(d, manifest["shards"], manifest["shard_counts"], run)


def read_all(data_dir) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets [num_records + 1], labels [num_regions])`` over the whole dataset, in memory: for tests
    and small datasets (the pipeline never does this)."""
    m = records.read_manifest(data_dir)
    offsets, labels, base = [np.zeros(1, np.int64)], [], 0
    for shard, n in zip(m["shards"], m["shard_counts"]):
        arr = np.load(_paths(data_dir, shard)[0])
        offsets.append(arr[1:n + 1].astype(np.int64) + base)
        labels.append(arr[n + 1:])
        base += int(arr[n])
    return np.concatenate(offsets), (np.concatenate(labels) if labels else np.zeros(0, np.int32))
