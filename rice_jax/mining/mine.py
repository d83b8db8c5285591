"""Region mining: raw images -> a region dataset (object proposals + OCR transcripts).

    python -m rice_jax.mining.mine --out DATA --images DIR            [--proposals P --ocr O ...]
    python -m rice_jax.mining.mine --out DATA --image-list FILES.txt  (10^7+ images: never listed in one process)
    python -m rice_jax.mining.mine --out DATA --tar 'gs://bucket/laion/{00000..39999}.tar' --preset paper
    python -m rice_jax.mining.mine --out DATA --sa1b 'sa1b/sa_{000000..000999}.tar' --ocr rapidocr
    python -m rice_jax.mining.mine --out DATA --records DATASET --proposals none --ocr rapidocr

The output is the importers' format (``records.py``: ArrayRecord shards + a
manifest), so tokenizer, clustering, pipeline and training consume it
unchanged; the manifest's ``mining`` entry records how it was mined (proposer,
OCR engine, every threshold) and what was skipped and why.

Work is split into input units: one tar file, one shard of an input dataset, or
a byte range of an image list (``--images DIR`` is listed once into
``DATA/mining/images.txt`` and read as such a list). Each unit becomes one output
shard ``regions-NNNNNN.array_record``, written atomically (temporary name + rename)
together with its own stats file under ``DATA/mining/``; a unit whose stats file
exists is done. Re-running therefore skips finished units: a crash or ``kill -9``
loses at most the units in flight, and the result equals an uninterrupted run
(each unit depends only on its inputs and the settings). ``mining/plan.json``
holds the settings (a rerun with other settings is refused) and the units, which
only grow: a rerun whose inputs match **more** tars (or a longer list, or a folder
with new files) mines only the new units and extends the manifest; one whose inputs
no longer match finished units stops and says how many units and images would be
lost (``--forget-missing`` drops those tars' units on purpose). The manifest is
written last, once every unit is done.

Bad input never blocks a run: a damaged or truncated tar keeps the samples read
before the damage, the rest is counted (``damaged_tar`` with the reason in the
unit's stats and the manifest), and a later rerun mines that unit again if the
tar's size has changed (it was still being copied); damaged members, corrupt
images, images below ``--min-image-short-edge`` and images with no region are
skipped and counted, as the importers do.

Tar shards follow the web-dataset layout (files of one sample share a key, the
path up to the first dot of the file name): a sample's ``.txt`` (caption) and
``.json`` (url, size, ... — its scalar fields) are kept in the record's ``meta``.
``--sa1b`` reads SA-1B's tars, whose ``.json`` holds SAM's own masks: their boxes
are the object regions (no proposer runs), under the same size rules and top-k.
Tars and lists may be local, absolute or ``gs://`` patterns, read streaming
through ``etils.epath`` (no mount needed); the output folder must be a local or
mounted one every worker shares.

Engines run the same per-unit function (:func:`mine_unit`):

- ``local`` — in this process (``--workers 1``) or a pool of ``--workers``
  processes (spawned, each with its own proposer/OCR models; with SAM on a
  multi-GPU host, each worker its own GPU);
- ``ray`` — Ray Data (``ray.data.from_items(units).map(...)``) on a local Ray
  instance or an existing cluster (``--ray-address``), for when mining outgrows one
  machine; ``--ray-gpus-per-unit 1`` gives each SAM unit a GPU (Ray sets the
  worker's ``CUDA_VISIBLE_DEVICES``; SAM's ``device=auto`` then uses it). Chosen
  over Apache Beam because it installs with this project's pins (Beam 2.77 needs
  pillow < 13 and protobuf < 7); see ``docs/data.md`` ("Mining on a cluster").
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import tarfile
import time
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np

from rice_jax import cli, errors, storage
from rice_jax.data import records
from rice_jax.mining import ocr, proposals
from rice_jax.data.coco import IMAGE_EXTS, ImportStats, open_image

MINING_DIR = "mining"
PLAN = "plan.json"
PLAN_VERSION = 2
LISTING = "images.txt"            # --images DIR, listed once: the list its units read
# Images per unit (= per output shard) of --images / --image-list inputs: 400M images / 8192 = 48.8k
# shards, about the ~40k-50k shards the readers, checks and label index are sized for (a shard of
# 8192 web images at ~100 KB is ~0.8 GB). Small jobs pass fewer so their workers share the units.
IMAGES_PER_UNIT = 8192
FINALIZE_THREADS = 32
ANNOTATIONS = "sa1b-annotations"  # the proposals value of --sa1b runs: SAM's released masks, no proposer

# Presets of the settings that decide what is mined; explicit flags override them.
PRESETS = {
    "default": {},
    # The paper: images with short edge >= 336 px, SAM boxes with short edge >= 128 px, PaddleOCR
    # reads with confidence > 0.7; about 2B regions from 400M images, so at most 5 objects an image.
    "paper": {"min_image_short_edge": 336, "min_box_short_edge": 128, "ocr_min_confidence": 0.7,
              "max_proposals": 5},
}
PAPER = PRESETS["paper"]


@dataclasses.dataclass(frozen=True)
class MiningSettings:
    """Everything that decides the mined regions (stored in the manifest and the plan)."""
    proposals: str = "felzenszwalb"      # felzenszwalb[:opts] | sam:DIR[,opts] | none | sa1b-annotations
    ocr: str = "rapidocr"                # rapidocr[:side=N] | paddle-json:PATH | none
    min_image_short_edge: int = 0        # skip smaller images (paper: 336)
    min_box_short_edge: float = 0.0      # drop smaller object proposals (paper: 128)
    max_proposals: int = 16              # object proposals kept per image (after NMS; paper preset: 5)
    nms_iou: float = 0.7
    ocr_min_confidence: float = PAPER["ocr_min_confidence"]
    keep_input_regions: bool = True      # --records input: keep its regions next to the mined ones
    max_side: int = 0                    # re-encode images whose longer side is above this (JPEG q90, boxes
    #                                      scaled; training decodes them faster); 0 keeps the source bytes


def preset_settings(preset: str = "default", **overrides) -> MiningSettings:
    """A preset's settings with ``overrides`` (the flags a user gave) on top; ``None`` = not given."""
    if preset not in PRESETS:
        raise errors.InputError(f"--preset {preset!r}: use one of {', '.join(PRESETS)}")
    return MiningSettings(**{**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})


