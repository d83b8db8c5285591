"""Where a downstream task's examples come from: one spec string, three kinds of examples.

Data specs (``--data``):

- ``synthetic:DIR`` -- a synthetic dataset (``python -m rice_jax.data.synthetic``); the task's
  ground truth is re-rendered from the generator (its manifest's seed), never stored. Split
  ``train`` = even image indices, ``test`` = odd ones (as :mod:`rice_jax.evaluate` splits).
- ``tfds:NAME[/CONFIG]`` -- a TFDS dataset prepared on this machine (``--tfds-data-dir`` or
  ``TFDS_DATA_DIR``), read by random access (``tfds.data_source``: ArrayRecord, no TensorFlow):
  ``ref_coco/refcoco_unc`` / ``refcocoplus_unc`` / ``refcocog_umd`` (referring),
  ``scene_parse150`` (semantic; the builder stores ADE20K's instance-challenge PNGs, whose first
  channel is the class index, 0 = "other", ignored as in the standard 150-class protocol),
  ``coco/2017`` (regions; TFDS's COCO builder itself imports TensorFlow -- without it, import
  COCO with ``python -m rice_jax.data.coco`` and use ``records:``).
- ``records:DIR`` -- region records with categories (a COCO import, or any other): regions only.

Three kinds of examples, each an iterator over one split's images (with ``limit``: its first
``limit`` images):

- referring: ``(PIL image, [(expression, mask [H, W] bool), ...])``
- semantic: ``(PIL image, labels [H, W] int, ignore = -1)``
- regions: ``(PIL image, boxes [n, 4] pixel xyxy, categories [n])``

Bad records (an image that does not decode, a mask of another size) are skipped and counted in
``source.skipped`` (reason -> count), which the task reports: a benchmark never dies on one
damaged example and never drops one silently.
"""
from __future__ import annotations

import collections
import os
from typing import Iterator

import numpy as np
from PIL import Image

from rice_jax import errors
from rice_jax.data import records, synthetic

KINDS = ("referring", "semantic", "regions")
TEXTURE_WORDS = {"solid": "plain", "stripes": "striped", "checker": "checkered"}
RELATIONS = ("left of", "right of", "above", "below")


def _relation(a, b, rel: str) -> bool:
    """Box ``a`` is ``rel`` box ``b`` (centres; the displacement's dominant axis decides)."""
    dx = (a[0] + a[2]) / 2 - (b[0] + b[2]) / 2
    dy = (a[1] + a[3]) / 2 - (b[1] + b[3]) / 2
    horizontal = abs(dx) > abs(dy)
    return {"left of": horizontal and dx < 0, "right of": horizontal and dx > 0,
            "above": not horizontal and dy < 0, "below": not horizontal and dy > 0}[rel]


def referring_expressions(boxes, kinds, texts, cats, rng: np.random.Generator, per_region: int = 2):
    """Unambiguous referring expressions for one synthetic image: ``[(region index, expression)]``.

    An object is named by its category ("the striped circle"), by its shape alone when no other
    object has that shape ("the circle"), or, when its category repeats, relative to an object that
    is uniquely named ("the plain square left of the cross") -- only where the relation holds for it
    and for no other object of its category. A word is "the word jax" when it appears once. Up to
    ``per_region`` expressions per region, drawn with ``rng`` (RefCOCO has ~3 per object).
    """
    objs = [k for k in range(len(kinds)) if kinds[k] == records.KIND_OBJECT and cats[k] >= 0]
    parts = {k: synthetic.CATEGORIES[cats[k]].split("/") for k in objs}
    cat_count = collections.Counter(cats[k] for k in objs)
    shape_count = collections.Counter(parts[k][0] for k in objs)
    unique_name = {}
    for k in objs:
        shape, texture = parts[k]
        if cat_count[cats[k]] == 1:
            unique_name[k] = [f"the {TEXTURE_WORDS[texture]} {shape}"] + (
                [f"the {shape}"] if shape_count[shape] == 1 else [])
    out = []
    for k in objs:
        shape, texture = parts[k]
        names = list(unique_name.get(k, []))
        same = [q for q in objs if q != k and cats[q] == cats[k]]
        for p in unique_name:
            if p == k:
                continue
            for rel in RELATIONS:
                if _relation(boxes[k], boxes[p], rel) and not any(_relation(boxes[q], boxes[p], rel) for q in same):
                    names.append(f"the {TEXTURE_WORDS[texture]} {shape} {rel} {unique_name[p][-1]}")
        for i in rng.permutation(len(names))[:per_region]:
            out.append((k, names[i]))
    words = collections.Counter(texts[k] for k in range(len(kinds)) if kinds[k] == records.KIND_TEXT)
    for k in range(len(kinds)):
        if kinds[k] == records.KIND_TEXT and words[texts[k]] == 1:
            out.append((k, f"the word {texts[k]}"))
    return out


