"""Region clustering: region features -> spherical k-means -> cluster labels (+ centre init).

    python -m rice_jax.labelling.clustering --data DIR --k K [--extractor handcrafted|hf:DIR|ckpt:DIR|regions:ckpt:RUN] [--out DIR]
    python -m rice_jax.labelling.clustering --data DIR --extractor oracle      # ground-truth categories (upper bound)

A job of any number of processes (``--coordinator-address ... --num-processes P --process-id I``
or ``--distributed`` on a pod); process p owns the p-th contiguous block of record shards and alone reads,
extracts and labels them (:func:`records.owned_shards`), so nobody holds or writes more than a share:

1. Features of every *object* region of an owned shard, by a pluggable extractor (handcrafted, our
   ViT, a JAX CLIP/SigLIP teacher, any PyTorch encoder), unit-normalised and written per shard in
   fp16 to ``--features-dir`` (local scratch, never the data dir; :mod:`rice_jax.labelling.feature_store`).
   Finished shards are kept on a rerun.
2. Spherical k-means streamed from those files: ``--backend jax`` (default from K = 4096) runs Lloyd
   passes on the device mesh with the centres sharded along K (:mod:`rice_jax.labelling.kmeans`; resumable
   between passes); ``sklearn`` is ``MiniBatchKMeans``; ``faiss`` uses faiss-cpu when installed.
3. Assignment (cosine argmax), written by each process for its own shards as label files beside
   the records (:mod:`rice_jax.data.labels`: atomic, fingerprinted with the run, read lazily by the
   input pipeline, refused when stale). Process 0 then records the run in the manifest (K, the
   extractor, the date, inertia, clusters used and, when ground-truth categories exist, NMI/ARI)
   and writes ``centers.npy`` (the normalised centres) to ``--out``.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import datetime
import hashlib
import itertools
import json
import os
import resource
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np
from PIL import Image

from rice_jax import backbones, cli, distributed, errors, storage
from rice_jax.data import labels as labels_store
from rice_jax.data import pipeline, records
from rice_jax.labelling import feature_store
from rice_jax.labelling.features import RegionFeatures, TransformersRegionFeatures
from rice_jax.labelling.kmeans import PRECISIONS, HierarchicalKMeans, MeshKMeans, resolve_precision
from rice_jax.losses import l2_normalize

CENTERS_FILE = "centers.npy"
TOPK_DIR = "cluster_topk"   # <shard>.npz per record shard: (record in shard, region) ids, [n, T] clusters, scores


# ----------------------------------------------------------------------------- extractors
def handcrafted_features(crop: np.ndarray) -> np.ndarray:
    """Colour + gradient-orientation histograms of a crop ``[h, w, 3] uint8`` -> ``[D]``.

    A bootstrap extractor needing no pretrained model: HOG-like 8-bin orientation
    histograms on a 4x4 grid (shape + texture) and a coarse colour histogram.
    """
    img = np.asarray(Image.fromarray(crop).resize((32, 32), Image.BILINEAR), np.float32) / 255.0
    gray = img.mean(-1)
    gy, gx = np.gradient(gray)
    mag = np.hypot(gx, gy)
    ang = (np.arctan2(gy, gx) % np.pi) / np.pi * 8
    bins = np.minimum(ang.astype(int), 7)
    hog = np.zeros((4, 4, 8), np.float32)
    cell = np.arange(32) // 8
    np.add.at(hog, (cell[:, None].repeat(32, 1), cell[None, :].repeat(32, 0), bins), mag)
    hog = hog.reshape(16, 8)
    hog /= np.linalg.norm(hog, axis=1, keepdims=True) + 1e-6
    q = np.minimum((img * 4).astype(int), 3)
    colour = np.bincount((q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).ravel(), minlength=64).astype(np.float32)
    colour /= colour.sum()
    return np.concatenate([hog.ravel(), 0.5 * colour])


def _iter_object_records(src: records.RecordSource) -> Iterator[tuple[int, records.RegionRecord, np.ndarray]]:
    """(record index, record, object region indices) for records with objects."""
    for i in range(len(src)):
        rec = src[i]
        obj = np.nonzero(rec.kind == records.KIND_OBJECT)[0]
        if len(obj):
            yield i, rec, obj


def _iter_object_crops(src: records.RecordSource) -> Iterator[tuple[int, int, np.ndarray]]:
    for i, rec, obj in _iter_object_records(src):
        img = pipeline.decode_image(rec)
        if img is None:  # unreadable image: its regions stay unlabelled (-1)
            continue
        arr = np.asarray(img)
        for r in obj:
            x0, y0, x1, y1 = np.round(rec.boxes[r]).astype(int)
            crop = arr[max(y0, 0):max(y1, y0 + 1), max(x0, 0):max(x1, x0 + 1)]
            if crop.size:
                yield i, int(r), crop


class HandcraftedExtractor:
    name = "handcrafted"
    dim = 16 * 8 + 64

    def __call__(self, src: records.RecordSource, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        ids, feats = [], []
        for i, r, crop in _iter_object_crops(src):
            ids.append((i, r))
            feats.append(handcrafted_features(crop))
            if len(ids) == chunk:
                yield np.asarray(ids), np.stack(feats)
                ids, feats = [], []
        if ids:
            yield np.asarray(ids), np.stack(feats)


class ViTExtractor:
    """ROI mean-pool inside each box of a backbone's ``last_hidden_state`` as transformers defines it
    (or, given a trained RICE model, its post-LN region tokens). Our JAX ViT
    (``hf:``/``ckpt:``/``hub:`` specs) runs through :class:`rice_jax.labelling.features.RegionFeatures`
    (jitted, batch-sharded over every device); any other Hugging Face vision encoder
    (``transformers:DIR``) through :class:`rice_jax.labelling.features.TransformersRegionFeatures`."""

    def __init__(self, vit, name: str, image_size: int | None = None, batch_size: int = 16,
                 decode_threads: int | None = None):
        self.name = name
        # Decoding and resizing (PIL releases the GIL) run on a thread pool, ahead of the device.
        self.decode_threads = decode_threads or min(16, os.cpu_count() or 1)
        n_dev = jax.local_device_count()
        self.batch_size = max(n_dev, -(-batch_size // n_dev) * n_dev)
        if isinstance(vit, TransformersRegionFeatures):
            self.image_size, self.dim = vit.image_size, vit.dim
            self._features = vit
        else:
            backbone = getattr(vit, "backbone", vit)   # a RICE model (regions:ckpt:RUN) reads its region tokens
            self.image_size = image_size or backbone.cfg.image_size
            self.dim = backbone.cfg.hidden_size
            ours = RegionFeatures(vit, self.image_size, layers=(-1,), last_hidden=backbone is vit)
            # The backbone's last_hidden_state as transformers defines it (a SigLIP teacher's is
            # after its post-LN), so hf:DIR and transformers:DIR cluster the same features.
            key = "region_token" if backbone is not vit else "last"
            self._features = lambda x, b, v: ours(x, b, v)["roi"][key]

    def __call__(self, src: records.RecordSource, chunk: int):
        batch = []

        def flush(batch):
            x, boxes, valid = pipeline.stack_inputs([(img, nb) for img, _, nb in batch], self.batch_size)
            feats = self._features(x, boxes, valid)
            ids = [(i, r) for _, rs, _ in batch for i, r in rs]
            out = np.concatenate([feats[j, : len(b[2])] for j, b in enumerate(batch)])
            return np.asarray(ids), out

        def read(i: int):
            """Record ``i`` read, its image decoded and resized on a pool thread (ArrayRecord reads,
            msgpack and PIL release the GIL), in the pipeline's one record -> model-input way."""
            rec = src[i]
            obj = np.nonzero(rec.kind == records.KIND_OBJECT)[0]
            return i, obj, (pipeline.record_input(rec, self.image_size) if len(obj) else None)

        ahead = collections.deque()   # read in order, up to two batches ahead of the device
        items = iter(range(len(src)))
        with concurrent.futures.ThreadPoolExecutor(self.decode_threads) as pool:
            for i in itertools.islice(items, 2 * self.batch_size):
                ahead.append(pool.submit(read, i))
            while ahead:
                i, obj, inp = ahead.popleft().result()
                nxt = next(items, None)
                if nxt is not None:
                    ahead.append(pool.submit(read, nxt))
                if inp is None:  # no object, or an unreadable image: its regions stay unlabelled (-1)
                    continue
                img, nb = inp
                batch.append((img, [(i, int(r)) for r in obj], nb[obj]))
                if len(batch) == self.batch_size:
                    yield flush(batch)
                    batch = []
        if batch:
            yield flush(batch)