@dataclasses.dataclass(frozen=True)
class Unit:
    """One input unit -> one output shard."""
    index: int
    kind: str                            # "list" | "records" | "tar" | "sa1b"
    source: str                          # list file | one dataset shard | one tar file
    root: str = ""                       # list: the folder relative lines are resolved against
    start: int = 0                       # list: the unit's byte range [start, stop) of the list file
    stop: int = 0


class Sample(NamedTuple):
    key: str                             # image_id: relative path, tar member name or record id
    data: bytes                          # encoded image
    base: Optional[records.RegionRecord] = None    # --records input: the record being extended
    meta: dict = {}                      # caption, url, ... (web-dataset .txt/.json)
    boxes: Optional[tuple] = None        # SA-1B: (xyxy boxes, scores, (json width, height))


# ----------------------------------------------------------------------------- inputs
def expand_braces(pattern: str) -> list[str]:
    """``a/{000..002}.tar`` -> a/000.tar, a/001.tar, a/002.tar; ``{x,y}`` lists too (the
    webdataset / shell convention for shard lists)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.group(1), r.group(2)
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


def _has_wildcard(s: str) -> bool:
    return any(c in s for c in "*?[")


def glob_paths(pattern: str) -> list[str]:
    """Files matching a wildcard pattern, relative, absolute or ``gs://`` (through epath), sorted.

    The pattern is split at its first component with a wildcard: the part before is the folder
    to list (``gs://bucket/laion``, ``/mnt/data``, ``.``), the rest the glob within it."""
    parts = pattern.split("/")
    cut = next(i for i, p in enumerate(parts) if _has_wildcard(p))
    base = "/".join(parts[:cut]) or ("/" if pattern.startswith("/") else ".")
    if base.endswith(":/"):        # "gs://bucket" split as "gs:", "", "bucket"
        base += "/"
    return sorted(os.fspath(p) for p in storage.path(base).glob("/".join(parts[cut:])))


def _exists(paths: list[str]) -> list[bool]:
    """Existence of many paths. Remote ones: a brace list of 40K tars in a few folders is one listing
    per folder (a few requests), a handful of scattered ones a request each, concurrently."""
    if not any(storage.is_remote(p) for p in paths):
        return [os.path.exists(p) for p in paths]
    parents = collections.Counter(p.rsplit("/", 1)[0] for p in paths)
    if len(paths) > 64 and len(parents) * 16 < len(paths):
        listed = {}
        with concurrent.futures.ThreadPoolExecutor(min(32, len(parents))) as pool:
            for parent, names in zip(parents, pool.map(lambda d: {os.fspath(c) for c in storage.path(d).iterdir()}
                                                       if storage.path(d).is_dir() else set(), parents)):
                listed[parent] = names
        return [os.fspath(storage.path(p)) in listed[p.rsplit("/", 1)[0]] for p in paths]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        return list(pool.map(lambda p: storage.path(p).exists(), paths))


def resolve_tars(pattern: str, flag: str = "--tar") -> list[str]:
    """The tar files a pattern names (brace lists, wildcards), as absolute paths or URLs, in order."""
    paths, explicit = [], []
    for pat in expand_braces(pattern):
        if _has_wildcard(pat):
            found = glob_paths(pat)
            if not found:
                raise errors.MissingInput(f"{flag} {pattern}: nothing matches {pat}")
            paths += found
        else:
            paths.append(os.fspath(storage.path(pat)))
            explicit.append(paths[-1])
    missing = [p for p, ok in zip(explicit, _exists(explicit)) if not ok]
    if missing:
        raise errors.MissingInput(f"{flag} {pattern}: {len(missing)} file(s) missing, first {missing[0]}")
    dup = [p for p, c in collections.Counter(paths).items() if c > 1]
    if dup:
        raise errors.InputError(f"{flag} {pattern}: {dup[0]} is named twice")
    return paths


def list_folder(root: str) -> list[str]:
    """Image files under ``root`` (recursive), as sorted relative paths."""
    base = Path(root)
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.suffix.lower() in IMAGE_EXTS)


def _unit_bytes(list_path: str, images_per_unit: int) -> int:
    """Bytes of an image list per unit: ``images_per_unit`` lines at the mean length of its first MiB."""
    with storage.path(list_path).open("rb") as f:
        head = f.read(1 << 20)
    lines = max(1, head.count(b"\n"))
    return max(1, int(round(len(head) / lines * images_per_unit)))


def _list_tail(list_path: str, end: int) -> str:
    """Digest of the 4 KiB before ``end``: a grown list must keep what earlier runs read."""
    if end <= 0:
        return ""
    with storage.path(list_path).open("rb") as f:
        f.seek(max(0, end - 4096))
        return hashlib.sha256(f.read(end - max(0, end - 4096))).hexdigest()


def _list_lines(unit: Unit) -> Iterator[str]:
    """The names of an image list whose line starts in ``[unit.start, unit.stop)``.

    A line belongs to the unit its first byte falls in, so units read disjoint lines and together
    every line, each seeking to its own range: no process reads the whole list."""
    with storage.path(unit.source).open("rb") as f:
        pos = unit.start
        f.seek(max(0, pos - 1))
        if pos > 0 and f.read(1) != b"\n":
            pos += len(f.readline())          # the rest of a line the previous unit owns
        while pos < unit.stop:
            line = f.readline()
            if not line:
                break
            pos += len(line)
            name = line.decode("utf-8").strip()
            if name and not name.startswith("#"):
                yield name


def _read_listed(unit: Unit, name: str) -> Optional[bytes]:
    if "://" in name or os.path.isabs(name):
        p = storage.path(name)
    else:
        p = storage.path(unit.root) / name if storage.is_remote(unit.root) else Path(unit.root) / name
    return p.read_bytes()


_SCALARS = (str, int, float, bool, type(None))