def region_mask(sem: np.ndarray, box, kind: int, cat: int) -> np.ndarray:
    """The pixel mask of one synthetic region: an object's shape pixels inside its box (the semantic
    map where it shows the object's category), a word's box."""
    h, w = sem.shape
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    m = np.zeros((h, w), bool)
    if kind == records.KIND_OBJECT:
        m[y0:y1, x0:x1] = sem[y0:y1, x0:x1] == cat
    else:
        m[y0:y1, x0:x1] = True
    return m


class SyntheticSource:
    """Ground truth of a synthetic dataset, re-rendered from its generator."""

    num_classes = len(synthetic.CATEGORIES) + 1   # semantic: 0 = background, 1 + category
    class_names = ("background",) + synthetic.CATEGORIES

    def __init__(self, path: str):
        self.path = path
        self.manifest = records.read_manifest(path)
        if self.manifest.get("source") != "synthetic" or "seed" not in self.manifest:
            raise errors.InputError(f"synthetic:{path}: not a synthetic dataset (its manifest has no generator "
                                    "seed); build one with python -m rice_jax.data.synthetic")
        self.records = records.RecordSource(path)
        self.skipped = collections.Counter()
        self.splits = ("train", "test")

    def _images(self, split: str, limit: int | None):
        if split not in self.splits:
            raise errors.InputError(f"synthetic:{self.path} has splits {self.splits}, not {split!r}")
        want = 0 if split == "train" else 1
        n = 0
        for i in range(len(self.records)):
            rec = self.records[i]
            index = synthetic.image_index(rec.image_id)
            if index % 2 != want:
                continue
            if limit is not None and n >= limit:
                return
            n += 1
            yield index, synthetic.ground_truth(self.manifest, index)

    def examples(self, kind: str, split: str, limit: int | None = None) -> Iterator:
        for index, (img, boxes, kinds, texts, cats, sem) in self._images(split, limit):
            if kind == "referring":
                rng = np.random.default_rng([self.manifest["seed"], index, 7])
                exprs = referring_expressions(boxes, kinds, texts, cats, rng)
                if not exprs:
                    self.skipped["image_without_unambiguous_expression"] += 1
                    continue
                yield img, [(e, region_mask(sem, boxes[k], kinds[k], cats[k])) for k, e in exprs]
            elif kind == "semantic":
                yield img, sem + 1
            else:
                keep = [k for k in range(len(kinds)) if kinds[k] == records.KIND_OBJECT and cats[k] >= 0]
                yield img, boxes[keep], np.asarray([cats[k] for k in keep], np.int64)


class RecordsSource:
    """Region records with categories (e.g. a COCO import): region classification only. Split
    ``train`` = even record positions, ``test`` = odd ones."""

    splits = ("train", "test")

    def __init__(self, path: str):
        self.path = path
        self.records = records.RecordSource(path)
        self.manifest = records.read_manifest(path)
        self.class_names = tuple(self.manifest.get("categories") or ())
        self.skipped = collections.Counter()

    @property
    def num_classes(self) -> int:
        if self.class_names:
            return len(self.class_names)
        return int(max((self.records[i].category.max(initial=-1) for i in range(len(self.records))), default=-1)) + 1

    def examples(self, kind: str, split: str, limit: int | None = None) -> Iterator:
        if kind != "regions":
            raise errors.InputError(f"records:{self.path}: records hold boxes and categories; only region "
                                    f"classification reads them (not {kind})")
        from rice_jax.data import pipeline

        n = 0
        for i in range(0 if split == "train" else 1, len(self.records), 2):
            if limit is not None and n >= limit:
                return
            rec = self.records[i]
            img = pipeline.decode_image(rec)
            if img is None:
                self.skipped["image_does_not_decode"] += 1
                continue
            keep = (rec.kind == records.KIND_OBJECT) & (rec.category >= 0)
            if not keep.any():
                self.skipped["image_without_categorised_object"] += 1
                continue
            boxes = rec.boxes[keep] * np.array([img.width / rec.width, img.height / rec.height] * 2, np.float32)
            n += 1
            yield img, boxes, rec.category[keep].astype(np.int64)