TEACHER_DTYPES = ("float32", "bfloat16")


def make_extractor(spec: str, image_size: int | None = None, *, batch_size: int = 16, dtype: str = "float32"):
    """The extractor ``spec`` names. ``batch_size``: images per extraction step on this host (rounded
    up to a multiple of its devices); ``dtype``: the JAX teacher's compute dtype (bfloat16 halves its
    activations and runs at the accelerators' matmul rate; ROI features are pooled in float32)."""
    if dtype not in TEACHER_DTYPES:
        raise errors.InputError(f"--dtype {dtype!r}: use one of {TEACHER_DTYPES}")
    if spec == "handcrafted":
        return HandcraftedExtractor()
    source = backbones.parse(spec, what="--extractor", also=("handcrafted", "oracle"))
    if source.scheme == "transformers":
        if dtype != "float32":
            raise errors.InputError(f"--dtype {dtype}: transformers:DIR encoders run in PyTorch float32; --dtype "
                                    "sets a JAX teacher's (hf:, ckpt:, hub:)")
        return ViTExtractor(TransformersRegionFeatures(source.where, image_size), spec, batch_size=batch_size)
    # regions:ckpt:RUN, a second labelling round: the trained RICE model's own region tokens (what
    # its loss made discriminative) rather than its backbone's mean-pooled patches.
    return ViTExtractor(backbones.load(spec, dtype=dtype), spec, image_size, batch_size=batch_size)


