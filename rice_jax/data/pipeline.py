"""Grain input pipeline: ArrayRecord region records -> fixed-shape batches (docs/design.md §3).

    source -> seed -> shuffle (reshuffled each epoch) -> repeat
      -> random_map(decode, crop/resize with boxes, sample N regions, labels) -> process slice
      -> read by threads, one example each -> batch
         (with data.workers > 0: in each Grain worker process, on its slice, into worker batches
          that this process joins into one batch)

Every random choice comes from Grain's per-index RNG, so a batch depends only
on (seed, step): saving the iterator state and restoring it replays the exact
same subsequent batches. Bad images are not dropped silently: the example
keeps its slot with ``image_ok=False`` and no valid region (the loss ignores
it) and the train loop counts it as a skipped record.

Output per batch: the batch contract of :mod:`rice_jax.batch` (training keys plus the
bookkeeping keys ``category``, ``region_index``, ``image_index``, ``image_id``).
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Optional

import numpy as np
from PIL import Image

from rice_jax import batch, errors
from rice_jax.data import labels as labels_store
from rice_jax.data import records
from rice_jax.data.tokenizer import for_dataset

CLIP_MEAN, CLIP_STD = batch.CLIP_MEAN, batch.CLIP_STD   # the statistics the step normalises with


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything the input pipeline needs. A training config's ``c.data`` section is these fields
    (except :data:`PER_STAGE_FIELDS`, which the train loop sets per stage) plus ``dir``."""
    image_size: int = 224
    num_regions: int = 10            # N
    max_labels: int = 10             # M (token ids per OCR region)
    text_fraction: float = 0.5       # at most this share of the N slots go to text regions
    fill: str = "pad"                # "pad" (region_valid=False) or "resample" (with replacement)
    random_crop: bool = True         # random resized crop (training) or plain resize (evaluation)
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    min_box_size: float = 4.0        # output pixels: smaller boxes are dropped after the crop
    min_box_visible: float = 0.5     # keep a box only if this share of its area survives the crop
    batch_size: int = 32             # per process
    seed: int = 0
    shuffle: bool = True
    num_epochs: Optional[int] = None  # None = repeat forever
    workers: int | str = "auto"      # Grain worker processes: "auto" (auto_workers), 0 = read in this process
    threads: int = 2                 # reader threads per reading process; raise for high-latency storage
    #                                  (a bucket mount: each blocked read holds a thread). More threads than
    #                                  ~2 per core cost throughput on local disk (8 threads on 2 cores: -9 %).
    skip_damaged_shards: bool = False  # leave damaged shards out (counted) instead of stopping
    shard_check: str = "size"        # start-up check: "size" (a stat a shard, counts verified at first read)
    #                                  or "open" (open every shard; a wrong count can then be skipped too)
    jpeg_draft: bool = True          # decode JPEGs at 1/2-1/8 scale when the crop keeps >= S px (decode_image)

    def __post_init__(self):
        if self.num_regions < 1:
            raise errors.InputError(f"num_regions must be >= 1, got {self.num_regions}")
        if self.fill not in ("pad", "resample"):
            raise errors.InputError(f"fill must be 'pad' or 'resample', got {self.fill!r}")
        resolve_workers(self.workers)   # a wrong value fails here, in one line
        if self.threads < 1:
            raise errors.InputError(f"data.threads must be >= 1, got {self.threads}")