def _scalar_fields(doc: dict, limit: int = 4096) -> dict:
    """The scalar fields of a sample's JSON (url, caption, width, original_width, ...), bounded."""
    return {k: v for k, v in doc.items() if isinstance(k, str) and isinstance(v, _SCALARS)
            and not (isinstance(v, str) and len(v) > limit)}


def _sa1b_boxes(doc: dict) -> tuple:
    """SA-1B annotations -> (xyxy boxes, scores = predicted IoU x stability, the json's image size)."""
    anns = doc.get("annotations")
    if not isinstance(anns, list):
        raise ValueError("no 'annotations' list")
    boxes = np.asarray([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    scores = np.asarray([float(a.get("predicted_iou", 1.0)) * float(a.get("stability_score", 1.0)) for a in anns],
                        np.float32)
    im = doc.get("image", {})
    return boxes, scores, (im.get("width"), im.get("height"))


def sample_key(name: str) -> tuple[str, str]:
    """Web-dataset key and extension of a tar member: ``a/b/000123.jpg`` -> (``a/b/000123``, ``jpg``)."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


_TAR_DAMAGE = (tarfile.TarError, EOFError, OSError, zlib.error)


def _tar_samples(unit: Unit, stats: ImportStats, damage: dict) -> Iterator[Sample]:
    """A tar's samples in order, streamed (``r|*``: plain or compressed, local or remote).

    Damage (truncation, a bad header or checksum, a read error) ends the tar: samples before it
    are kept, the sample it cut is counted, the reason goes to ``damage``."""
    sa1b = unit.kind == "sa1b"

    def emit(group: list) -> Iterator[Sample]:
        meta, boxes = {}, None
        images = [(n, d) for n, ext, d in group if Path(n).suffix.lower() in IMAGE_EXTS]
        for n, ext, d in group:
            if ext == "txt" or ext.endswith(".txt"):
                meta["caption"] = d.decode("utf-8", "replace").strip()
            elif ext == "json" or ext.endswith(".json"):
                try:
                    doc = json.loads(d)
                    if not isinstance(doc, dict):
                        raise ValueError("not an object")
                    if sa1b:
                        boxes = _sa1b_boxes(doc)
                        doc = doc.get("image", {}) if isinstance(doc.get("image"), dict) else {}
                    meta.update({k: v for k, v in _scalar_fields(doc).items() if k not in meta})
                except (ValueError, KeyError, TypeError):
                    stats["dropped_unreadable_metadata"] += 1
        if not images:
            stats["skipped_sample_without_image"] += 1
            return
        if sa1b and boxes is None:
            stats["skipped_sample_without_annotations"] += len(images)
            return
        for n, d in images:
            yield Sample(n, d, None, meta, boxes)

    group, key = [], None
    try:
        with storage.path(unit.source).open("rb") as f, tarfile.open(fileobj=f, mode="r|*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                k, ext = sample_key(member.name)
                wanted = Path(member.name).suffix.lower() in IMAGE_EXTS or ext.endswith(("txt", "json"))
                if not wanted:
                    continue
                if k != key and group:
                    yield from emit(group)
                    group = []
                key = k
                fh = tf.extractfile(member)
                if fh is None:
                    stats["skipped_unreadable_tar_member"] += 1
                    continue
                group.append((member.name, ext, fh.read()))
        if group:
            yield from emit(group)
    except _TAR_DAMAGE as e:
        stats["damaged_tar"] += 1
        if group:
            stats["skipped_sample_cut_by_damage"] += 1
        damage.update(reason=f"{type(e).__name__}: {e}"[:300], size=_size(unit.source))


def _size(path: str) -> Optional[int]:
    try:
        return int(storage.path(path).stat().length)
    except (OSError, AttributeError):
        return None


def _items(unit: Unit, stats: ImportStats, damage: dict) -> Iterator[Sample]:
    """Every image of a unit, as :class:`Sample` s."""
    if unit.kind == "list":
        for name in _list_lines(unit):
            try:
                data = _read_listed(unit, name)
            except FileNotFoundError:
                stats["skipped_missing_file"] += 1
                continue
            except OSError:
                stats["skipped_unreadable_file"] += 1
                continue
            yield Sample(name, data)
    elif unit.kind == "records":
        for rec in records.read_shard(unit.source):
            yield Sample(rec.image_id, rec.image, rec, rec.meta)
    elif unit.kind in ("tar", "sa1b"):
        yield from _tar_samples(unit, stats, damage)
    else:
        raise ValueError(f"unit {unit.index}: unknown kind {unit.kind!r}")


# ----------------------------------------------------------------------------- one unit
_MODELS: dict = {}


def _models(settings: MiningSettings, ocr_threads: int, index_dir: Optional[str] = None, load: bool = True):
    """Proposer, box rules and OCR engine for ``settings``, built once per process (models are heavy).

    ``load=False``: the driver's check of the specs before any worker starts (no weights loaded)."""
    key = (settings, ocr_threads, index_dir, load)
    if key not in _MODELS:
        _MODELS.clear()
        rules = dict(min_short_edge=settings.min_box_short_edge, max_per_image=settings.max_proposals,
                     nms_iou=settings.nms_iou)
        proposer = (proposals.NoProposals() if settings.proposals == ANNOTATIONS
                    else proposals.parse(settings.proposals, load=load, **rules))
        _MODELS[key] = (proposer, proposals.BoxFilter(**rules),
                        ocr.parse(settings.ocr, min_confidence=settings.ocr_min_confidence, threads=ocr_threads,
                                  index_dir=index_dir))
    return _MODELS[key]


def mine_image(sample: Sample, settings: MiningSettings, proposer, box_filter, ocr_engine, stats: ImportStats,
               timing: collections.Counter):
    """One image -> its region record (or None, counted)."""
    key, data, base = sample.key, sample.data, sample.base
    im = open_image(data, key, stats)
    if im is None:
        return None
    w, h = im.width, im.height
    if min(w, h) < settings.min_image_short_edge:
        stats["skipped_small_image"] += 1
        return None
    rgb = np.asarray(im.convert("RGB"))
    t = time.perf_counter()
    if sample.boxes is not None:      # SA-1B: SAM's released masks, in the json's pixel frame
        ann, ann_scores, (jw, jh) = sample.boxes
        scale = np.array([w / jw, h / jh] * 2, np.float32) if jw and jh else np.ones(4, np.float32)
        boxes, _ = box_filter(ann * scale, ann_scores, w, h)
        stats["annotation_boxes_read"] += len(ann)
    else:
        boxes, _ = proposer(rgb)
    timing["proposals_s"] += time.perf_counter() - t
    t = time.perf_counter()
    texts = ocr_engine(rgb, key, stats)
    timing["ocr_s"] += time.perf_counter() - t
    keep = base is not None and settings.keep_input_regions
    all_boxes = [base.boxes] if keep else []
    kinds = [base.kind] if keep else []
    words = list(base.text) if keep else []
    cats = [base.category] if keep else []
    all_boxes.append(np.asarray(boxes, np.float32).reshape(-1, 4))
    kinds.append(np.full(len(boxes), records.KIND_OBJECT, np.int8))
    words += [""] * len(boxes)
    cats.append(np.full(len(boxes), -1, np.int32))
    text_boxes = []
    for tr in texts:
        x0, y0, x1, y1 = max(tr.box[0], 0.0), max(tr.box[1], 0.0), min(tr.box[2], w), min(tr.box[3], h)
        if x1 <= x0 or y1 <= y0:
            stats["dropped_text_box_outside_image"] += 1
            continue
        text_boxes.append([x0, y0, x1, y1])
        words.append(tr.text)
    all_boxes.append(np.asarray(text_boxes, np.float32).reshape(-1, 4))
    kinds.append(np.full(len(text_boxes), records.KIND_TEXT, np.int8))
    cats.append(np.full(len(text_boxes), -1, np.int32))
    stats["object_regions_mined"] += len(boxes)
    stats["text_regions_mined"] += len(text_boxes)
    kind = np.concatenate(kinds)
    if not len(kind):
        stats["skipped_no_usable_region"] += 1
        return None
    stats["images_written"] += 1
    stats["regions_written"] += len(kind)
    fmt = im.format.lower() if base is None else base.format
    cluster = None
    if keep:
        cluster = np.concatenate([base.cluster, np.full(len(kind) - base.num_regions, -1, np.int32)])
    boxes_out, meta = np.concatenate(all_boxes), sample.meta
    if settings.max_side and max(w, h) > settings.max_side:
        t = time.perf_counter()
        data, (w2, h2) = reencode(rgb, settings.max_side)
        boxes_out = boxes_out * np.array([w2 / w, h2 / h] * 2, np.float32)
        meta = {**(meta or {}), "stored_from": [int(w), int(h)]}
        w, h, fmt = w2, h2, "jpeg"
        stats["images_reencoded"] += 1
        timing["reencode_s"] += time.perf_counter() - t
    return records.RegionRecord.new(data, fmt, h, w, key, boxes_out, kind, text=words,
                                    category=np.concatenate(cats), cluster=cluster, meta=meta)


REENCODE_QUALITY = 90


def reencode(rgb: np.ndarray, max_side: int) -> tuple[bytes, tuple[int, int]]:
    """``rgb`` scaled so its longer side is ``max_side`` (aspect kept, Lanczos) as JPEG bytes at
    :data:`REENCODE_QUALITY`, and the new ``(width, height)``. Training decodes every image once an
    epoch: a stored size near the training size is decoded several times faster than a 2-4k original
    (docs/data.md), at the cost of a second lossy encoding."""
    import io

    from PIL import Image

    h, w = rgb.shape[:2]
    s = max_side / max(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    buf = io.BytesIO()
    Image.fromarray(rgb).resize(size, Image.LANCZOS).save(buf, "JPEG", quality=REENCODE_QUALITY)
    return buf.getvalue(), size


def unit_files(out: Path, unit: Unit) -> tuple[Path, Path]:
    """A unit's shard and stats file; named by the unit's index alone, so units can be added later."""
    return out / f"regions-{unit.index:06d}.array_record", out / MINING_DIR / f"unit-{unit.index:06d}.json"


def damage_marker(out: Path, index: int) -> Path:
    return out / MINING_DIR / f"damaged-{index:06d}.json"


def mine_unit(unit: Unit, out: str, settings: MiningSettings, ocr_threads: int = 0) -> dict:
    """Mine one unit into its shard + stats file (both atomic); returns the stats."""
    out_path = Path(out)
    shard, stats_file = unit_files(out_path, unit)
    if stats_file.exists():
        return json.loads(stats_file.read_text())
    proposer, box_filter, ocr_engine = _models(settings, ocr_threads, str(out_path / MINING_DIR))
    damage_marker(out_path, unit.index).unlink(missing_ok=True)     # of an attempt that died before its stats
    stats, timing, damage = ImportStats(), collections.Counter(), {}
    t0 = time.perf_counter()

    def recs():
        for sample in _items(unit, stats, damage):
            stats["images_seen"] += 1
            rec = mine_image(sample, settings, proposer, box_filter, ocr_engine, stats, timing)
            if rec is not None:
                yield rec

    counts = records.write_shard_atomic(recs(), shard)
    timing["total_s"] = time.perf_counter() - t0
    result = {"unit": unit.index, "source": unit.source, "shard": shard.name, "images": counts.images,
              "bytes": os.path.getsize(shard),
              "objects": counts.objects, "texts": counts.texts, "stats": dict(stats),
              "timing": {k: round(v, 3) for k, v in timing.items()}, "pid": os.getpid()}
    if damage:
        result["damaged"] = damage
        # A marker beside the stats: a rerun finds damaged units in the one listing of mining/ it
        # makes anyway, instead of reading 40K stats files. Written first: a unit is done once its
        # stats file exists, and a done unit's damage must not go unseen.
        storage.write_text_atomic(damage_marker(out_path, unit.index), json.dumps(damage) + "\n")
    storage.write_text_atomic(stats_file, json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


# ----------------------------------------------------------------------------- engines
def _pin_gpu(queue) -> None:
    """Pool initializer: this worker sees one GPU (before torch loads in it)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = str(queue.get())


def _gpus_for(settings: MiningSettings) -> int:
    """GPUs the local pool spreads SAM workers over (0: no SAM, a CPU device, or no GPU)."""
    if not settings.proposals.startswith("sam:") or "device=cpu" in settings.proposals:
        return 0
    import torch

    return torch.cuda.device_count()


def _run_local(pending: list[Unit], out: str, settings: MiningSettings, workers: int, progress):
    if workers <= 1:
        for u in pending:
            progress(mine_unit(u, out, settings))
        return
    import multiprocessing

    # Spawned workers: forking a process that holds ONNX Runtime / torch thread pools can deadlock.
    ctx = multiprocessing.get_context("spawn")
    kw = {}
    gpus = _gpus_for(settings)
    if gpus:
        queue = ctx.Queue()
        for i in range(workers):
            queue.put(i % gpus)
        kw = dict(initializer=_pin_gpu, initargs=(queue,))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, **kw) as pool:
        futures = [pool.submit(mine_unit, u, out, settings, 1) for u in pending]
        for f in concurrent.futures.as_completed(futures):
            progress(f.result())


def _run_ray(pending: list[Unit], out: str, settings: MiningSettings, *, address: Optional[str],
             workers: int, gpus_per_unit: float, progress):
    # Ray's usage-statistics reporting would contact a server: off before Ray loads.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import warnings

    # Ray Data reads its own deprecated settings when its context is created (not ours to fix), and
    # Ray starts its daemons with fork + exec, which JAX's fork warning cannot tell from a bare fork.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    try:
        import ray
    except ImportError as e:
        raise ImportError("--engine ray needs Ray: pip install 'ray[data]' (see requirements-dev.txt)") from e
    started = not ray.is_initialized()
    if started:
        kw = dict(address=address) if address else dict(num_cpus=max(1, workers))
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kw)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        rows = [{"unit": json.dumps(dataclasses.asdict(u))} for u in pending]

        def task(row):
            return {"result": json.dumps(mine_unit(Unit(**json.loads(row["unit"])), out, settings, 1))}

        ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
        ds = ds.map(task, num_cpus=1, num_gpus=gpus_per_unit or None,
                    concurrency=max(1, workers) if not address else None)
        for row in ds.iter_rows():
            progress(json.loads(row["result"]))
    finally:
        if started:
            ray.shutdown()


# ----------------------------------------------------------------------------- the plan: units that only grow
TAR_KINDS = ("tar", "sa1b")


def _source_of(images, image_list, records_dir, tar, sa1b) -> dict[str, str]:
    """The run's inputs as {kind: spec}: exactly one, or ``--tar`` and ``--sa1b`` together (one dataset
    of web-dataset and SA-1B images, as the paper's)."""
    given = {k: v for k, v in (("images", images), ("image_list", image_list), ("records", records_dir),
                               ("tar", tar), ("sa1b", sa1b)) if v is not None}
    if len(given) != 1 and set(given) != set(TAR_KINDS):
        raise errors.InputError("give one input: --images DIR, --image-list FILE, --records DATASET, "
                                "--tar PATTERN, --sa1b PATTERN, or --tar and --sa1b together")
    return given


def _family(kinds) -> str:
    """Inputs a run may grow between: tars of either kind are one family; each other kind its own."""
    kinds = set(kinds)
    return "tars" if kinds <= set(TAR_KINDS) else "+".join(sorted(kinds))


def _flags(kinds) -> str:
    return " and ".join("--" + k.replace("_", "-") for k in kinds)


def _lost(out: Path, units: list[dict]) -> str:
    """'N unit(s) with M mined images (first: SOURCE)' for units an input change would drop."""
    images = 0
    for u in units:
        f = unit_files(out, Unit(u["index"], "", ""))[1]
        images += json.loads(f.read_text())["images"] if f.exists() else 0
    return f"{len(units)} unit(s) with {images} mined image(s) (first: {units[0]['source']})"


def _grow_files(old: Optional[dict], kind: str, paths: list[tuple[str, str]], out: Path, forget_missing: bool,
                flag: str):
    """Unit entries for file inputs (tars, shards; ``paths`` = (path, kind) pairs): the old ones in
    order, then the new ones."""
    if old is None:
        return [{"index": i, "source": p, "kind": k} for i, (p, k) in enumerate(paths)], [], []
    now = {p for p, _ in paths}
    kept = [u for u in old["units"] if u["source"] in now]
    gone = [u for u in old["units"] if u["source"] not in now]
    if gone and (kind == "records" or not forget_missing):
        raise errors.InputError(
            f"{out}: {flag} no longer names {_lost(out, gone)} of this run; it would lose them. Name them again "
            + ("(inputs of --records runs cannot change), or use a new --out" if kind == "records" else
               "(e.g. --tar with both patterns as a brace list), pass --forget-missing to drop them from the "
               "dataset, or use a new --out"))
    if kind == "records" and len(paths) != len(old["units"]):
        raise errors.InputError(f"{out}: {flag} has {len(paths)} shards, this run {len(old['units'])}: "
                                "use a new --out")
    known = {u["source"] for u in old["units"]}
    nxt = max([u["index"] for u in old["units"]], default=-1) + 1
    added = [{"index": nxt + i, "source": p, "kind": k} for i, (p, k) in enumerate(pk for pk in paths
                                                                                  if pk[0] not in known)]
    return kept + added, added, gone


def _grow_list(old: Optional[dict], list_path: str, root: str, images_per_unit: int, out: Path):
    """The list entry of the plan (segments of the list file, each cut into units of equal bytes)."""
    size = _size(list_path)
    if size is None:
        raise errors.MissingInput(f"{list_path}: cannot read the image list")
    if old is None:
        entry = {"path": list_path, "root": root, "unit_bytes": _unit_bytes(list_path, images_per_unit),
                 "segments": [[0, size]] if size else []}
    else:
        entry = dict(old["list"])
        end = entry["segments"][-1][1] if entry["segments"] else 0
        n_old = len(_list_units(entry))
        if size < end or _list_tail(list_path, end) != entry["tail"]:
            raise errors.InputError(
                f"{list_path}: the image list was rewritten, not appended to ({size} bytes now, {end} mined): "
                f"its {n_old} unit(s) would no longer match what they mined. Restore it and append new lines "
                "at the end, or use a new --out")
        if size > end:
            with storage.path(list_path).open("rb") as f:
                f.seek(end - 1 if end else 0)
                around = f.read(2)
            if end and around[:1] != b"\n" and around[1:2] != b"\n":
                raise errors.InputError(f"{list_path}: its last mined line (ending at byte {end}) was extended; "
                                        "append new names on new lines")
            entry["segments"] = entry["segments"] + [[end, size]]
    entry["tail"] = _list_tail(list_path, entry["segments"][-1][1] if entry["segments"] else 0)
    return entry


def _list_units(entry: dict) -> list[Unit]:
    b, units = entry["unit_bytes"], []
    for s, e in entry["segments"]:
        for a in range(s, e, b):
            units.append(Unit(len(units), "list", entry["path"], entry["root"], a, min(a + b, e)))
    return units


def plan_units(plan: dict) -> list[Unit]:
    """The units of a plan, in index order (the order of the manifest's shards)."""
    if "list" in plan:
        return _list_units(plan["list"])
    return [Unit(u["index"], u["kind"], u["source"]) for u in plan["units"]]


def _update_folder_listing(out: Path, root: str) -> tuple[str, int]:
    """``--images DIR``: its listing in ``mining/images.txt``; new files appended (sorted), missing refused."""
    listing = out / MINING_DIR / LISTING
    now = list_folder(root)
    if not listing.exists():
        if not now:
            raise errors.InputError(f"--images {root}: no image files ({', '.join(IMAGE_EXTS)}) found")
        storage.write_text_atomic(listing, "".join(n + "\n" for n in now))
        return str(listing), 0
    old = listing.read_text(encoding="utf-8").splitlines()
    gone = sorted(set(old) - set(now))
    if gone:
        raise errors.InputError(f"--images {root}: {len(gone)} file(s) mined by this run are gone (first: {gone[0]}); "
                                "restore them or use a new --out")
    added = sorted(set(now) - set(old))
    if added:
        storage.write_text_atomic(listing, "".join(n + "\n" for n in old + added))
    return str(listing), len(added)


def reconcile_plan(out: Path, settings: MiningSettings, sources: dict[str, str], *,
                   images_per_unit: int = IMAGES_PER_UNIT,
                   forget_missing: bool = False) -> tuple[dict, list[Unit], str]:
    """Create or extend ``mining/plan.json`` for ``sources`` ({kind: spec}); returns (plan, units, a line
    saying what changed)."""
    path = out / MINING_DIR / PLAN
    old = json.loads(path.read_text()) if path.exists() else None
    if old is not None and old.get("version") != PLAN_VERSION:
        raise errors.InputError(f"{out} was mined by an earlier rice_jax (plan version {old.get('version', 1)}): "
                                "use a new --out")
    if old is None and (out / records.MANIFEST).exists():
        raise errors.InputError(f"{out} already holds a dataset that was not mined by this command: use a new --out")
    settings_d = json.loads(json.dumps(dataclasses.asdict(settings)))
    if old is not None:
        # A setting added since the plan was written reads as its default (the run it describes had it).
        defaults = json.loads(json.dumps(dataclasses.asdict(MiningSettings())))
        old_settings = {**{k: v for k, v in defaults.items() if k not in old["settings"]}, **old["settings"]}
        if old_settings != settings_d:
            diff = sorted(k for k in settings_d if old_settings.get(k) != settings_d[k])
            raise errors.InputError(f"{out} holds a mining run with different settings ({', '.join(diff)}): use a "
                                    f"new --out, or delete {out} to start over")
        if _family(old["input"]) != _family(sources):
            raise errors.InputError(f"{out} holds a mining run of {_flags(old['input'])} input, not "
                                    f"{_flags(sources)}: use a new --out")
    (out / MINING_DIR).mkdir(parents=True, exist_ok=True)
    specs = {k: list(v) for k, v in (old or {}).get("specs", {}).items()}
    for k, v in sources.items():
        specs[k] = list(dict.fromkeys(specs.get(k, []) + [v]))
    plan = {"version": PLAN_VERSION, "settings": settings_d, "input": sorted(sources), "specs": specs}
    change = ""
    kind, spec = next(iter(sources.items()))
    flag = _flags(sources)
    if kind in ("images", "image_list"):
        if kind == "images":
            if not Path(spec).is_dir():
                raise errors.MissingInput(f"--images {spec}: not a folder")
            list_path, n_new = _update_folder_listing(out, spec)
            root = os.fspath(Path(spec).resolve())
        else:
            list_path = os.fspath(storage.path(spec))
            root = os.fspath(storage.path(spec).parent)
        before = len(_list_units(old["list"])) if old else 0
        plan["list"] = _grow_list(old, list_path, root, images_per_unit, out)
        added = len(_list_units(plan["list"])) - before
        if old and added:
            change = f"the list grew: {added} new unit(s)"
    else:
        if kind in TAR_KINDS:
            paths = [(p, k) for k in TAR_KINDS if k in sources for p in resolve_tars(sources[k], "--" + k)]
            dup = collections.Counter(p for p, _ in paths)
            if len(dup) < len(paths):
                raise errors.InputError(f"{flag}: {dup.most_common(1)[0][0]} is named by both patterns")
        else:
            paths = [(p, kind) for p in records.shard_paths(spec)]
        plan["units"], added, gone = _grow_files(old, kind, paths, out, forget_missing, flag)
        for u in gone:                     # --forget-missing: their shards leave the dataset
            for f in (*unit_files(out, Unit(u["index"], u["kind"], u["source"])), damage_marker(out, u["index"])):
                f.unlink(missing_ok=True)
        if old and (added or gone):
            change = (f"{len(added)} new unit(s)" + (f", {len(gone)} forgotten (--forget-missing)" if gone else ""))
    storage.write_text_atomic(path, json.dumps(plan, indent=1, sort_keys=True) + "\n")
    units = plan_units(plan)
    if not units:
        raise errors.InputError(f"{flag} {spec}: no input to mine")
    return plan, units, change


# ----------------------------------------------------------------------------- driver
def _done(out: Path) -> tuple[set[int], set[int]]:
    """Indices of finished units and of damaged ones: one listing of ``mining/``, not a stat per unit."""
    d = out / MINING_DIR
    names = os.listdir(d) if d.is_dir() else []
    index = lambda prefix: {int(n[len(prefix):-5]) for n in names  # noqa: E731
                            if n.startswith(prefix) and n.endswith(".json")}
    return index("unit-"), index("damaged-")


def _retry_changed_damaged(out: Path, units: list[Unit], done: set[int], damaged: set[int]) -> list[int]:
    """Finished units whose tar was damaged and has changed size since (it was still arriving): redo them."""
    redo = []
    for u in units:
        if u.index in damaged and u.index in done:
            marker = damage_marker(out, u.index)
            if _size(u.source) != json.loads(marker.read_text()).get("size"):
                shard, stats_file = unit_files(out, u)
                stats_file.unlink()           # not done any more, then the rest
                shard.unlink(missing_ok=True)
                marker.unlink()
                redo.append(u.index)
    return redo


def mine(out: str, *, images: Optional[str] = None, image_list: Optional[str] = None,
         records_dir: Optional[str] = None, tar: Optional[str] = None, sa1b: Optional[str] = None,
         settings: MiningSettings = MiningSettings(), engine: str = "local", workers: int = 1,
         images_per_unit: int = IMAGES_PER_UNIT, ray_address: Optional[str] = None, ray_gpus_per_unit: float = 0.0,
         forget_missing: bool = False, show_progress: bool = True) -> dict:
    """Mine every unit not yet done (new inputs included), then write the manifest; returns it."""
    out = Path(storage.require_local(out, "--out", "mine to a local (or gcsfuse-mounted) folder, then copy"))
    sources = _source_of(images, image_list, records_dir, tar, sa1b)
    if set(sources) == {"sa1b"}:
        if settings.proposals not in (ANNOTATIONS, MiningSettings.proposals):
            raise errors.InputError(f"--sa1b takes its object regions from the SA-1B annotations; drop --proposals "
                                    f"{settings.proposals}")
        settings = dataclasses.replace(settings, proposals=ANNOTATIONS)
    elif settings.proposals == ANNOTATIONS:
        raise errors.InputError(f"--proposals {ANNOTATIONS} is for --sa1b input")
    _models(settings, 0, load=False)   # bad --proposals / --ocr values fail here once, not in every worker
    out.mkdir(parents=True, exist_ok=True)
    plan, units, change = reconcile_plan(out, settings, sources, images_per_unit=images_per_unit,
                                         forget_missing=forget_missing)
    done, damaged = _done(out)
    redo = _retry_changed_damaged(out, units, done, damaged)
    done -= set(redo)
    pending = [u for u in units if u.index not in done]
    # Partial shards of units that were in flight when an earlier run died: never published
    # (no stats file), so removing them loses nothing.
    stale = [t for t in out.glob(f".regions-*{storage.TEMP_MARK}*")]
    for t in stale:
        t.unlink()
    if ray_gpus_per_unit and not settings.proposals.startswith("sam:"):
        print(f"[mine] note: --ray-gpus-per-unit {ray_gpus_per_unit} reserves GPUs, but only SAM uses them "
              f"(proposals={settings.proposals})", flush=True)
    print(f"[mine] {len(units)} unit(s), {len(units) - len(pending)} already done"
          f"{f'; {change}' if change else ''}"
          f"{f'; {len(redo)} damaged unit(s) whose tar changed since, mined again' if redo else ''}"
          f"{f' ({len(stale)} partial shard(s) of interrupted units removed)' if stale else ''}; "
          f"proposals={settings.proposals} ocr={settings.ocr} engine={engine} workers={workers}", flush=True)
    bar = None
    if show_progress and pending:
        from tqdm import tqdm

        bar = tqdm(total=len(pending), desc="mining units", unit="unit")

    def progress(result: dict) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(images=result["images"], objects=result["objects"], texts=result["texts"])

    t0 = time.perf_counter()
    if pending and settings.ocr.startswith("paddle-json:"):
        ocr.parse(settings.ocr, index_dir=str(out / MINING_DIR)).prepare()   # index once, before the workers
    if engine == "local":
        _run_local(pending, str(out), settings, workers, progress)
    elif engine == "ray":
        _run_ray(pending, str(out), settings, address=ray_address, workers=workers,
                 gpus_per_unit=ray_gpus_per_unit, progress=progress)
    else:
        raise errors.InputError(f"--engine {engine!r}: use local or ray")
    if bar is not None:
        bar.close()
    return finalize(out, units, settings, sources, engine, time.perf_counter() - t0)


def finalize(out: Path, units: list[Unit], settings: MiningSettings, source: dict, engine: str,
             seconds: float) -> dict:
    """Manifest from the per-unit stats, in unit order (identical however the units were run). The
    stats files are read :data:`FINALIZE_THREADS` at a time: 50k of them on a shared filesystem are
    latency-bound reads, ~40 min one by one at 50 ms."""
    def read(u: Unit) -> dict:
        stats_file = unit_files(out, u)[1]
        try:
            r = json.loads(stats_file.read_text())
        except FileNotFoundError:
            raise RuntimeError(f"unit {u.index} has no stats file {stats_file}: rerun the same command") from None
        if "bytes" not in r:   # stats written before shard sizes were recorded
            r["bytes"] = os.path.getsize(out / r["shard"])
        return r

    with concurrent.futures.ThreadPoolExecutor(FINALIZE_THREADS) as pool:
        results = list(pool.map(read, units))
    totals = records.RegionCounts(images=sum(r["images"] for r in results),
                                  objects=sum(r["objects"] for r in results),
                                  texts=sum(r["texts"] for r in results))
    stats = ImportStats()
    timing = collections.Counter()
    for r in results:
        stats.update(r["stats"])
        timing.update(r["timing"])
    damaged = [{"unit": r["unit"], "source": r["source"], **r["damaged"]} for r in results if "damaged" in r]
    extra = {"source": {"mined": source},
             "import": dict(sorted(stats.items())),
             "mining": {"settings": dataclasses.asdict(settings), "units": len(units), "paper_settings": PAPER,
                        "damaged_units": damaged}}
    if (out / records.MANIFEST).exists():
        prev = records.read_manifest(out)
        stale = [k for k in ("tokenizer", "num_clusters") if prev.get(k)]
        if stale and prev.get("shards") != [r["shard"] for r in results]:
            print(f"[mine] the dataset grew: its {' and '.join(stale)} covered the old shards only and were "
                  "dropped; rerun the tokenizer and the clustering", flush=True)
        elif stale:
            extra.update({k: prev[k] for k in prev if k not in extra and k not in (
                "shards", "shard_counts", "num_images", "num_object_regions", "num_text_regions")})
    manifest = records.make_manifest([r["shard"] for r in results], [r["images"] for r in results], totals, extra,
                                     shard_bytes=[r["bytes"] for r in results])
    records.write_manifest(out, manifest)
    storage.write_text_atomic(out / MINING_DIR / "timing.json", json.dumps(
        {"engine": engine, "wall_s": round(seconds, 3), "unit_seconds": {k: round(v, 3) for k, v in timing.items()}},
        indent=1) + "\n")
    print(f"[mine] wrote {totals.images} images, {totals.objects} object and {totals.texts} text regions "
          f"to {out}; {stats.summary()}", flush=True)
    if damaged:
        print(f"[mine] {len(damaged)} damaged tar(s), kept up to the damage (first: {damaged[0]['source']}: "
              f"{damaged[0]['reason']}); a rerun mines a damaged tar again once its size changes", flush=True)
    seen, small = stats.get("images_seen", 0), stats.get("skipped_small_image", 0)
    if seen and small > seen / 2:
        print(f"[mine] {small} of {seen} images are below --min-image-short-edge {settings.min_image_short_edge}: "
              "web-dataset tars from img2dataset's default (256 px) fail the paper's 336 px filter; download with "
              "--resize_mode no (or --image_size 512 --resize_mode keep_ratio_largest) --min_image_size 336",
              flush=True)
    return manifest


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output dataset folder (local or a gcsfuse mount)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--images", help="folder of images (searched recursively; listed once into the output)")
    src.add_argument("--image-list", help="text file of image paths, one per line (relative to its folder, absolute "
                                          "or gs://): for 10^7+ images, never listed whole by one process")
    src.add_argument("--records", help="an existing region dataset (e.g. a COCO import): mine its images")
    src.add_argument("--tar", help="web-dataset tar shards: 'shards/{000..099}.tar', '/abs/*.tar', 'gs://b/*.tar'")
    ap.add_argument("--sa1b", help="SA-1B tars ('sa1b/sa_{000000..000999}.tar'): their masks' boxes are the "
                                   "object regions (with --tar too: one dataset of both; --proposals then applies "
                                   "to the --tar images)")
    d = MiningSettings()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default",
                    help="paper: image short edge >= 336, box short edge >= 128, OCR confidence > 0.7, at most 5 "
                         "objects an image (flags given explicitly override it)")
    ap.add_argument("--proposals", default=None,
                    help=f"felzenszwalb[:scales=A+B+C,sigma=S,pairs=0|1,work=PX] | sam:DIR[,points=N,iou=T,"
                         f"stability=T,batch=N,device=auto|cpu|cuda] | none (default {d.proposals})")
    ap.add_argument("--ocr", default=None, help=f"rapidocr[:side=N] | paddle-json:PATH | none (default {d.ocr})")
    ap.add_argument("--min-image-short-edge", type=int, default=None,
                    help=f"skip smaller images (default {d.min_image_short_edge}; paper {PAPER['min_image_short_edge']})")
    ap.add_argument("--min-box-short-edge", type=float, default=None,
                    help=f"drop smaller object regions (default {d.min_box_short_edge:g}; paper "
                         f"{PAPER['min_box_short_edge']})")
    ap.add_argument("--max-proposals", type=int, default=None,
                    help=f"object regions per image (default {d.max_proposals}; paper {PAPER['max_proposals']})")
    ap.add_argument("--nms-iou", type=float, default=None)
    ap.add_argument("--max-side", type=int, default=None,
                    help="store images whose longer side is above N re-encoded at N (JPEG q90, boxes scaled): "
                         "faster decoding in training; default 0 keeps the source bytes (docs/data.md)")
    ap.add_argument("--ocr-min-confidence", type=float, default=None)
    ap.add_argument("--drop-input-regions", action="store_true",
                    help="--records input: keep only the images, not their regions")
    ap.add_argument("--engine", choices=("local", "ray"), default="local")
    ap.add_argument("--workers", type=int, default=1, help="processes (local) or concurrent units (ray)")
    ap.add_argument("--images-per-unit", type=int, default=IMAGES_PER_UNIT,
                    help=f"--images / --image-list: images per output shard (default {IMAGES_PER_UNIT}: 400M images "
                         "make ~49k shards; fewer for a small job, so its workers share the units)")
    ap.add_argument("--forget-missing", action="store_true",
                    help="tars this run mined that the pattern no longer names leave the dataset")
    ap.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")
    ap.add_argument("--ray-gpus-per-unit", type=float, default=0.0)
    a = ap.parse_args(argv)
    if a.sa1b and not a.tar and a.proposals is not None:
        raise errors.InputError(f"--sa1b takes its object regions from the SA-1B annotations; drop --proposals "
                                f"{a.proposals}")
    settings = preset_settings(a.preset, proposals=a.proposals, ocr=a.ocr, min_image_short_edge=a.min_image_short_edge,
                               min_box_short_edge=a.min_box_short_edge, max_proposals=a.max_proposals,
                               nms_iou=a.nms_iou, ocr_min_confidence=a.ocr_min_confidence,
                               keep_input_regions=False if a.drop_input_regions else None, max_side=a.max_side)
    return mine(a.out, images=a.images, image_list=a.image_list, records_dir=a.records, tar=a.tar, sa1b=a.sa1b,
                settings=settings, engine=a.engine, workers=a.workers, images_per_unit=a.images_per_unit,
                ray_address=a.ray_address, ray_gpus_per_unit=a.ray_gpus_per_unit, forget_missing=a.forget_missing)


if __name__ == "__main__":
    cli.run(main)