# ----------------------------------------------------------------------------- k-means
# At and above this K the default backend is the mesh k-means (rice_jax.labelling.kmeans); below it
# scikit-learn's MiniBatchKMeans is quicker to start and plenty.
JAX_BACKEND_MIN_K = 4096
BACKENDS = ("auto", "sklearn", "faiss", "jax")
# Rows per k-means step: the mesh k-means takes large steps (65536: 30k a pass at 2B regions, each
# a few ms of host work against a step's device time); MiniBatchKMeans' batch stays its usual size.
DEFAULT_CHUNK = {"jax": 65536, "sklearn": 4096, "faiss": 4096}


def resolve_backend(backend: str, k: int) -> str:
    if backend not in BACKENDS:
        raise errors.InputError(f"--backend {backend!r}: use one of {BACKENDS}")
    if backend == "auto":
        return "jax" if k >= JAX_BACKEND_MIN_K else "sklearn"
    return backend


def fit_kmeans(feats: np.ndarray, k: int, *, seed: int, chunk: int, passes: int = 5, backend: str = "sklearn",
               state_dir: str | os.PathLike | None = None, levels: int = 1, log: Callable[[str], None] = print,
               precision: str = "float32"):
    """Spherical k-means over ``feats`` (unit rows, possibly a memmap): normalised centres [K, D].

    ``backend="jax"`` returns the fitted :class:`rice_jax.labelling.kmeans.MeshKMeans` instead (centres stay
    sharded on the mesh; ``state_dir`` makes its passes resumable)."""
    if backend == "jax" and levels == 2:
        return HierarchicalKMeans(k, feats.shape[1], metric="cosine", batch_size=chunk, seed=seed, log=log,
                                  checkpoint_dir=str(state_dir) if state_dir else None, precision=precision).fit(
            feats, passes=passes)
    if backend == "jax":
        km = MeshKMeans(k, feats.shape[1], metric="cosine", batch_size=chunk, seed=seed,
                        checkpoint_dir=str(state_dir) if state_dir else None, log=log, precision=precision)
        return km.fit(feats, passes=passes, init="kmeans++" if k < JAX_BACKEND_MIN_K else "random")
    if backend == "faiss":
        import faiss  # optional extra

        km = faiss.Kmeans(feats.shape[1], k, niter=20, seed=seed, spherical=True)
        km.train(np.ascontiguousarray(feats))
        return l2_normalize(km.centroids)
    from sklearn.cluster import MiniBatchKMeans

    km = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=max(chunk, k), n_init=1)
    rng = np.random.default_rng(seed)
    # The first partial_fit initialises the centres (k-means++) from its batch: make it big enough.
    first = np.sort(rng.choice(len(feats), min(len(feats), max(chunk, 3 * k)), replace=False))
    km.partial_fit(feats[first])
    for _ in range(passes):
        for start in rng.permutation(np.arange(0, len(feats), chunk)):
            km.partial_fit(feats[start:start + chunk])
    return l2_normalize(km.cluster_centers_.astype(np.float32))


