"""TFDS builder over a local COCO-format region source (manual download, no network).

Manual dir layout (one split per instances file)::

    MANUAL_DIR/annotations/instances_<split>.json   COCO instances
    MANUAL_DIR/annotations/ocr_<split>.json         optional OCR json (see data/coco.py)
    MANUAL_DIR/<split>/...                          images, paths as in file_name

Usage::

    builder = RiceRegions(data_dir=DATA_DIR, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=MANUAL_DIR))
    source = builder.as_data_source(split="train")      # random access, Grain-compatible

Features use plain tensors (encoded image bytes, xyxy pixel boxes), so building
and reading need no TensorFlow. The same cleaning rules and counters as the
COCO importer apply (data/coco.py); :func:`to_records` turns a prepared split
into rice_jax region records for the Grain pipeline.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from rice_jax import errors
from rice_jax.data import coco, records


class RiceRegions(tfds.core.GeneratorBasedBuilder):
    """Images with object boxes (+ OCR text boxes) from a local COCO-format source."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place annotations/instances_<split>.json (COCO format), optional annotations/ocr_<split>.json "
        "and the images under <split>/ in the manual dir.")

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),      # encoded bytes as found
                "image_format": tfds.features.Tensor(shape=(), dtype=np.object_),
                "image_id": tfds.features.Tensor(shape=(), dtype=np.object_),
                "height": np.int32,
                "width": np.int32,
                "regions": tfds.features.Sequence({
                    "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),  # xyxy pixels
                    "kind": np.int32,
                    "text": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "category": np.int32,
                }),
            }),
            description=__doc__)

    def _split_generators(self, dl_manager):
        manual = Path(dl_manager.manual_dir)
        splits = sorted(p.stem[len("instances_"):] for p in (manual / "annotations").glob("instances_*.json"))
        if not splits:
            raise errors.MissingInput(f"{manual}/annotations/instances_<split>.json not found. "
                                    + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        return {s: self._generate_examples(manual, s) for s in splits}

    def _generate_examples(self, manual: Path, split: str):
        ocr = manual / "annotations" / f"ocr_{split}.json"
        stats = coco.ImportStats()
        for rec in coco.iter_coco(manual / "annotations" / f"instances_{split}.json", manual / split,
                                  ocr=ocr if ocr.exists() else None, stats=stats):
            yield rec.image_id, {
                "image": rec.image, "image_format": rec.format, "image_id": rec.image_id,
                "height": rec.height, "width": rec.width,
                "regions": {"bbox": rec.boxes, "kind": rec.kind.astype(np.int32), "text": rec.text,
                            "category": rec.category},
            }
        print(f"[rice_regions/{split}] import summary: {stats.summary()}")


def _str(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def to_records(source) -> list[records.RegionRecord]:
    """A prepared split (``builder.as_data_source(split)``) as region records."""
    out = []
    for ex in source:
        r = ex["regions"]
        out.append(records.RegionRecord.new(
            bytes(ex["image"]), _str(ex["image_format"]), int(ex["height"]), int(ex["width"]), _str(ex["image_id"]),
            np.asarray(r["bbox"], np.float32).reshape(-1, 4), np.asarray(r["kind"]), text=[_str(t) for t in r["text"]],
            category=np.asarray(r["category"])))
    return out