# Why processes on big hosts and threads on small ones (benchmarks/input_pipeline.py,
# docs/performance.md). One example holds Python's lock for a few percent of its time (2 threads of
# one process: 1.86-1.99x one thread): by Amdahl's law, T threads give 1 / (s + (1 - s) / T) cores at
# serial share s, which at s = 0.05 is 3.5 of 4 and only ~17 of 100. Worker processes have no shared
# lock, but each image is copied once more (into shared memory and out) and the trainer's process
# joins worker batches: on 2 cores 1-2 workers deliver 0.83-1.01x the threads' rate. Threads lose more than that
# from about four cores on (0.87 of 4 cores at s = 0.05), so from four cores the reading moves into
# worker processes, one per core but the trainer's.
MIN_CORES_FOR_WORKERS = 4
# More workers than this would decode ~10K img/s per host (>= 150 img/s per core at 336 px from
# 1024 x 768 JPEGs): 6x a v5p host's demand for l14 at 40 % MFU (~1,490 img/s) and 3x an 8-GPU node's;
# each worker also holds its own copy of the pipeline (~250 MiB RSS measured).
MAX_AUTO_WORKERS = 64


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or a job's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:      # macOS
        return os.cpu_count() or 1


def auto_workers(cores: Optional[int] = None) -> int:
    """``data.workers="auto"``: one worker process per usable core but one (left to the training
    process), at most :data:`MAX_AUTO_WORKERS`; 0 (threads in the training process) below
    :data:`MIN_CORES_FOR_WORKERS` cores."""
    cores = usable_cores() if cores is None else cores
    return 0 if cores < MIN_CORES_FOR_WORKERS else min(cores - 1, MAX_AUTO_WORKERS)


def resolve_workers(workers) -> int:
    """``data.workers`` as a number of Grain worker processes: "auto", an int, or an int as text."""
    if isinstance(workers, str) and workers.strip().lower() == "auto":
        return auto_workers()
    try:
        n = int(workers)
    except (TypeError, ValueError):
        n = -1
    if n < 0:
        raise errors.InputError(f"data.workers must be 'auto' or a number of worker processes "
                                f"(0 = read in the training process), got {workers!r}")
    return n


