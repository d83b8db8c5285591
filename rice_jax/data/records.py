"""Region records: one per image, stored as sharded ArrayRecord files + a JSON manifest.

A record (schema version 1) is a msgpack map::

    image      bytes    encoded image (JPEG/PNG as found)
    format     str      "jpeg" | "png" | ...
    height     int      decoded size in pixels
    width      int
    image_id   str
    boxes      [R,4]    float32 xyxy, absolute pixels
    kind       [R]      int8: 0 object, 1 text
    cluster    [R]      int32: an object cluster id stored in the record; -1 (what every importer writes)
    text       [R]      str: OCR transcript ("" for objects)
    category   [R]      int32: ground-truth category, -1 unknown (evaluation only)
    meta       map      optional: what the source said about the image (a web-dataset sample's
                        caption, url, original size); absent when empty, so older shards read the same

Arrays are raw little-endian bytes; ``R`` is implied by ``len(kind)``. The
manifest (``manifest.json``) holds counts, the schema version, the shard
file names with their record counts and byte sizes, the tokenizer and K, plus import/clustering
summaries.

Labels live beside the shards, not in them: clustering writes one label file per shard
(``cluster_labels/``, :mod:`rice_jax.data.labels`; relabelling never rewrites a shard), and the
input pipeline reads a record's ``cluster`` field only when there are none — a dataset built
with labels already inside its records.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import msgpack
import numpy as np

from rice_jax import cli, errors, storage
from rice_jax.batch import KIND_OBJECT, KIND_TEXT  # noqa: F401 - the kind codes records store

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class RecordError(errors.InputError):
    """A record that breaks the schema; the message names file, index and field."""


@dataclasses.dataclass
class RegionRecord:
    image: bytes
    format: str
    height: int
    width: int
    image_id: str
    boxes: np.ndarray                 # [R, 4] float32 xyxy pixels
    kind: np.ndarray                  # [R] int8
    cluster: np.ndarray               # [R] int32
    text: list[str]                   # [R]
    category: np.ndarray              # [R] int32
    meta: dict = dataclasses.field(default_factory=dict)   # source metadata (caption, url, ...): JSON-like

    @property
    def num_regions(self) -> int:
        return int(self.kind.shape[0])

    @classmethod
    def new(cls, image: bytes, fmt: str, height: int, width: int, image_id: str, boxes, kind,
            text=None, category=None, cluster=None, meta=None) -> "RegionRecord":
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        r = boxes.shape[0]
        return cls(image=image, format=fmt, height=int(height), width=int(width), image_id=str(image_id),
                   boxes=boxes, kind=np.asarray(kind, np.int8).reshape(r),
                   cluster=np.full(r, -1, np.int32) if cluster is None else np.asarray(cluster, np.int32).reshape(r),
                   text=list(text) if text is not None else [""] * r,
                   category=np.full(r, -1, np.int32) if category is None else np.asarray(category, np.int32).reshape(r),
                   meta=dict(meta or {}))


def encode(rec: RegionRecord) -> bytes:
    extra = {"meta": rec.meta} if rec.meta else {}
    return msgpack.packb({
        "v": SCHEMA_VERSION, "image": rec.image, "format": rec.format, "height": rec.height,
        "width": rec.width, "image_id": rec.image_id,
        "boxes": np.ascontiguousarray(rec.boxes, "<f4").tobytes(),
        "kind": np.ascontiguousarray(rec.kind, "<i1").tobytes(),
        "cluster": np.ascontiguousarray(rec.cluster, "<i4").tobytes(),
        "text": list(rec.text),
        "category": np.ascontiguousarray(rec.category, "<i4").tobytes(),
        **extra,
    }, use_bin_type=True)


def decode(data: bytes, where: str = "record") -> RegionRecord:
    """Parse and validate one record; errors name ``where`` (file:index) and the field."""
    try:
        d = msgpack.unpackb(data, raw=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is a schema violation
        raise RecordError(f"{where}: not a msgpack record ({e})") from e
    if not isinstance(d, dict):
        raise RecordError(f"{where}: record is {type(d).__name__}, expected a map")
    if d.get("v") != SCHEMA_VERSION:
        raise RecordError(f"{where}: field 'v' = {d.get('v')!r}, expected schema version {SCHEMA_VERSION}")
    for field, typ in (("image", bytes), ("format", str), ("height", int), ("width", int), ("image_id", str),
                       ("boxes", bytes), ("kind", bytes), ("cluster", bytes), ("text", list), ("category", bytes)):
        if not isinstance(d.get(field), typ):
            raise RecordError(f"{where}: field '{field}' missing or not {typ.__name__}")
    kind = np.frombuffer(d["kind"], "<i1").astype(np.int8)
    r = kind.shape[0]

    def arr(field, dtype, per):
        a = np.frombuffer(d[field], dtype)
        if a.size != r * per:
            raise RecordError(f"{where}: field '{field}' has {a.size} values, expected {r * per} for {r} regions")
        return a.reshape((r, per) if per > 1 else (r,))

    rec = RegionRecord(image=d["image"], format=d["format"], height=d["height"], width=d["width"],
                       image_id=d["image_id"], boxes=arr("boxes", "<f4", 4).astype(np.float32), kind=kind,
                       cluster=arr("cluster", "<i4", 1).astype(np.int32), text=d["text"],
                       category=arr("category", "<i4", 1).astype(np.int32), meta=d.get("meta") or {})
    if not isinstance(rec.meta, dict):
        raise RecordError(f"{where}: field 'meta' is {type(rec.meta).__name__}, expected a map")
    validate(rec, where)
    return rec


def validate(rec: RegionRecord, where: str = "record") -> None:
    """Schema and value checks; raises :class:`RecordError` naming the field (and region)."""
    if rec.height <= 0 or rec.width <= 0:
        raise RecordError(f"{where}: field 'height'/'width' = {rec.height}x{rec.width} must be positive")
    if len(rec.text) != rec.num_regions:
        raise RecordError(f"{where}: field 'text' has {len(rec.text)} entries for {rec.num_regions} regions")
    # Few, whole-array checks: this runs once per example on the input pipeline's hot path.
    b = rec.boxes
    ok = (np.isfinite(b).all(1) & (b[:, 2:] > b[:, :2]).all(1) & (b[:, :2] >= 0).all(1)
          & (b[:, 2] <= rec.width + 1e-3) & (b[:, 3] <= rec.height + 1e-3))
    if not ok.all():
        i = int(np.argmin(ok))
        raise RecordError(f"{where}: field 'boxes' region {i} = {b[i].tolist()} is not a valid xyxy box "
                          f"inside {rec.width}x{rec.height}")
    known = (rec.kind == KIND_OBJECT) | (rec.kind == KIND_TEXT)
    if not known.all():
        i = int(np.argmin(known))
        raise RecordError(f"{where}: field 'kind' region {i} = {int(rec.kind[i])}, expected 0 (object) or 1 (text)")
    if (rec.cluster < -1).any():
        i = int(np.argmax(rec.cluster < -1))
        raise RecordError(f"{where}: field 'cluster' region {i} = {int(rec.cluster[i])} < -1")
    for i, (k, t) in enumerate(zip(rec.kind.tolist(), rec.text)):
        if not isinstance(t, str):
            raise RecordError(f"{where}: field 'text' region {i} is {type(t).__name__}, expected str")
        if k == KIND_TEXT and not t.strip():
            raise RecordError(f"{where}: field 'text' region {i} is an empty transcript for a text region")


# ----------------------------------------------------------------------------- storage
def _writer(path: Path):
    from array_record.python.array_record_module import ArrayRecordWriter

    return ArrayRecordWriter(str(path), "group_size:1")


def write_records(records: Iterable[RegionRecord], out_dir: str | os.PathLike, *, num_shards: int = 4,
                  prefix: str = "regions", manifest_extra: dict | None = None) -> dict:
    """Write records round-robin into ``num_shards`` ArrayRecord files and a manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [shard_name(prefix, i, num_shards) for i in range(num_shards)]
    writers = [_writer(out / n) for n in names]
    totals = RegionCounts()
    for i, rec in enumerate(records):
        validate(rec, f"record {i} ({rec.image_id})")
        writers[i % num_shards].write(encode(rec))
        totals.add(rec, shard=i % num_shards, num_shards=num_shards)
    for w in writers:
        w.close()
    manifest = make_manifest(names, totals.shard_counts or [0] * num_shards, totals, manifest_extra,
                             shard_bytes=[os.path.getsize(out / n) for n in names])
    write_manifest(out, manifest)
    return manifest