def assign(feats: np.ndarray, centers: np.ndarray, chunk: int) -> tuple[np.ndarray, float]:
    """Cosine argmax in chunks; returns (labels [R], inertia = Σ squared distance on the sphere)."""
    labels = np.empty(len(feats), np.int32)
    inertia = 0.0
    for s in range(0, len(feats), chunk):
        sim = feats[s:s + chunk] @ centers.T
        labels[s:s + chunk] = sim.argmax(1)
        inertia += float(np.sum(2.0 - 2.0 * sim.max(1)))
    return labels, inertia


def default_features_dir(data_dir) -> Path:
    """Local scratch for a dataset's features (never the data directory, often a bucket mount): one
    folder per dataset path, so a rerun finds what an interrupted one extracted."""
    key = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "rice_jax_features" / f"{Path(data_dir).name}-{key}"


def _write_owned_labels(data_dir: Path, feats: feature_store.FeatureShards, ids: np.ndarray, values: np.ndarray,
                        run: str, log) -> int:
    """Label files of this process's shards (``ids`` as :meth:`FeatureShards.ids`); finished ones are kept."""
    written = 0
    for j, shard in enumerate(feats.shard_names):
        if labels_store.shard_done(data_dir, shard, run):
            continue
        m = ids[:, 0] == j
        labels_store.write_shard(data_dir, shard, feats.counts(j), ids[m, 1:3], values[m], run)
        written += 1
    if written:
        log(f"[clustering] wrote the labels of {written} shard(s)")
    return written


def _write_owned_topk(topk_dir: Path, feats: feature_store.FeatureShards, ids: np.ndarray, top: np.ndarray,
                      scores: np.ndarray, log) -> None:
    """Each region's T nearest clusters, one file per shard this process owns (``TOPK_DIR/<shard>.npz``:
    ``ids [n, 2]`` record in the shard and region, ``labels [n, T]``, ``scores [n, T]``, nearest first),
    written atomically by the owner: nothing is gathered, whatever the dataset's size."""
    topk_dir.mkdir(parents=True, exist_ok=True)
    for j, shard in enumerate(feats.shard_names):
        m = ids[:, 0] == j
        path = topk_dir / f"{shard}.npz"
        with storage.open_atomic(path) as f:
            np.savez(f, ids=ids[m, 1:3], labels=top[m], scores=scores[m])
    log(f"[clustering] top-{top.shape[1]} assignment of {len(feats.shard_names)} shard(s) in {topk_dir}")