def worker_batch(batch_size: int, workers: int) -> int:
    """Examples per worker batch: the largest divisor of ``batch_size`` that is at most
    ``ceil(batch_size / workers)``, so ``workers`` workers together hold about one batch in flight
    (each builds its own; the training process concatenates them) instead of one batch each —
    at 4,096 images of 336 px per host that is 1.4 GB per worker otherwise."""
    if workers <= 1:
        return batch_size
    cap = -(-batch_size // workers)
    return max(d for d in range(1, cap + 1) if batch_size % d == 0)


def _concat(parts):
    """Worker batches -> one batch (the leading axis joined), key by key."""
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


PER_STAGE_FIELDS = ("image_size", "batch_size", "seed")


def config_from_section(data, **per_stage) -> PipelineConfig:
    """A training config's ``c.data`` section (its fields, plus ``dir``) with the per-stage fields (and
    any others) set: the one way the train loop and the pre-flight check build the pipeline's config."""
    return PipelineConfig(**{**{k: v for k, v in data.items() if k != "dir"}, **per_stage})


def decode_image(rec: records.RegionRecord, at_least=None) -> Optional[Image.Image]:
    """The record's image as RGB, or None when it does not decode (the caller counts or skips it).

    ``at_least (w, h)``: a JPEG may be decoded at 1/2, 1/4 or 1/8 of its size (DCT scaling, PIL's
    ``draft``) while the result stays at least that large; callers pass the size the part they
    will resize must keep. Measured on the photo records (``benchmarks.photos``), random crops
    to 224/336 px: 1.1-2.2x faster decoding, 0.2-0.4 mean absolute difference (of 255) after the
    resize against a full decode, p95 under 1.3 (docs/performance.md)."""
    return _decode(_open(rec), at_least)


def _open(rec: records.RegionRecord) -> Optional[Image.Image]:
    """The record's image with only its header read (size, format), or None when that is unreadable."""
    # The record names its format: asking PIL for that plugin first skips probing the others
    # (24 -> 16 us a header, measured); a record whose bytes are another format still opens.
    named = _PIL_FORMATS.get(rec.format.lower())
    for formats in ((named,), None) if named else (None,):
        try:
            return Image.open(io.BytesIO(rec.image), formats=formats)
        except Exception:  # noqa: BLE001 - a corrupt image must not kill a 400M-image run
            continue
    return None


_PIL_FORMATS = {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF"}


def _decode(img: Optional[Image.Image], at_least=None) -> Optional[Image.Image]:
    """Decode an opened image to RGB (:func:`decode_image`'s ``at_least``); None when it does not decode."""
    if img is None:
        return None
    try:
        if at_least is not None and img.format == "JPEG":
            img.draft("RGB", (max(1, int(np.ceil(at_least[0]))), max(1, int(np.ceil(at_least[1])))))
        img.load()
        # convert() is not free even for an RGB image: skipping it made decode + crop + resize of the
        # 640 x 480 photo records 1.41x faster with identical pixels (measured). Other modes (grey,
        # CMYK, palette, RGBA) are converted.
        return img if img.mode == "RGB" else img.convert("RGB")
    except Exception:  # noqa: BLE001 - counted or skipped by the caller
        return None


def image_input(img: Image.Image, size: int, crop=None) -> np.ndarray:
    """An RGB image (or its ``crop`` box, xyxy pixels) -> ``[size, size, 3]`` uint8, bicubic-resized:
    the one conversion of pixels into model input (training, evaluation, extraction). PIL resizes
    8-bit images in 8 bits, so this is exactly what the float path saw before normalising; the
    normalisation runs on the device (:func:`rice_jax.batch.model_pixels`)."""
    return np.asarray(img.resize((size, size), Image.BICUBIC, box=crop), np.uint8)


def box_input(rec: records.RegionRecord, decoded_size: tuple[int, int], crop) -> tuple[np.ndarray, np.ndarray]:
    """The record's pixel boxes -> clipped to ``crop`` and normalised to [0, 1] of it (model input), and
    the share of each box's area the crop keeps. Boxes are first scaled from the stored image size to
    the decoded one (they agree for valid records)."""
    w, h = decoded_size
    boxes = rec.boxes * np.array([w / rec.width, h / rec.height] * 2, np.float32)
    x0, y0, x1, y1 = crop
    lo, hi = np.array([x0, y0, x0, y0]), np.array([x1, y1, x1, y1])
    clipped = np.clip(boxes, lo, hi)                  # float64 from here on, rounded to float32 once at the end
    area = lambda b: np.maximum(b[:, 2:] - b[:, :2], 0).prod(1)
    kept = area(clipped) / np.maximum(area(boxes), 1e-9)
    norm = (clipped - lo) / (hi - lo)
    return norm.astype(np.float32), kept


def record_input(rec: records.RegionRecord, size: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """A record as the model sees it without augmentation: the whole image (:func:`image_input`) and
    all its boxes (:func:`box_input`); None for an undecodable image. What evaluation and feature
    extraction feed; training's examples are the same conversion of a random crop."""
    img = decode_image(rec, at_least=(size, size))
    if img is None:
        return None
    w, h = img.size
    return image_input(img, size), box_input(rec, (w, h), (0.0, 0.0, float(w), float(h)))[0]


def stack_inputs(inputs, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[(image [S,S,3], boxes [R_i,4]), ...]`` (at most ``batch_size``) -> padded model input
    ``x [B,S,S,3]``, ``boxes [B,N,4]``, ``valid [B,N]`` with N = max(1, max R_i)."""
    size = inputs[0][0].shape[0]
    n = max(1, max(len(b) for _, b in inputs))
    x = np.zeros((batch_size, size, size, 3), np.uint8)
    boxes = np.zeros((batch_size, n, 4), np.float32)
    valid = np.zeros((batch_size, n), bool)
    for j, (img, b) in enumerate(inputs):
        x[j], boxes[j, : len(b)], valid[j, : len(b)] = img, b, True
    return x, boxes, valid


class RegionExampleTransform:
    """Raw record bytes + index -> one fixed-shape example (pure given the RNG)."""

    def __init__(self, cfg: PipelineConfig, tokenizer=None, cluster_labels=None, where=None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.cluster_labels = cluster_labels
        self.where = where or (lambda i: f"record {i}")

    # -- geometry -------------------------------------------------------------------
    def _crop(self, w: int, h: int, rng: np.random.Generator):
        c = self.cfg
        if not c.random_crop:
            return 0.0, 0.0, float(w), float(h)
        area = w * h
        for _ in range(10):
            target = area * rng.uniform(*c.crop_scale)
            ratio = np.exp(rng.uniform(np.log(c.crop_ratio[0]), np.log(c.crop_ratio[1])))
            cw, ch = np.sqrt(target * ratio), np.sqrt(target / ratio)
            if cw <= w and ch <= h:
                x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
                return x0, y0, x0 + cw, y0 + ch
        return 0.0, 0.0, float(w), float(h)

    # -- the three steps of an example ----------------------------------------------------
    def decode_and_crop(self, rec: records.RegionRecord, rng: np.random.Generator):
        """``(image [S,S,3] uint8, crop xyxy, (w, h))``, or None for an undecodable image."""
        img = _open(rec)                       # header only: the crop is drawn before decoding
        if img is None:
            return None
        full = img.size
        s = self.cfg.image_size
        crop = self._crop(*full, rng)          # drawn on the full size: the same crop, draft or not
        cw, ch = crop[2] - crop[0], crop[3] - crop[1]
        # Decode no smaller than keeps the crop at >= S px a side (JPEG DCT scaling when allowed).
        at_least = (full[0] * s / cw, full[1] * s / ch) if self.cfg.jpeg_draft else None
        img = _decode(img, at_least)
        if img is None:
            return None
        w, h = img.size
        sx, sy = w / full[0], h / full[1]
        crop = (crop[0] * sx, crop[1] * sy, crop[2] * sx, crop[3] * sy)
        return image_input(img, s, crop), crop, (w, h)

    def select_regions(self, rec: records.RegionRecord, kept: np.ndarray, size_px: np.ndarray,
                       cluster: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Indices of the regions that fill the N slots: usable after the crop (visible share and size),
        objects with a cluster, text only with a tokenizer; text gets at most ``text_fraction`` of the
        slots unless objects leave some free; ``fill="resample"`` repeats chosen regions up to N."""
        c, n = self.cfg, self.cfg.num_regions
        usable = (kept >= c.min_box_visible) & (size_px >= c.min_box_size)
        obj = np.nonzero(usable & (rec.kind == batch.KIND_OBJECT) & (cluster >= 0))[0]
        txt = np.nonzero(usable & (rec.kind == batch.KIND_TEXT))[0] if self.tokenizer is not None else np.zeros(0, int)
        n_txt = min(len(txt), int(round(n * c.text_fraction)))
        n_obj = min(len(obj), n - n_txt)
        n_txt = min(len(txt), n - n_obj)  # give unused object slots back to text
        chosen = np.concatenate([rng.permutation(obj)[:n_obj], rng.permutation(txt)[:n_txt]]).astype(int)
        if c.fill == "resample" and 0 < len(chosen) < n:
            chosen = np.concatenate([chosen, rng.choice(chosen, n - len(chosen))])
        return chosen

    def encode_labels(self, rec: records.RegionRecord, chosen: np.ndarray, cluster: np.ndarray) -> np.ndarray:
        """``[len(chosen), M]`` labels in the batch contract (:mod:`rice_jax.batch`): an object's cluster
        in column 0, a text region's transcript token ids; −1 pad."""
        m = self.cfg.max_labels
        labels = np.full((len(chosen), m), -1, np.int32)
        for slot, r in enumerate(chosen):
            if rec.kind[r] == batch.KIND_OBJECT:
                labels[slot, 0] = cluster[r]
            else:
                labels[slot] = self.tokenizer.encode(rec.text[r], m)
        return labels

    def __call__(self, item, rng: np.random.Generator) -> dict:
        index, raw = item
        c = self.cfg
        s, n, m = c.image_size, c.num_regions, c.max_labels
        out = batch.empty_example(s, n, m, index)
        rec = records.decode(raw, self.where(index))  # schema violations name themselves
        out["image_id"] = rec.image_id
        decoded = self.decode_and_crop(rec, rng)
        if decoded is None:
            return out
        out["image"], crop, (w, h) = decoded
        out["image_ok"] = np.bool_(True)

        nb, kept = box_input(rec, (w, h), crop)
        size_px = np.minimum(nb[:, 2] - nb[:, 0], nb[:, 3] - nb[:, 1]) * s
        cluster = rec.cluster if self.cluster_labels is None else self.cluster_labels.of(index, rec.num_regions)
        chosen = self.select_regions(rec, kept, size_px, cluster, rng)
        k = len(chosen)
        out["boxes"][:k] = nb[chosen]
        out["region_valid"][:k] = True
        out["region_kind"][:k] = rec.kind[chosen]
        out["category"][:k] = rec.category[chosen]
        out["region_index"][:k] = chosen
        out["labels"][:k] = self.encode_labels(rec, chosen, cluster)
        return out


class _IndexedSource:
    """(dataset index, raw bytes) pairs: the transform keys cluster labels and messages by the record's
    index in the whole dataset (which differs from the source index when damaged shards are skipped)."""

    def __init__(self, src: records.RecordSource):
        self._src = src

    def __len__(self):
        return len(self._src)

    def __getitem__(self, i):
        return self._src.dataset_index(int(i)), self._src.raw(int(i))


def make_dataset(data_dir: str | os.PathLike, cfg: PipelineConfig, *, tokenizer=None,
                 process_index: Optional[int] = None, process_count: Optional[int] = None,
                 source: Optional[records.RecordSource] = None):
    """The Grain ``IterDataset`` of batches for this process (``iter()`` it; state is checkpointable).
    ``source``: the process's record source when it already has one (the trainer builds it once, so
    a stage switch or restart does not check every shard again)."""
    import grain

    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    src = source if source is not None else records.RecordSource(data_dir, skip_damaged=cfg.skip_damaged_shards,
                                                                           check=cfg.shard_check)
    if tokenizer is None:
        tokenizer = for_dataset(data_dir)
    transform = RegionExampleTransform(cfg, tokenizer, labels_store.open_labels(data_dir, records.read_manifest(data_dir)),
                                       where=src.where)
    ds = grain.MapDataset.source(_IndexedSource(src))
    if len(ds) < cfg.batch_size * process_count:
        raise errors.InputError(f"{data_dir}: {len(ds)} records, fewer than one global batch "
                         f"({cfg.batch_size} x {process_count} processes)")
    ds = ds.seed(cfg.seed)
    if cfg.shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(cfg.num_epochs)
    ds = ds.random_map(transform)
    # Every process walks the same global order (same shuffle, same per-index RNG) and keeps
    # every process_count-th example, so P processes together produce exactly the examples of
    # a one-process run; the slice is lazy, so nobody decodes another process's images.
    ds = ds[process_index::process_count]
    # Examples are read (decoded, cropped, their regions chosen) by a pool of threads one example
    # each, and batched after: a batch is assembled from examples that were made in parallel, not
    # built by one thread one image at a time. With worker processes (data.workers) every worker
    # runs this on its own slice of the examples and builds worker batches (worker_batch) that
    # this process joins; the read-ahead holds two (worker) batches.
    workers = resolve_workers(cfg.workers)
    per_worker = worker_batch(cfg.batch_size, workers)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.threads, prefetch_buffer_size=2 * per_worker))
    it_ds = it_ds.batch(per_worker, drop_remainder=True)
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain workers read absl flags; scripts may not use absl.app
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
        if per_worker < cfg.batch_size:
            it_ds = it_ds.batch(cfg.batch_size // per_worker, drop_remainder=True, batch_fn=_concat)
    return it_ds