class TFDSSource:
    """A TFDS dataset by random access (``tfds.data_source``)."""

    SPLITS = {"ref_coco/refcoco_unc": ("train", "validation", "testA", "testB"),
              "ref_coco/refcocoplus_unc": ("train", "validation", "testA", "testB"),
              "ref_coco/refcocog_umd": ("train", "validation", "test"),
              "ref_coco/refcoco_google": ("train", "validation", "test"),
              "ref_coco/refcocog_google": ("train", "validation"),
              "scene_parse150": ("train", "test"), "coco/2017": ("train", "validation")}
    KIND = {"ref_coco": "referring", "scene_parse150": "semantic", "coco": "regions"}

    def __init__(self, name: str, data_dir: str | None = None):
        self.name = name
        self.family = name.split("/")[0]
        if self.family not in self.KIND:
            raise errors.InputError(f"tfds:{name}: downstream tasks read {sorted(self.KIND)} (got {self.family})")
        self.data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
        self.splits = self.SPLITS.get(name, ("train", "validation"))
        self.num_classes = {"scene_parse150": 150, "coco": 80}.get(self.family, 0)
        self.class_names = ()
        self.skipped = collections.Counter()
        self._sources = {}

    def _source(self, split: str):
        if split not in self._sources:
            import tensorflow_datasets as tfds

            try:
                self._sources[split] = tfds.data_source(self.name, split=split, data_dir=self.data_dir,
                                                        download=False)
            except Exception as e:  # noqa: BLE001 - the one-line answer a user needs
                raise errors.InputError(f"tfds:{self.name} split {split!r} is not readable in "
                                        f"{self.data_dir or '~/tensorflow_datasets'} ({type(e).__name__}: "
                                        f"{str(e).splitlines()[0][:200]}): prepare it with `tfds build {self.name} "
                                        "--file_format=array_record` (random access needs ArrayRecord; manual "
                                        "downloads: see the TFDS catalogue)") from e
        return self._sources[split]

    def examples(self, kind: str, split: str, limit: int | None = None) -> Iterator:
        if kind != self.KIND[self.family]:
            raise errors.InputError(f"tfds:{self.name} holds {self.KIND[self.family]} examples, not {kind}")
        src = self._source(split)
        n = len(src) if limit is None else min(limit, len(src))
        for i in range(n):
            try:
                ex = src[i]
                img = Image.fromarray(np.asarray(ex["image"], np.uint8)).convert("RGB")
            except Exception:  # noqa: BLE001 - one damaged example must not end a benchmark
                self.skipped["example_does_not_decode"] += 1
                continue
            got = getattr(self, f"_{kind}")(ex, img)
            if got is not None:
                yield (img,) + got

    def _referring(self, ex, img):
        obj = ex["objects"]
        refexp = obj["refexp"]["raw"]
        masks = obj["mask"]
        out = []
        for k in range(min(len(masks), len(refexp))):
            m = np.asarray(masks[k])
            m = m[..., 0] if m.ndim == 3 else m
            if m.shape != (img.height, img.width):   # a mask must cover its image exactly
                self.skipped["mask_size_differs_from_image"] += 1
                continue
            for e in np.atleast_1d(refexp[k]):
                e = e.decode() if isinstance(e, bytes) else str(e)
                if e.strip():
                    out.append((e, m > 0))
                else:
                    self.skipped["empty_expression"] += 1
        if not out:
            self.skipped["image_without_expression"] += 1
            return None
        return (out,)

    def _semantic(self, ex, img):
        a = np.asarray(ex["annotation"])
        a = a[..., 0] if a.ndim == 3 else a
        if a.shape != (img.height, img.width):
            self.skipped["annotation_size_differs_from_image"] += 1
            return None
        lab = a.astype(np.int64) - 1                  # 0 ("other") -> -1 ignored; classes 1..150 -> 0..149
        lab[lab >= self.num_classes] = -1
        return (lab,)

    def _regions(self, ex, img):
        obj = ex["objects"]
        bbox, label = np.asarray(obj["bbox"], np.float32).reshape(-1, 4), np.asarray(obj["label"], np.int64)
        crowd = np.asarray(obj.get("is_crowd", np.zeros(len(label), bool)), bool)
        n = min(len(bbox), len(label), len(crowd))
        keep = ~crowd[:n] & (label[:n] >= 0) & (label[:n] < self.num_classes)
        if not keep.any():
            self.skipped["image_without_object"] += 1
            return None
        ymin, xmin, ymax, xmax = bbox[:n][keep].T             # TFDS BBox: normalised (ymin, xmin, ymax, xmax)
        boxes = np.stack([xmin * img.width, ymin * img.height, xmax * img.width, ymax * img.height], 1)
        return boxes, label[:n][keep]


def open_source(spec: str, tfds_data_dir: str | None = None):
    scheme, _, where = spec.partition(":")
    if scheme == "synthetic" and where:
        return SyntheticSource(where)
    if scheme == "records" and where:
        return RecordsSource(where)
    if scheme == "tfds" and where:
        return TFDSSource(where, tfds_data_dir)
    raise errors.InputError(f"--data {spec!r}: use synthetic:DIR, records:DIR or tfds:NAME[/CONFIG]")