def shard_name(prefix: str, index: int, num_shards: int) -> str:
    return f"{prefix}-{index:05d}-of-{num_shards:05d}.array_record"


@dataclasses.dataclass
class RegionCounts:
    """Images / object regions / text regions written (per shard and in total)."""
    images: int = 0
    objects: int = 0
    texts: int = 0
    shard_counts: list = dataclasses.field(default_factory=list)

    def add(self, rec: RegionRecord, shard: int = 0, num_shards: int = 1) -> None:
        if len(self.shard_counts) < num_shards:
            self.shard_counts += [0] * (num_shards - len(self.shard_counts))
        self.shard_counts[shard] += 1
        self.images += 1
        self.objects += int((rec.kind == KIND_OBJECT).sum())
        self.texts += int((rec.kind == KIND_TEXT).sum())


def make_manifest(names: list[str], shard_counts: list[int], totals: "RegionCounts",
                  extra: dict | None = None, *, shard_bytes: Sequence[int] | None = None) -> dict:
    """``shard_bytes``: each shard file's size as written; with it, opening a dataset checks shards by
    one ``stat`` each instead of opening 40k files (:func:`check_shards`)."""
    manifest = {"schema_version": SCHEMA_VERSION, "shards": list(names), "shard_counts": list(shard_counts),
                "num_images": totals.images, "num_object_regions": totals.objects,
                "num_text_regions": totals.texts, "tokenizer": None, "num_clusters": None}
    if shard_bytes is not None:
        manifest["shard_bytes"] = [int(b) for b in shard_bytes]
    manifest.update(extra or {})
    return manifest