def _agreement(cats: np.ndarray, values: np.ndarray, k: int) -> dict:
    """Cluster use and, where regions carry ground-truth categories, NMI/ARI: summed over processes
    without gathering the labels (only the rare categorised regions travel)."""
    used = distributed.sum_over_processes(np.bincount(values[values >= 0], minlength=k).astype(np.int64))
    out = {"clusters_used": int((used > 0).sum())}
    m = cats >= 0
    pairs = distributed.gather_rows(np.stack([cats[m], values[m]], 1).astype(np.int64))
    if len(pairs):
        from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

        out["nmi"] = float(normalized_mutual_info_score(pairs[:, 0], pairs[:, 1]))
        out["ari"] = float(adjusted_rand_score(pairs[:, 0], pairs[:, 1]))
    return out


def _record_report(data_dir: Path, report: dict, log) -> dict:
    """The run (with its id, which the label files carry) and K into the manifest: process 0, last."""
    report.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  labels_dir=labels_store.LABELS_DIR)
    manifest = records.read_manifest(data_dir)
    labels_store.commit(data_dir, manifest, report["run"])
    manifest["num_clusters"] = report["k"]
    manifest["clustering"] = report
    records.write_manifest(data_dir, manifest)
    log("[clustering] " + json.dumps({k_: v for k_, v in report.items() if k_ not in ("centers",)}))
    return report


def oracle_labels(data_dir: str | os.PathLike, log: Callable[[str], None] = print) -> dict:
    """Ground-truth categories as the cluster labels (K = number of categories).

    The upper bound of what training can learn from the pipeline, for datasets
    whose records carry categories (the synthetic generator, COCO imports).
    """
    data_dir = Path(data_dir)
    manifest = records.read_manifest(data_dir)
    src = records.RecordSource(data_dir)
    per_shard, k = [], 0
    for s in range(len(src.paths)):
        tally = records.ShardTally(src, s)
        for i in range(len(tally)):
            tally[i]
        obj = tally.objects()
        obj = obj[obj[:, 2] >= 0]
        per_shard.append((tally.name, tally.counts(), obj[:, :2], obj[:, 2].astype(np.int32)))
        k = max(k, int(obj[:, 2].max(initial=-1)) + 1)
    if not k:
        raise errors.InputError(f"{data_dir}: no object region has a ground-truth category; the oracle needs them")
    run = labels_store.run_id(manifest, extractor="oracle")
    for shard, counts, ids, values in per_shard:
        labels_store.write_shard(data_dir, shard, counts, ids, values, run)
    values = np.concatenate([v for *_, v in per_shard])
    # The categories are the labels here: the agreement is measured, not asserted, as for k-means.
    return _record_report(data_dir, {"k": k, "extractor": "oracle", "run": run, "num_regions": int(len(values)),
                                     **_agreement(values, values, k)}, log)


