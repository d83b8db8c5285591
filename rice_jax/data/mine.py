"""Region mining: raw images -> a region dataset (object proposals + OCR transcripts).

    python -m rice_jax.data.mine --out DATA --images DIR            [--proposals P --ocr O ...]
    python -m rice_jax.data.mine --out DATA --records DATASET --proposals none --ocr rapidocr
    python -m rice_jax.data.mine --out DATA --tar 'shards/{000..099}.tar' --engine ray

The output is the importers' format (``records.py``: ArrayRecord shards + a
manifest), so tokenizer, clustering, pipeline and training consume it
unchanged; the manifest's ``mining`` entry records how it was mined (proposer,
OCR engine, every threshold) and what was skipped and why.

Work is split into input units (``--images-per-unit`` files of a folder, one
shard of an input dataset, one tar file). Each unit becomes one output shard,
written atomically (temporary name + rename) together with its own stats file
under ``DATA/mining/``; a unit whose stats file exists is done. Re-running the
same command therefore skips finished units: a crash or ``kill -9`` loses at
most the units in flight, and the result equals an uninterrupted run (each unit
depends only on its inputs and the settings; ``mining/plan.json`` refuses a
rerun with other inputs or settings). The manifest is written last, once every
unit is done.

Engines run the same per-unit function (:func:`mine_unit`):

- ``local`` — in this process (``--workers 1``) or a pool of ``--workers``
  processes (spawned, each with its own proposer/OCR models);
- ``ray`` — Ray Data (``ray.data.from_items(units).map(...)``) on a local Ray
  instance or an existing cluster (``--ray-address``), for when mining outgrows one
  machine; ``--ray-gpus-per-unit`` schedules SAM units on GPUs. The output folder
  must then be on a filesystem every node shares. Chosen over Apache Beam because it
  installs with this project's pins (Beam 2.77 needs pillow < 13 and protobuf < 7);
  see ``docs/design.md`` ("Region mining").

Bad images are skipped and counted (corrupt files, images whose short edge is
below ``--min-image-short-edge``, images with no region), as the importers do.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import tarfile
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from rice_jax import cli, errors, storage
from rice_jax.data import ocr, proposals, records
from rice_jax.data.coco import IMAGE_EXTS, ImportStats, open_image

MINING_DIR = "mining"
PLAN = "plan.json"
PAPER = {"min_image_short_edge": 336, "min_box_short_edge": 128, "ocr_min_confidence": 0.7}


@dataclasses.dataclass(frozen=True)
class MiningSettings:
    """Everything that decides the mined regions (stored in the manifest and the plan)."""
    proposals: str = "felzenszwalb"      # felzenszwalb[:opts] | sam:DIR[,opts] | none
    ocr: str = "rapidocr"                # rapidocr[:side=N] | paddle-json:PATH | none
    min_image_short_edge: int = 0        # skip smaller images (paper: 336)
    min_box_short_edge: float = 0.0      # drop smaller object proposals (paper: 128)
    max_proposals: int = 16              # object proposals kept per image (after NMS)
    nms_iou: float = 0.7
    ocr_min_confidence: float = PAPER["ocr_min_confidence"]
    keep_input_regions: bool = True      # --records input: keep its regions next to the mined ones


@dataclasses.dataclass(frozen=True)
class Unit:
    """One input unit -> one output shard."""
    index: int
    kind: str                            # "images" | "records" | "tar"
    sources: tuple[str, ...]             # image files | one dataset shard | one tar file
    root: str = ""                       # images: the folder keys are relative to


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


def plan_units(*, images: Optional[str] = None, records_dir: Optional[str] = None, tar: Optional[str] = None,
               images_per_unit: int = 256) -> list[Unit]:
    """The input split into units, in a deterministic order."""
    if sum(x is not None for x in (images, records_dir, tar)) != 1:
        raise errors.InputError("give exactly one input: --images DIR, --records DATASET or --tar PATTERN")
    if images is not None:
        root = Path(images)
        if not root.is_dir():
            raise errors.MissingInput(f"--images {images}: not a folder")
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise errors.InputError(f"--images {images}: no image files ({', '.join(IMAGE_EXTS)}) found")
        return [Unit(i, "images", tuple(files[s:s + images_per_unit]), str(root.resolve()))
                for i, s in enumerate(range(0, len(files), images_per_unit))]
    if records_dir is not None:
        return [Unit(i, "records", (p,)) for i, p in enumerate(records.shard_paths(records_dir))]
    paths = [p for pat in expand_braces(tar) for p in (sorted(map(str, Path().glob(pat))) if any(
        c in pat for c in "*?[") else [pat])]
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise errors.MissingInput(f"--tar {tar}: {len(missing)} file(s) missing, first {missing[0]}")
    return [Unit(i, "tar", (str(Path(p).resolve()),)) for i, p in enumerate(paths)]


def _items(unit: Unit, stats: ImportStats) -> Iterator[tuple[str, bytes, Optional[records.RegionRecord]]]:
    """(key, encoded image, the input record or None) for every image of a unit."""
    if unit.kind == "images":
        for rel in unit.sources:
            p = Path(unit.root) / rel
            try:
                data = p.read_bytes()
            except OSError:
                stats["skipped_missing_file"] += 1
                continue
            yield rel, data, None
    elif unit.kind == "records":
        for rec in records.read_shard(unit.sources[0]):
            yield rec.image_id, rec.image, rec
    elif unit.kind == "tar":
        with tarfile.open(unit.sources[0]) as tf:
            for member in tf:
                if not member.isfile() or Path(member.name).suffix.lower() not in IMAGE_EXTS:
                    continue
                f = tf.extractfile(member)
                if f is None:
                    stats["skipped_unreadable_tar_member"] += 1
                    continue
                yield member.name, f.read(), None
    else:
        raise ValueError(f"unit {unit.index}: unknown kind {unit.kind!r}")


# ----------------------------------------------------------------------------- one unit
_MODELS: dict = {}


def _models(settings: MiningSettings, ocr_threads: int):
    """Proposer and OCR engine for ``settings``, built once per process (models are heavy)."""
    key = (settings, ocr_threads)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = (proposals.parse(settings.proposals, min_short_edge=settings.min_box_short_edge,
                                        max_per_image=settings.max_proposals, nms_iou=settings.nms_iou),
                        ocr.parse(settings.ocr, min_confidence=settings.ocr_min_confidence, threads=ocr_threads))
    return _MODELS[key]


def mine_image(key: str, data: bytes, base: Optional[records.RegionRecord], settings: MiningSettings,
               proposer, ocr_engine, stats: ImportStats, timing: collections.Counter):
    """One image -> its region record (or None, counted)."""
    im = open_image(data, key, stats)
    if im is None:
        return None
    w, h = im.width, im.height
    if min(w, h) < settings.min_image_short_edge:
        stats["skipped_small_image"] += 1
        return None
    rgb = np.asarray(im.convert("RGB"))
    t = time.perf_counter()
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
    return records.RegionRecord.new(data, fmt, h, w, key, np.concatenate(all_boxes), kind, text=words,
                                    category=np.concatenate(cats), cluster=cluster)


def unit_files(out: Path, unit: Unit, num_units: int) -> tuple[Path, Path]:
    return (out / records.shard_name("regions", unit.index, num_units),
            out / MINING_DIR / f"unit-{unit.index:05d}.json")


def mine_unit(unit: Unit, num_units: int, out: str, settings: MiningSettings, ocr_threads: int = 0) -> dict:
    """Mine one unit into its shard + stats file (both atomic); returns the stats."""
    out_path = Path(out)
    shard, stats_file = unit_files(out_path, unit, num_units)
    if stats_file.exists():
        return json.loads(stats_file.read_text())
    proposer, ocr_engine = _models(settings, ocr_threads)
    stats, timing = ImportStats(), collections.Counter()
    t0 = time.perf_counter()

    def recs():
        for key, data, base in _items(unit, stats):
            stats["images_seen"] += 1
            rec = mine_image(key, data, base, settings, proposer, ocr_engine, stats, timing)
            if rec is not None:
                yield rec

    counts = records.write_shard_atomic(recs(), shard)
    timing["total_s"] = time.perf_counter() - t0
    result = {"unit": unit.index, "shard": shard.name, "images": counts.images, "objects": counts.objects,
              "texts": counts.texts, "stats": dict(stats), "timing": {k: round(v, 3) for k, v in timing.items()},
              "pid": os.getpid()}
    storage.write_text_atomic(stats_file, json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


# ----------------------------------------------------------------------------- engines
def _run_local(pending: list[Unit], n: int, out: str, settings: MiningSettings, workers: int, progress):
    if workers <= 1:
        for u in pending:
            progress(mine_unit(u, n, out, settings))
        return
    import concurrent.futures
    import multiprocessing

    # Spawned workers: forking a process that holds ONNX Runtime / torch thread pools can deadlock.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = [pool.submit(mine_unit, u, n, out, settings, 1) for u in pending]
        for f in concurrent.futures.as_completed(futures):
            progress(f.result())


def _run_ray(pending: list[Unit], n: int, out: str, settings: MiningSettings, *, address: Optional[str],
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
            u = json.loads(row["unit"])
            u = Unit(u["index"], u["kind"], tuple(u["sources"]), u["root"])
            return {"result": json.dumps(mine_unit(u, n, out, settings, 1))}

        ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
        ds = ds.map(task, num_cpus=1, num_gpus=gpus_per_unit or None,
                    concurrency=max(1, workers) if not address else None)
        for row in ds.iter_rows():
            progress(json.loads(row["result"]))
    finally:
        if started:
            ray.shutdown()


# ----------------------------------------------------------------------------- driver
def _check_plan(out: Path, units: list[Unit], settings: MiningSettings, source: dict) -> None:
    plan = {"settings": dataclasses.asdict(settings), "units": [dataclasses.asdict(u) for u in units],
            "source": source}
    path = out / MINING_DIR / PLAN
    if path.exists():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(plan)):
            what = [k for k in ("settings", "units", "source") if old.get(k) != json.loads(json.dumps(plan))[k]]
            raise errors.InputError(f"{out} holds a mining run with different {' and '.join(what)}: use a new --out, "
                             f"or delete {out} to start over")
        return
    if (out / records.MANIFEST).exists():
        raise errors.InputError(f"{out} already holds a dataset that was not mined by this command: use a new --out")
    (out / MINING_DIR).mkdir(parents=True, exist_ok=True)
    storage.write_text_atomic(path, json.dumps(plan, indent=1, sort_keys=True) + "\n")


def mine(out: str, *, images: Optional[str] = None, records_dir: Optional[str] = None, tar: Optional[str] = None,
         settings: MiningSettings = MiningSettings(), engine: str = "local", workers: int = 1,
         images_per_unit: int = 256, ray_address: Optional[str] = None, ray_gpus_per_unit: float = 0.0,
         show_progress: bool = True) -> dict:
    """Mine every unit not yet done, then write the manifest; returns it."""
    out = Path(storage.require_local(out, "--out", "mine to a local (or gcsfuse-mounted) folder, then copy"))
    source = {"images": images, "records": records_dir, "tar": tar}
    units = plan_units(images=images, records_dir=records_dir, tar=tar, images_per_unit=images_per_unit)
    out.mkdir(parents=True, exist_ok=True)
    _check_plan(out, units, settings, {k: v for k, v in source.items() if v is not None})
    n = len(units)
    pending = [u for u in units if not unit_files(out, u, n)[1].exists()]
    # Partial shards of units that were in flight when an earlier run died: never published
    # (no stats file), so removing them loses nothing.
    stale = [t for u in pending for t in out.glob(f".{unit_files(out, u, n)[0].name}.tmp-*")]
    for t in stale:
        t.unlink()
    print(f"[mine] {n} unit(s), {n - len(pending)} already done"
          f"{f' ({len(stale)} partial shard(s) of interrupted units removed)' if stale else ''}; proposals={settings.proposals} "
          f"ocr={settings.ocr} engine={engine} workers={workers}", flush=True)
    bar = None
    if show_progress and pending:
        from tqdm import tqdm

        bar = tqdm(total=len(pending), desc="mining units", unit="unit")

    def progress(result: dict) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(images=result["images"], objects=result["objects"], texts=result["texts"])

    t0 = time.perf_counter()
    if pending:
        _models(settings, 0)    # bad --proposals / --ocr values fail here once, not in every worker
    if engine == "local":
        _run_local(pending, n, str(out), settings, workers, progress)
    elif engine == "ray":
        _run_ray(pending, n, str(out), settings, address=ray_address, workers=workers,
                 gpus_per_unit=ray_gpus_per_unit, progress=progress)
    else:
        raise errors.InputError(f"--engine {engine!r}: use local or ray")
    if bar is not None:
        bar.close()
    return finalize(out, units, settings, source, engine, time.perf_counter() - t0)


def finalize(out: Path, units: list[Unit], settings: MiningSettings, source: dict, engine: str,
             seconds: float) -> dict:
    """Manifest from the per-unit stats, in unit order (identical however the units were run)."""
    n = len(units)
    results = []
    for u in units:
        stats_file = unit_files(out, u, n)[1]
        if not stats_file.exists():
            raise RuntimeError(f"unit {u.index} has no stats file {stats_file}: rerun the same command")
        results.append(json.loads(stats_file.read_text()))
    totals = records.RegionCounts(images=sum(r["images"] for r in results),
                                  objects=sum(r["objects"] for r in results),
                                  texts=sum(r["texts"] for r in results))
    stats = ImportStats()
    timing = collections.Counter()
    for r in results:
        stats.update(r["stats"])
        timing.update(r["timing"])
    extra = {"source": {"mined": {k: v for k, v in source.items() if v is not None}},
             "import": dict(sorted(stats.items())),
             "mining": {"settings": dataclasses.asdict(settings), "units": n, "paper_settings": PAPER}}
    manifest = records.make_manifest([r["shard"] for r in results], [r["images"] for r in results], totals, extra)
    records.write_manifest(out, manifest)
    storage.write_text_atomic(out / MINING_DIR / "timing.json", json.dumps(
        {"engine": engine, "wall_s": round(seconds, 3), "unit_seconds": {k: round(v, 3) for k, v in timing.items()}},
        indent=1) + "\n")
    print(f"[mine] wrote {totals.images} images, {totals.objects} object and {totals.texts} text regions "
          f"to {out}; {stats.summary()}", flush=True)
    return manifest


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output dataset folder (local or a gcsfuse mount)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images (searched recursively)")
    src.add_argument("--records", help="an existing region dataset (e.g. a COCO import): mine its images")
    src.add_argument("--tar", help="tar shards, e.g. 'shards/{000..099}.tar' (webdataset layout)")
    d = MiningSettings()
    ap.add_argument("--proposals", default=d.proposals,
                    help="felzenszwalb[:scales=A+B+C,sigma=S,pairs=0|1,work=PX] | sam:DIR[,points=N,iou=T,"
                         "stability=T] | none")
    ap.add_argument("--ocr", default=d.ocr, help="rapidocr[:side=N] | paddle-json:PATH | none")
    ap.add_argument("--min-image-short-edge", type=int, default=d.min_image_short_edge,
                    help=f"skip smaller images (paper: {PAPER['min_image_short_edge']})")
    ap.add_argument("--min-box-short-edge", type=float, default=d.min_box_short_edge,
                    help=f"drop smaller object proposals (paper: {PAPER['min_box_short_edge']})")
    ap.add_argument("--max-proposals", type=int, default=d.max_proposals, help="object proposals per image")
    ap.add_argument("--nms-iou", type=float, default=d.nms_iou)
    ap.add_argument("--ocr-min-confidence", type=float, default=d.ocr_min_confidence)
    ap.add_argument("--drop-input-regions", action="store_true",
                    help="--records input: keep only the images, not their regions")
    ap.add_argument("--engine", choices=("local", "ray"), default="local")
    ap.add_argument("--workers", type=int, default=1, help="processes (local) or concurrent units (ray)")
    ap.add_argument("--images-per-unit", type=int, default=256, help="--images input: images per output shard")
    ap.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")
    ap.add_argument("--ray-gpus-per-unit", type=float, default=0.0)
    a = ap.parse_args(argv)
    settings = MiningSettings(proposals=a.proposals, ocr=a.ocr, min_image_short_edge=a.min_image_short_edge,
                              min_box_short_edge=a.min_box_short_edge, max_proposals=a.max_proposals,
                              nms_iou=a.nms_iou, ocr_min_confidence=a.ocr_min_confidence,
                              keep_input_regions=not a.drop_input_regions)
    return mine(a.out, images=a.images, records_dir=a.records, tar=a.tar, settings=settings, engine=a.engine,
         workers=a.workers, images_per_unit=a.images_per_unit, ray_address=a.ray_address,
         ray_gpus_per_unit=a.ray_gpus_per_unit)


if __name__ == "__main__":
    cli.run(main)