def write_shard_atomic(records: Iterable[RegionRecord], path: str | os.PathLike) -> RegionCounts:
    """All of ``records`` into one ArrayRecord file that appears only once complete.

    Written under a temporary name in the same folder and renamed, so a crash leaves either
    no shard or a whole one (a resumable job can trust any shard it finds)."""
    path = Path(path)
    counts = RegionCounts()
    with storage.atomic_local(path) as tmp:
        writer = _writer(tmp)
        try:
            for i, rec in enumerate(records):
                validate(rec, f"{path.name}: record {i} ({rec.image_id})")
                writer.write(encode(rec))
                counts.add(rec)
        finally:
            writer.close()
    return counts


def read_manifest(data_dir: str | os.PathLike) -> dict:
    path = storage.path(data_dir) / MANIFEST
    if not path.exists():
        raise errors.MissingInput(f"{path} not found: {data_dir} is not a rice_jax region dataset "
                                "(create one with `python -m rice_jax.data.synthetic --out DIR`)")
    m = json.loads(path.read_text())
    if m.get("schema_version") != SCHEMA_VERSION:
        raise RecordError(f"{path}: schema_version {m.get('schema_version')} != {SCHEMA_VERSION}")
    return m


def write_manifest(data_dir: str | os.PathLike, manifest: dict) -> None:
    storage.write_text_atomic(storage.path(data_dir) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def shard_paths(data_dir: str | os.PathLike) -> list[str]:
    m = read_manifest(data_dir)
    return [str(Path(data_dir) / s) for s in m["shards"]]


class DamagedShardError(RecordError):
    """A shard that is missing, empty, unreadable or holds a different number of records than the manifest."""


SHARD_ADVICE = ("re-copy the shard from its source, or re-create the dataset; to train without it pass "
                "--config.data.skip_damaged_shards=True (its records are left out and counted)")


@dataclasses.dataclass
class ShardStatus:
    """What opening one shard found. ``problem`` is ``""`` for a healthy shard."""
    path: str
    expected: int                     # records the manifest promises
    found: int                        # records the file's index holds (-1: could not open)
    size_bytes: int                   # -1: missing
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem

    def message(self) -> str:
        return f"damaged shard {self.path}: {self.problem}; {SHARD_ADVICE}"


def _stat_status(path: str, expected: int) -> ShardStatus | int:
    """The status of a missing or empty shard, else the file's size."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return ShardStatus(path, expected, -1, -1, "file is missing")
    if size == 0:
        return ShardStatus(path, expected, -1, 0, "file is empty (0 bytes; an interrupted copy?)")
    return size


def check_shard_size(path: str, expected: int, expected_bytes: int) -> ShardStatus:
    """One ``stat`` of a shard against the manifest's size for it: missing, empty, truncated or
    replaced files are found without opening them. Its record count is the manifest's, trusted
    here and verified when a reader first opens the shard (:class:`ShardReaders`)."""
    size = _stat_status(path, expected)
    if isinstance(size, ShardStatus):
        return size
    if size != expected_bytes:
        return ShardStatus(path, expected, -1, size, f"is {size} bytes, the manifest says {expected_bytes} (truncated, "
                                                     "or replaced after the manifest was written)")
    return ShardStatus(path, expected, expected, size)


def check_shard(path: str, expected: int) -> ShardStatus:
    """Open one shard (its footer and index, not the records) and compare its count with the manifest."""
    from array_record.python.array_record_module import ArrayRecordReader

    size = _stat_status(path, expected)
    if isinstance(size, ShardStatus):
        return size
    try:
        reader = ArrayRecordReader(path)
        found = int(reader.num_records())
        reader.close()
    except Exception as e:  # noqa: BLE001 - the reader reports truncation / corruption as RuntimeError
        return ShardStatus(path, expected, -1, size, f"cannot be opened ({errors.first_line(e)}); the file is truncated "
                                                    "or corrupted")
    if found != expected:
        return ShardStatus(path, expected, found, size, f"holds {found} records, the manifest says {expected}")
    return ShardStatus(path, expected, found, size)


def shard_fingerprint(path: str | os.PathLike, window: int = 1 << 16) -> str:
    """``"<bytes>:<sha1 of the first and last 64 KiB>"``: what a per-shard product (features, labels)
    records of the shard it was made from, so a dataset rebuilt in place under the same shard names
    is not taken for the old one (two reads, whatever the shard's size)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        h.update(f.read(window))
        if size > window:
            f.seek(max(window, size - window))
            h.update(f.read(window))
    return f"{size}:{h.hexdigest()[:16]}"


def owned_shards(num_shards: int, process_index: int, process_count: int) -> list[int]:
    """The shards process ``process_index`` of ``process_count`` owns in a multi-process job: it alone
    reads their records for a per-shard stage and writes that stage's files of them. Contiguous
    blocks, so the processes' rows concatenated in process order are the one-process order (what
    makes a P-process k-means, whose random choices use global row indices, equal a 1-process one)."""
    return list(range(process_index * num_shards // process_count, (process_index + 1) * num_shards // process_count))


class ShardTally:
    """The records of one shard, indexed from 0, noting each record's region count and its object
    regions' categories as it is read. A per-shard stage that reads every record anyway (feature
    extraction, the oracle labels) gets what the shard's label file needs from that one read,
    instead of a second decode pass over the shard."""

    def __init__(self, src: "RecordSource", shard: int):
        self.src, self.name = src, Path(src.paths[shard]).name
        self.start, self.stop = src.shard_range(shard)
        self._counts = np.full(self.stop - self.start, -1, np.int64)
        self._objects: dict[int, tuple[np.ndarray, np.ndarray]] = {}   # record -> (object regions, categories)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> "RegionRecord":
        rec = self.src[self.start + i]
        self._counts[i] = rec.num_regions
        obj = np.nonzero(rec.kind == KIND_OBJECT)[0]
        self._objects[i] = (obj, np.asarray(rec.category, np.int64)[obj])
        return rec

    def counts(self) -> np.ndarray:
        """Regions per record; records the stage never read are read now (normally none)."""
        for i in np.nonzero(self._counts < 0)[0]:
            self[int(i)]
        return self._counts.astype(np.int32)

    def objects(self) -> np.ndarray:
        """``[n, 3]`` (record, region, category) of every object region, in record order."""
        self.counts()
        parts = [np.stack([np.full(len(o), i), o, c], 1) for i, (o, c) in sorted(self._objects.items())]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, 3), np.int64)


# Shards checked at once: the checks are metadata reads whose latency (gcsfuse, NFS: tens of ms)
# dominates, so threads overlap them; 40k shards at 50 ms are ~60 s in 32 threads, ~35 min in one.
CHECK_THREADS = 32
CHECKS = ("size", "open")


def check_shards(data_dir: str | os.PathLike, how: str = "size", threads: int = CHECK_THREADS) -> list[ShardStatus]:
    """Every shard of the manifest checked, in manifest order, ``threads`` at a time.

    ``how="size"`` (what opening a dataset does): :func:`check_shard_size`, one ``stat`` a shard, for
    manifests that record ``shard_bytes``; older manifests fall back to opening. ``how="open"`` (the
    validator): :func:`check_shard`, which opens each file and counts its records."""
    if how not in CHECKS:
        raise errors.InputError(f"shard check {how!r}: use one of {CHECKS}")
    m = read_manifest(data_dir)
    paths = [str(Path(data_dir) / name) for name in m["shards"]]
    counts = [int(n) for n in m["shard_counts"]]
    sizes = m.get("shard_bytes")
    if how == "size" and sizes is not None and len(sizes) == len(paths):
        jobs = [(check_shard_size, (p, n, int(b))) for p, n, b in zip(paths, counts, sizes)]
    else:
        jobs = [(check_shard, (p, n)) for p, n in zip(paths, counts)]
    if len(jobs) < 2 or threads <= 1:
        return [fn(*args) for fn, args in jobs]
    with concurrent.futures.ThreadPoolExecutor(min(threads, len(jobs))) as pool:
        return list(pool.map(lambda job: job[0](*job[1]), jobs))


# Readers one process (a trainer, a Grain worker) keeps open at once. A reader costs a file
# descriptor and its chunk index (~37 KiB + 6.6 B a record, measured), and a global shuffle touches
# every shard: unbounded, 40k shards would take 40k descriptors and ~4 GB per worker.
MAX_OPEN_SHARDS = 64


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit (the usual soft 1,024 is far
    below what a many-shard run with worker processes may need); returns ``(soft, hard)`` after.
    Called where shards are opened, in the trainer and in every Grain worker."""
    try:
        import resource
    except ImportError:   # not POSIX
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    # The hard limit, or (when it is unlimited, which the kernel does not accept as a soft limit
    # for open files) the largest of these that it takes.
    for target in ([hard] if hard != inf else []) + [1 << 20, 65536]:
        if soft == inf or soft >= target:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
            break
        except (ValueError, OSError):
            continue
    return soft, hard


class ShardReaders:
    """Random access by index over the records of several ArrayRecord shards with at most
    ``max_open`` readers open (least recently used closed first; one in use by another thread is
    never closed). Pickles as paths and counts: each Grain worker opens its own readers."""

    def __init__(self, paths: Sequence[str], counts: Sequence[int], max_open: int = MAX_OPEN_SHARDS):
        if max_open < 1:
            raise errors.InputError(f"max_open {max_open}: at least one reader must be open")
        self.paths, self.max_open = list(paths), int(max_open)
        self.starts = np.concatenate([[0], np.cumsum(np.asarray(counts, np.int64))]).astype(np.int64)
        self._start_runtime()

    def _start_runtime(self):
        raise_open_file_limit()
        self._open: "collections.OrderedDict[int, Any]" = collections.OrderedDict()
        self._busy: dict[int, int] = {}
        self._lock = threading.Lock()
        self.opens = 0   # readers opened so far (a shard re-opened after eviction counts again)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_open", "_busy", "_lock", "opens")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._start_runtime()

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def num_open(self) -> int:
        return len(self._open)

    def _acquire(self, s: int):
        with self._lock:
            reader = self._open.get(s)
            if reader is None:
                from array_record.python.array_record_module import ArrayRecordReader

                reader = self._open_verified(s, ArrayRecordReader)
                self._open[s] = reader
                self.opens += 1
            self._open.move_to_end(s)
            self._busy[s] = self._busy.get(s, 0) + 1
            return reader

    def _open_verified(self, s: int, reader_cls):
        """Shard ``s``'s reader, its record count checked against the index's: the lazy half of the
        start-up check (a shard checked by size alone is opened here first)."""
        path, expected = self.paths[s], int(self.starts[s + 1] - self.starts[s])
        try:
            reader = reader_cls(path, options="readahead_buffer_size:0", file_reader_buffer_size=32768)
            found = int(reader.num_records())
        except Exception as e:  # noqa: BLE001 - truncation / corruption arrive as RuntimeError
            raise DamagedShardError(ShardStatus(path, expected, -1, -1, f"cannot be opened ({errors.first_line(e)}); "
                                                "the file is truncated or corrupted").message()) from None
        if found != expected:
            reader.close()
            raise DamagedShardError(ShardStatus(path, expected, found, -1, f"holds {found} records, the manifest "
                                                f"says {expected}").message())
        return reader

    def _release(self, s: int):
        with self._lock:
            self._busy[s] -= 1
            if not self._busy[s]:
                del self._busy[s]
            if len(self._open) > self.max_open:   # evict only over the bound: this runs on every read
                idle = [k for k in self._open if k not in self._busy]   # least recently used first
                for k in idle[:len(self._open) - self.max_open]:
                    self._open.pop(k).close()

    def __getitem__(self, index: int) -> bytes:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} outside [0, {len(self)})")
        s = int(np.searchsorted(self.starts, index, side="right") - 1)
        reader = self._acquire(s)
        try:
            return reader.read([index - int(self.starts[s])])[0]
        finally:
            self._release(s)

    def close(self) -> None:
        with self._lock:
            while self._open:
                self._open.popitem()[1].close()


class RecordSource:
    """Random access over all shards (a Grain ``RandomAccessDataSource``), decoding on read.

    Every shard is checked against the manifest on opening (:func:`check_shards`, by size: one
    ``stat`` a shard in threads, so start-up makes no sequential pass over 40k files): a damaged one
    raises :class:`DamagedShardError` naming it, or, with ``skip_damaged=True``, is left out and
    listed in :attr:`skipped`. A shard whose size is right but whose record count is not (rare:
    rewritten in place with other records) is caught when it is first read, with the same one-line
    error; ``check="open"`` opens every shard up front instead, so such a shard can be skipped too.
    Index ``i`` runs over the kept records; :meth:`dataset_index` maps it to the record's index in the whole dataset (what sidecars such as cluster labels are keyed by)
    and errors name ``file:local_index``.
    """

    def __init__(self, data_dir: str | os.PathLike, *, skip_damaged: bool = False,
                 max_open: int = MAX_OPEN_SHARDS, check: str = "size"):
        self.data_dir = Path(storage.require_local(
            data_dir, "a region dataset's ArrayRecord shards",
            "ArrayRecord reads local files only: mount the bucket, e.g. `gcsfuse BUCKET /gcs/BUCKET`, and pass "
            "the mount path"))
        status = check_shards(self.data_dir, check)
        self.skipped = [s for s in status if not s.ok]
        if self.skipped and not skip_damaged:
            more = f" ({len(self.skipped)} of {len(status)} shards damaged; " \
                   f"`python -m rice_jax.data.records --validate {data_dir}` lists them)" if len(self.skipped) > 1 else ""
            raise DamagedShardError(self.skipped[0].message() + more)
        kept = [s for s in status if s.ok]
        if not kept:
            raise DamagedShardError(f"{data_dir}: every shard is damaged; {self.skipped[0].message()}")
        self.paths = [s.path for s in kept]
        # Exact record ranges: the source need not re-open every file to count it.
        self._src = ShardReaders([s.path for s in kept], [s.found for s in kept], max_open)
        all_starts = np.cumsum([0] + [s.expected for s in status])
        self._all_paths = [s.path for s in status]
        self._all_starts = all_starts
        self._starts = np.cumsum([0] + [s.found for s in kept])
        self._offsets = np.array([all_starts[i] for i, s in enumerate(status) if s.ok], np.int64)

    @property
    def skipped_records(self) -> int:
        return int(sum(s.expected for s in self.skipped))

    def __len__(self) -> int:
        return len(self._src)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Source indices ``[start, stop)`` of kept shard ``shard`` (an index into :attr:`paths`)."""
        return int(self._starts[shard]), int(self._starts[shard + 1])

    def dataset_index(self, index: int) -> int:
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        return int(self._offsets[shard] + index - self._starts[shard])

    def where(self, dataset_index: int) -> str:
        shard = int(np.searchsorted(self._all_starts, dataset_index, side="right") - 1)
        return f"{self._all_paths[shard]}:{dataset_index - self._all_starts[shard]}"

    def raw(self, index: int) -> bytes:
        return self._src[index]

    def __getitem__(self, index: int) -> RegionRecord:
        return decode(self._src[index], self.where(self.dataset_index(int(index))))

    def __iter__(self) -> Iterator[RegionRecord]:
        for i in range(len(self)):
            yield self[i]


def read_shard(path: str | os.PathLike, chunk: int = 64) -> Iterator[RegionRecord]:
    """Every record of one shard file, in order (decoded and validated; errors name file:index)."""
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path))
    try:
        n = int(reader.num_records())
        for start in range(0, n, chunk):
            for i, raw in enumerate(reader.read(list(range(start, min(n, start + chunk))))):
                yield decode(raw, f"{path}:{start + i}")
    finally:
        reader.close()