def run(data_dir: str | os.PathLike, k: int, *, extractor: str = "handcrafted", out: str | os.PathLike | None = None,
        features_dir: str | os.PathLike | None = None, feature_dtype: str = "float16", seed: int = 0,
        chunk: int | None = None, passes: int = 5, backend: str = "auto", topk: int = 1, levels: int = 1,
        image_size: int | None = None, score_precision: str = "auto", batch_size: int = 16,
        teacher_dtype: str = "float32", log: Callable[[str], None] = print) -> dict:
    """Features -> k-means -> labels for ``data_dir`` as one job of any number of processes.

    Process p owns the p-th block of shards (:func:`records.owned_shards`): it alone extracts their
    features (into ``features_dir``, its local scratch), feeds them to the mesh k-means, and
    writes their label files. Process 0 writes the centres and, after every label file exists,
    the manifest entry naming the run. Every stage resumes: finished feature and label shards
    are kept, the jax k-means restarts from its last pass."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise errors.MissingInput(f"--data {data_dir}: no such directory")
    if extractor == "oracle":
        return oracle_labels(data_dir, log)
    manifest = records.read_manifest(data_dir)
    src = records.RecordSource(data_dir)
    out = storage.path(out) if out else storage.path(data_dir)   # gs:// too: centres, state and top-k go there
    out.mkdir(parents=True, exist_ok=True)
    pid, nproc = jax.process_index(), jax.process_count()
    owned = records.owned_shards(len(src.paths), pid, nproc)
    backend = resolve_backend(backend, k)
    chunk = chunk or DEFAULT_CHUNK[backend]
    score_precision = resolve_precision(score_precision)
    if nproc > 1 and not features_dir:
        raise errors.InputError(f"--features-dir DIR is required with {nproc} processes: each writes its shards' "
                                "features there, so point it at every host's local scratch disk (the system temp "
                                "dir is usually the small boot disk)")
    ext = make_extractor(extractor, image_size, batch_size=batch_size, dtype=teacher_dtype)
    fdir = Path(features_dir) if features_dir else default_features_dir(data_dir)
    settings = {"image_size": getattr(ext, "image_size", None),
                **({"teacher_dtype": teacher_dtype} if teacher_dtype != "float32" else {})}
    feature_store.check_free_space(fdir, manifest, owned, int(ext.dim), feature_dtype)
    feats = feature_store.extract_shards(src, owned, ext, fdir, chunk=chunk, dtype=feature_dtype, settings=settings,
                                         log=log)
    ids = feats.ids()
    n_total = int(np.sum(distributed.gather_rows(np.asarray([len(feats)], np.int64))))
    if k < 1 or k > n_total:
        raise errors.InputError(f"--k {k} must be between 1 and the number of object regions ({n_total}); lower K")
    if (topk > 1 or levels != 1 or nproc > 1) and backend != "jax":
        raise errors.InputError("--topk, --levels 2 and multi-process runs need --backend jax (they run on the mesh)")
    if levels not in (1, 2) or (levels == 2 and topk > 1):
        raise errors.InputError(f"--levels {levels}: use 1 (flat) or 2 (hierarchical, without --topk)")
    log(f"[clustering] {n_total} object regions, D={feats.dim}, extractor={ext.name}; k-means K={k} "
        f"({backend}, {nproc} process(es), {len(owned)} of {len(src.paths)} shards here)")
    fitted = fit_kmeans(feats, k, seed=seed, chunk=chunk, passes=passes, backend=backend,
                        state_dir=out / ("kmeans_state" if levels == 1 else "kmeans_state_hierarchical"),
                        levels=levels, log=log if pid == 0 else (lambda s: None),
                        precision=score_precision)
    if backend == "jax":  # centres stay sharded on the mesh; assignment runs there too
        values, inertia = fitted.assign(feats)
        centers = fitted.centers_numpy()
        inertia = float(np.sum(distributed.gather_rows(np.asarray([inertia], np.float64))))
        if topk > 1:
            top, scores = fitted.assign_topk(feats, topk)
            _write_owned_topk(out / TOPK_DIR, feats, ids, top, scores, log)
    else:
        centers = fitted
        values, inertia = assign(feats, centers, chunk)
    run = labels_store.run_id(manifest, extractor=ext.name, k=k, seed=seed, passes=passes, backend=backend,
                              levels=levels, image_size=settings["image_size"], score_precision=score_precision)
    _write_owned_labels(data_dir, feats, ids, values, run, log)
    report = {"k": k, "extractor": ext.name, "backend": backend, "seed": seed, "inertia": inertia, "run": run,
              "centers": str(out / CENTERS_FILE), "processes": nproc, "num_regions": n_total,
              "features_dir": str(fdir), **_agreement(ids[:, 3], values, k)}
    distributed.barrier("clustering_labels_written")
    if pid != 0:
        return report
    with storage.open_atomic(out / CENTERS_FILE) as f:
        np.save(f, centers)
    return _record_report(data_dir, report, log)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--k", type=int, default=0, help="number of clusters (not used by --extractor oracle)")
    ap.add_argument("--extractor", default="handcrafted",
                    help="handcrafted | hf:DIR | ckpt:DIR | hub:ID (our ViT) | regions:ckpt:RUN (a trained RICE "
                         "run's own region tokens: a second labelling round) | transformers:DIR (CLIP, SigLIP, "
                         "DINOv2, MLCD... in PyTorch) | oracle (ground-truth categories as labels)")
    ap.add_argument("--out", default=None, help="where centres and the k-means state go (default: the data dir)")
    ap.add_argument("--features-dir", default=None,
                    help="this process's feature files, one set per owned shard (default: a folder per dataset under "
                         "the system's temp dir; never the data dir)")
    ap.add_argument("--feature-dtype", default="float16", choices=feature_store.DTYPES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=None,
                    help=f"k-means rows per step over all devices (default {DEFAULT_CHUNK['jax']} for the jax "
                         f"backend: 30k steps a pass at 2B regions; {DEFAULT_CHUNK['sklearn']} for sklearn)")
    ap.add_argument("--batch-size", type=int, default=16,
                    help="images per feature-extraction step on this host (rounded up to its devices)")
    ap.add_argument("--dtype", default="float32", choices=TEACHER_DTYPES,
                    help="a JAX teacher's compute dtype (hf:, ckpt:, hub:); bfloat16 on accelerators")
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--backend", choices=BACKENDS, default="auto",
                    help=f"k-means: jax = on the device mesh, centres sharded along K (auto: K >= {JAX_BACKEND_MIN_K}); "
                         "sklearn = MiniBatchKMeans; faiss (optional extra)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--score-precision", default="auto", choices=("auto",) + PRECISIONS,
                    help="jax k-means scoring: bfloat16 = bf16 matmuls, each row's two best centres rescored in "
                         "float32 (the accelerators' matmul rate, float32's assignment: docs/data.md); auto = "
                         "bfloat16 on TPU/GPU, float32 on CPU (no bf16 matrix unit)")

    distributed.add_flags(ap)
    ap.add_argument("--levels", type=int, default=1, choices=(1, 2),
                    help="2 = hierarchical k-means (about sqrt(K) coarse clusters, then fine ones inside each; jax "
                         "backend). Each fine level compiles and checkpoints on its own (~1000 of each a pass at "
                         "K = 1M): prefer flat with bf16 scoring on accelerators (docs/data.md)")
    ap.add_argument("--topk", type=int, default=1,
                    help=f"also write each region's T nearest clusters, per shard under {TOPK_DIR}/ (multi-label use; jax backend)")
    a = ap.parse_args(argv)
    distributed.join(a)
    if a.extractor != "oracle" and a.k < 1:
        ap.error("--k K is required (the number of clusters)")
    _run_and_report_memory(a)


def _run_and_report_memory(a) -> None:
    """Run, then print this process's peak resident memory: the figure that shows no process of a
    multi-process job holds more than its share (``ru_maxrss`` is in KiB on Linux)."""
    run(a.data, a.k, extractor=a.extractor, out=a.out, features_dir=a.features_dir, feature_dtype=a.feature_dtype,
        seed=a.seed, chunk=a.chunk, passes=a.passes, backend=a.backend, image_size=a.image_size, topk=a.topk,
        levels=a.levels, score_precision=a.score_precision, batch_size=a.batch_size, teacher_dtype=a.dtype)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"[clustering] process {jax.process_index()}: peak RSS {peak:.0f} MiB", flush=True)


if __name__ == "__main__":
    cli.run(main)
