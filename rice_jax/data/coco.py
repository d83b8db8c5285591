"""Importers: COCO-format instances JSON (+ OCR JSON) or a plain image folder -> region records.

Bad input never crashes an import: every image or box that cannot be used is
skipped (or repaired) and counted per reason; the summary is printed and
stored in the manifest under ``"import"``.

OCR JSON format: ``{image key: [{"bbox": [x, y, w, h], "text": str}, ...]}``
where the key is the COCO image id (as a string) or its ``file_name``.

    python -m rice_jax.data.coco --instances ann.json --images DIR [--ocr ocr.json] --out OUT
    python -m rice_jax.data.coco --folder DIR --out OUT          # whole image = one region
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import math
import os
from pathlib import Path
from typing import Iterator, Optional

from PIL import Image

from rice_jax import cli
from rice_jax.data import records

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImportStats(collections.Counter):
    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.items())) or "nothing"


def open_image(data: bytes, name: str, stats: ImportStats) -> Optional[Image.Image]:
    """The fully decoded image (format kept in ``.format``), or None (counted) when corrupt.

    A full decode, not just the header: truncated files often fail only when their pixels
    are read."""
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception:  # noqa: BLE001 - any decoder failure means a corrupt image
        stats["skipped_corrupt_image"] += 1
        return None
    if not im.format:
        im.format = Path(name).suffix.lstrip(".").upper() or "PNG"
    return im


def _read_image(path: Path, stats: ImportStats) -> Optional[tuple[bytes, str, int, int]]:
    """Bytes as found + format + decoded size, or None (counted) when missing or corrupt."""
    if not path.exists():
        stats["skipped_missing_file"] += 1
        return None
    data = path.read_bytes()
    im = open_image(data, path.name, stats)
    if im is None:
        return None
    return data, im.format.lower(), im.height, im.width


def clean_box_xywh(bbox, width: int, height: int, min_short_edge: float, stats: ImportStats, what: str):
    """xywh -> clipped xyxy, or None (counted) for NaN, empty/inverted, outside or too small boxes."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        stats[f"dropped_{what}_malformed_box"] += 1
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        stats[f"dropped_{what}_nan_box"] += 1
        return None
    if w <= 0 or h <= 0:
        stats[f"dropped_{what}_empty_or_inverted_box"] += 1
        return None
    x0, y0, x1, y1 = x, y, x + w, y + h
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if cx1 <= cx0 or cy1 <= cy0:
        stats[f"dropped_{what}_box_outside_image"] += 1
        return None
    if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
        stats[f"clipped_{what}_box"] += 1
    if min(cx1 - cx0, cy1 - cy0) < min_short_edge:
        stats[f"dropped_{what}_small_box"] += 1
        return None
    return [cx0, cy0, cx1, cy1]


def iter_coco(instances: str | os.PathLike, image_dir: str | os.PathLike, *, ocr: str | os.PathLike | None = None,
              min_short_edge: float = 0.0, stats: ImportStats | None = None) -> Iterator[records.RegionRecord]:
    stats = stats if stats is not None else ImportStats()
    coco = json.loads(Path(instances).read_text())
    ocr_map = json.loads(Path(ocr).read_text()) if ocr else {}
    cat_ids = sorted(c["id"] for c in coco.get("categories", []))
    cat_index = {c: i for i, c in enumerate(cat_ids)}
    by_image = collections.defaultdict(list)
    for a in coco.get("annotations", []):
        by_image[a.get("image_id")].append(a)
    known = {info.get("id") for info in coco.get("images", [])}
    orphans = sum(len(v) for k, v in by_image.items() if k not in known)
    if orphans:  # annotations whose image_id names no image: nothing to attach them to, so count them
        stats["dropped_object_unknown_image"] += orphans
    image_dir = Path(image_dir)
    ocr_orphans = set(map(str, ocr_map)) - {str(i) for i in known} - {str(info.get("file_name")) for info in
                                                                       coco.get("images", [])}
    if ocr_orphans:
        stats["dropped_text_unknown_image"] += sum(len(ocr_map[k]) for k in ocr_orphans)
    for info in coco.get("images", []):
        stats["images_seen"] += 1
        got = _read_image(image_dir / info["file_name"], stats)
        if got is None:
            continue
        data, fmt, h, w = got
        if (info.get("height"), info.get("width")) not in ((h, w), (None, None)):
            stats["size_mismatch_json_vs_file"] += 1  # trust the decoded file
        boxes, kinds, texts, cats = [], [], [], []
        for a in by_image.get(info["id"], []):
            if a.get("iscrowd", 0):
                stats["dropped_object_crowd"] += 1
                continue
            b = clean_box_xywh(a.get("bbox"), w, h, min_short_edge, stats, "object")
            if b is not None:
                boxes.append(b), kinds.append(records.KIND_OBJECT), texts.append("")
                cats.append(cat_index.get(a.get("category_id"), -1))
        for t in ocr_map.get(str(info["id"]), ocr_map.get(info["file_name"], [])):
            text = str(t.get("text") or "").strip()
            if not text:
                stats["dropped_text_empty_transcript"] += 1
                continue
            b = clean_box_xywh(t.get("bbox"), w, h, 0.0, stats, "text")
            if b is not None:
                boxes.append(b), kinds.append(records.KIND_TEXT), texts.append(text), cats.append(-1)
        if not boxes:
            stats["skipped_no_usable_region"] += 1
            continue
        stats["images_written"] += 1
        stats["regions_written"] += len(boxes)
        yield records.RegionRecord.new(data, fmt, h, w, str(info["id"]), boxes, kinds, text=texts, category=cats)


def iter_folder(folder: str | os.PathLike, stats: ImportStats | None = None) -> Iterator[records.RegionRecord]:
    """Every image in ``folder`` (recursive) as one whole-image object region."""
    stats = stats if stats is not None else ImportStats()
    folder = Path(folder)
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
        stats["images_seen"] += 1
        got = _read_image(path, stats)
        if got is None:
            continue
        data, fmt, h, w = got
        stats["images_written"] += 1
        stats["regions_written"] += 1
        yield records.RegionRecord.new(data, fmt, h, w, str(path.relative_to(folder)), [[0, 0, w, h]], [0])


def import_to_records(it, out: str | os.PathLike, stats: ImportStats, num_shards: int, source: dict) -> dict:
    manifest = records.write_records(it, out, num_shards=num_shards, manifest_extra={"source": source})
    manifest["import"] = dict(stats)
    records.write_manifest(out, manifest)
    print(f"import summary: {stats.summary()}")
    return manifest


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances")
    ap.add_argument("--images")
    ap.add_argument("--ocr")
    ap.add_argument("--folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--min-short-edge", type=float, default=0.0, help="drop object boxes whose short edge is smaller (px); paper: 128")
    ap.add_argument("--num-shards", type=int, default=4)
    a = ap.parse_args(argv)
    stats = ImportStats()
    if a.folder:
        it, source = iter_folder(a.folder, stats), {"folder": a.folder}
    elif a.instances and a.images:
        it = iter_coco(a.instances, a.images, ocr=a.ocr, min_short_edge=a.min_short_edge, stats=stats)
        source = {"coco_instances": a.instances, "images": a.images, "ocr": a.ocr, "min_short_edge": a.min_short_edge}
    else:
        ap.error("give --folder, or --instances and --images")
    import_to_records(it, a.out, stats, a.num_shards, source)


if __name__ == "__main__":
    cli.run(main)