def validate_dataset(data_dir: str | os.PathLike) -> dict:
    """Decode and validate every record; raise on the first violation (it names itself)."""
    src = RecordSource(data_dir)
    n = 0
    for rec in src:
        n += rec.num_regions
    return {"num_images": len(src), "num_regions": n}


def validate_report(data_dir: str | os.PathLike, *, decode_records: bool = True) -> list[dict]:
    """Per-shard health: the open check, then (``decode_records``) every record decoded and validated.

    Unlike :func:`validate_dataset` it does not stop at the first problem: each shard gets a row
    with its status, its record count against the manifest and the number of bad records, with
    the first bad one named."""
    from array_record.python.array_record_module import ArrayRecordReader

    rows = []
    for st in check_shards(data_dir, "open"):
        row = {"shard": os.path.basename(st.path), "bytes": st.size_bytes, "expected": st.expected,
               "found": st.found, "bad_records": 0, "status": "ok" if st.ok else st.problem}
        if st.ok and decode_records:
            reader = ArrayRecordReader(st.path)
            bad, first = 0, ""
            for i in range(st.found):
                try:
                    decode(reader.read([i])[0], f"{st.path}:{i}")
                except Exception as e:  # noqa: BLE001 - counted and reported, not raised
                    bad += 1
                    first = first or errors.first_line(e)
            reader.close()
            row["bad_records"] = bad
            if bad:
                row["status"] = f"{bad} bad record(s), first: {first}"
        rows.append(row)
    return rows


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m rice_jax.data.records",
                                 description="Check a region dataset: every shard against the manifest, every record "
                                             "against the schema. Exit 0 if healthy, 1 if anything is damaged.")
    ap.add_argument("--validate", metavar="DIR", required=True, help="the dataset folder (with manifest.json)")
    ap.add_argument("--shards-only", action="store_true", help="open each shard and count; do not decode records")
    a = ap.parse_args(argv)
    rows = validate_report(a.validate, decode_records=not a.shards_only)
    width = max(len(r["shard"]) for r in rows) if rows else 5
    print(f"{'shard':<{width}}  {'bytes':>12}  {'records':>15}  {'bad':>5}  status")
    for r in rows:
        rec = f"{r['found']}/{r['expected']}" if r["found"] >= 0 else f"?/{r['expected']}"
        print(f"{r['shard']:<{width}}  {r['bytes']:>12}  {rec:>15}  {r['bad_records']:>5}  {r['status']}")
    damaged = [r for r in rows if r["status"] != "ok"]
    total = sum(r["expected"] for r in rows)
    lost = sum(r["expected"] for r in damaged)
    print(f"{len(rows) - len(damaged)}/{len(rows)} shards healthy; {lost} of {total} records in damaged shards")
    if damaged:
        print(f"advice: {SHARD_ADVICE}")
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
