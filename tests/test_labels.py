"""Label shards: written per shard, read lazily, refused when stale; feature shards resume after kill -9."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rice_jax import errors, storage
from rice_jax.labelling import clustering, feature_store
from rice_jax.data import labels as labels_store
from rice_jax.data import pipeline, records, synthetic

CFG = pipeline.PipelineConfig(image_size=32, num_regions=6, batch_size=8, text_fraction=0.0, random_crop=False)


@pytest.fixture(scope="module")
def oracle_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("labels_data")
    synthetic.build(str(d), 48, seed=4, num_shards=3)
    clustering.run(d, 0, extractor="oracle", log=lambda s: None)
    return d


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_labels_reach_batches_and_equal_the_records_categories(oracle_data):
    b = next(iter(pipeline.make_dataset(oracle_data, CFG, process_index=0, process_count=1)))
    obj = b["region_valid"] & (b["region_kind"] == 0) & (b["category"] >= 0)
    assert obj.sum() > 8
    np.testing.assert_array_equal(b["labels"][obj][:, 0], b["category"][obj])
    offsets, labels = labels_store.read_all(oracle_data)
    src = records.RecordSource(oracle_data)
    assert len(offsets) == len(src) + 1 and offsets[-1] == sum(r.num_regions for r in src)


def test_reader_pickles_paths_not_labels(oracle_data, tmp_path):
    """What a Grain worker receives does not grow with the labels (10x more regions: same bytes)."""
    m = records.read_manifest(oracle_data)
    reader = labels_store.open_labels(oracle_data, m)
    before = len(pickle.dumps(reader))
    reader.of(0, records.RecordSource(oracle_data)[0].num_regions)   # maps shard 0
    assert len(pickle.dumps(reader)) == before
    big = tmp_path / "big"
    big.mkdir()
    counts = np.full(m["shard_counts"][0], 10 * 60)
    for shard, n in zip(m["shards"], m["shard_counts"]):
        labels_store.write_shard(big, shard, np.full(n, 600), np.zeros((0, 2)), np.zeros(0), "r")
    (big / "manifest.json").write_text(json.dumps(dict(m, clustering={"run": "r"})))
    labels_store.commit(big, json.loads((big / "manifest.json").read_text()), "r")
    big_reader = labels_store.open_labels(big, json.loads((big / "manifest.json").read_text()))
    big_reader.of(0, int(counts[0]))
    assert abs(len(pickle.dumps(big_reader)) - before) < 64       # paths differ in length, nothing else


class _ReadLabels:
    """A Grain map step reading one record's labels, for the worker-memory test: module level so
    it pickles into the worker. ``eager`` is the control: it loads every label first, as the
    single-file sidecar of earlier versions did."""

    def __init__(self, reader, num_regions: int, eager: bool = False):
        self.reader, self.num_regions, self.eager = reader, num_regions, eager

    def __call__(self, index):
        if self.eager and not hasattr(self, "_all"):
            self._all = labels_store.read_all(self.reader.data_dir)
        labels = self.reader.of(int(index), self.num_regions)
        status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
        return {"labels": labels, "peak_kib": int(status["VmHWM"].split()[0]), "pid": os.getpid()}


def _worker_peak_mib(data_dir, num_regions: int, eager: bool) -> tuple[float, int]:
    """Peak RSS of one Grain worker after reading 256 records spread over the whole dataset."""
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    m = json.loads((data_dir / "manifest.json").read_text())
    reader = labels_store.open_labels(data_dir, m)
    total = sum(m["shard_counts"])
    idx = np.linspace(0, total - 1, 256).astype(np.int64)
    ds = grain.MapDataset.source(idx).map(_ReadLabels(reader, num_regions, eager)).to_iter_dataset()
    out = list(ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=1)))
    assert len({o["pid"] for o in out} - {os.getpid()}) == 1          # read in one worker, not here
    assert all((o["labels"] == -1).all() and len(o["labels"]) == num_regions for o in out)
    return max(o["peak_kib"] for o in out) / 1024, len(out)


def _fake_labelled_dataset(d, records_per_shard: int, regions: int):
    """Label files (no records: the reader needs only the manifest's shard names and counts)."""
    d.mkdir()
    shards = [f"shard-{i:05d}.msgpack" for i in range(2)]
    for shard in shards:
        labels_store.write_shard(d, shard, np.full(records_per_shard, regions), np.zeros((0, 2)), np.zeros(0), "r")
    (d / "manifest.json").write_text(json.dumps({"schema_version": records.SCHEMA_VERSION, "shards": shards,
                                                 "shard_counts": [records_per_shard] * 2,
                                                 "clustering": {"run": "r"}}))
    labels_store.commit(d, json.loads((d / "manifest.json").read_text()), "r")
    return d


@pytest.mark.slow
def test_grain_worker_memory_does_not_grow_with_the_labels(tmp_path):
    """Measured, not inferred from pickle sizes: a Grain worker reading records spread over a dataset
    peaks at about the same RSS whether the labels are 10 MB or 10x that (2.4M vs 24M regions); the eager
    control (every label loaded in the worker) grows by about the labels' size, so the measurement
    can see what it asserts the lazy reader does not do."""
    regions = 600
    small = _fake_labelled_dataset(tmp_path / "small", 2_000, regions)
    big = _fake_labelled_dataset(tmp_path / "big", 20_000, regions)
    label_mib = sum(f.stat().st_size for f in (big / labels_store.LABELS_DIR).glob("*.npy")) / 2**20
    assert label_mib > 90
    peak_small, n = _worker_peak_mib(small, regions, eager=False)
    peak_big, _ = _worker_peak_mib(big, regions, eager=False)
    eager_small, _ = _worker_peak_mib(small, regions, eager=True)
    eager_big, _ = _worker_peak_mib(big, regions, eager=True)
    print(f"worker peak RSS, labels {label_mib / 10:.0f} -> {label_mib:.0f} MiB: lazy {peak_small:.0f} -> "
          f"{peak_big:.0f} MiB, eager {eager_small:.0f} -> {eager_big:.0f} MiB ({n} records read)")
    # The lazy reader maps each shard's file; a read faults in the page it needs plus the kernel's
    # fault-around window (64 KiB), so the 256 spread reads may add up to ~16-32 MiB of mapped pages
    # whatever the labels' size (CI saw +10 MiB once). What must not happen is growth that follows
    # the labels: the eager control grows by 450-960 MiB here, so a fifth of the labels' size separates them.
    assert peak_big - peak_small < 0.2 * label_mib and peak_big < 1.15 * peak_small
    assert eager_big - eager_small > 0.5 * label_mib


def test_stale_labels_are_one_line_errors(oracle_data, tmp_path):
    # Records rebuilt after clustering: the new manifest names no clustering run.
    d = _copy(oracle_data, tmp_path / "remined")
    labels_dir = d / labels_store.LABELS_DIR
    shutil.move(labels_dir, tmp_path / "kept_labels")
    synthetic.build(str(d), 48, seed=5, num_shards=3)
    shutil.move(tmp_path / "kept_labels", labels_dir)
    with pytest.raises(labels_store.StaleLabels, match="labels without a clustering run.*rerun `python -m rice_jax"):
        pipeline.make_dataset(d, CFG, process_index=0, process_count=1)
    # A shard's labels from another run: refused when the index is built, and an index of another run
    # (or of other shards) when it is opened.
    d = _copy(oracle_data, tmp_path / "other_run")
    m = records.read_manifest(d)
    meta = d / labels_store.LABELS_DIR / f"{m['shards'][1]}.labels.json"
    meta.write_text(json.dumps(dict(json.loads(meta.read_text()), run="elsewhere")))
    with pytest.raises(labels_store.StaleLabels, match=f"{m['shards'][1]}.labels.json: labels of run elsewhere"):
        labels_store.commit(d, m, m["clustering"]["run"])
    index = d / labels_store.LABELS_DIR / labels_store.INDEX_FILE
    index.write_text(json.dumps(dict(json.loads(index.read_text()), run="elsewhere")))
    with pytest.raises(labels_store.StaleLabels, match=f"{labels_store.INDEX_FILE}: labels of run elsewhere"):
        pipeline.make_dataset(d, CFG, process_index=0, process_count=1)
    index.write_text(json.dumps(dict(json.loads(index.read_text()), run=m["clustering"]["run"],
                                     num_records=[n + (i == 2) for i, n in enumerate(m["shard_counts"])])))
    with pytest.raises(labels_store.StaleLabels, match=f"shard 2 has {m['shard_counts'][2] + 1} records in "
                                                       f"{m['shards'][2]}, the manifest {m['shard_counts'][2]}"):
        pipeline.make_dataset(d, CFG, process_index=0, process_count=1)
    index.unlink()
    with pytest.raises(labels_store.StaleLabels, match="index.json: missing or unreadable"):
        pipeline.make_dataset(d, CFG, process_index=0, process_count=1)
    # Same shards and counts, but a record's regions changed: caught when the record is read.
    d = _copy(oracle_data, tmp_path / "regions_changed")
    m = records.read_manifest(d)
    src = records.RecordSource(d)
    start, stop = src.shard_range(0)
    counts = np.asarray([src[i].num_regions for i in range(start, stop)])
    counts[0] += 1
    labels_store.write_shard(d, m["shards"][0], counts, np.zeros((0, 2)), np.zeros(0), m["clustering"]["run"])
    reader = labels_store.open_labels(d, m)
    with pytest.raises(labels_store.StaleLabels, match=f"{m['shards'][0]}:0: the record has"):
        reader.of(0, int(counts[0]) - 1)
    # The single-file sidecar of earlier versions.
    d = _copy(oracle_data, tmp_path / "legacy")
    shutil.rmtree(d / labels_store.LABELS_DIR)
    np.savez(d / labels_store.LEGACY_FILE, offsets=np.zeros(1), labels=np.zeros(0))
    with pytest.raises(labels_store.StaleLabels, match="single-file format of earlier versions"):
        pipeline.make_dataset(d, CFG, process_index=0, process_count=1)


def test_feature_shards_read_like_one_array(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 8)).astype(np.float32) for n in (5, 0, 7)]
    for dtype in feature_store.DTYPES:
        d = tmp_path / dtype
        d.mkdir()
        names = []
        for j, p in enumerate(parts):
            names.append(f"s{j}")
            paths = feature_store._paths(d, f"s{j}")
            feature_store._save(paths["feats"], feature_store._encode(p, dtype))
        fs = feature_store.FeatureShards(d, names, dtype, 8)
        full = np.concatenate(parts)
        tol = {"float32": 0, "float16": 2e-3, "bfloat16": 2e-2}[dtype]
        assert fs.shape == (12, 8)
        np.testing.assert_allclose(fs[3:9], full[3:9], atol=tol * 4, rtol=tol)
        idx = np.array([11, 0, 5, 4, 5])
        np.testing.assert_allclose(fs[idx], full[idx], atol=tol * 4, rtol=tol)
        np.testing.assert_allclose(np.asarray(fs), full, atol=tol * 4, rtol=tol)


@pytest.mark.slow
def test_extraction_resumes_after_kill_9(tmp_path):
    """kill -9 once the first shard's features are committed; the rerun keeps that shard's files and
    ends with the labels of an uninterrupted run."""
    from tests.test_train import _env

    data = tmp_path / "data"
    synthetic.build(str(data), 96, seed=8, num_shards=6)
    ref, run = _copy(data, tmp_path / "ref"), _copy(data, tmp_path / "run")
    cmd = [sys.executable, "-m", "rice_jax.labelling.clustering", "--k", "6", "--chunk", "64"]
    r = subprocess.run(cmd + ["--data", str(ref), "--features-dir", str(tmp_path / "f_ref")], env=_env(1),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    fdir = tmp_path / "f_run"
    p = subprocess.Popen(cmd + ["--data", str(run), "--features-dir", str(fdir)], env=_env(1),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(fdir.glob("*.json")) and p.poll() is None:
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    marks = sorted(fdir.glob("*.json"))
    assert 1 <= len(marks) < 6, "killed too late to test a resume"
    first = {m: m.stat().st_mtime_ns for m in marks}
    r = subprocess.run(cmd + ["--data", str(run), "--features-dir", str(fdir)], env=_env(1),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{len(marks)} of 6 shards already extracted" in r.stdout
    assert all(m.stat().st_mtime_ns == t for m, t in first.items())
    np.testing.assert_array_equal(labels_store.read_all(run)[1], labels_store.read_all(ref)[1])


def test_labelling_interrupted_between_shards_resumes(tmp_path):
    """What a kill during labelling leaves (atomic files: some shards labelled, a stray temp file, no
    manifest entry yet): the rerun keeps the finished shards' files and ends with the same labels."""
    data = tmp_path / "data"
    synthetic.build(str(data), 60, seed=9, num_shards=3)
    kw = dict(chunk=64, features_dir=tmp_path / "f", log=lambda s: None)
    clustering.run(data, 6, **kw)
    want = labels_store.read_all(data)
    m = records.read_manifest(data)
    ldir = data / labels_store.LABELS_DIR
    for suffix in (".labels.npy", ".labels.json"):
        (ldir / f"{m['shards'][2]}{suffix}").unlink()
    (ldir / f".{m['shards'][2]}.labels.npy{storage.TEMP_MARK}123").write_bytes(b"partial")
    del m["clustering"]
    records.write_manifest(data, m)
    kept = {p: p.stat().st_mtime_ns for p in ldir.glob(f"{m['shards'][0]}.labels.*")}
    with pytest.raises(labels_store.StaleLabels, match="without a clustering run"):
        pipeline.make_dataset(data, CFG, process_index=0, process_count=1)
    clustering.run(data, 6, **kw)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    got = labels_store.read_all(data)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_features_of_a_dataset_rebuilt_in_place_are_not_reused(tmp_path):
    """Same shard names and record counts, other images: the feature marks carry the shard file's
    fingerprint, so the second run extracts anew and gets the labels a fresh features dir gives."""
    data = tmp_path / "data"
    kw = dict(chunk=64, log=lambda s: None)
    synthetic.build(str(data), 40, seed=1, num_shards=2)
    clustering.run(data, 5, features_dir=tmp_path / "f", **kw)
    shutil.rmtree(data)
    synthetic.build(str(data), 40, seed=2, num_shards=2)
    lines = []
    clustering.run(data, 5, features_dir=tmp_path / "f", chunk=64, log=lines.append)
    assert not any("already extracted" in s for s in lines)
    reused = labels_store.read_all(data)[1]
    clustering.run(data, 5, features_dir=tmp_path / "fresh", **kw)
    np.testing.assert_array_equal(reused, labels_store.read_all(data)[1])


def test_extraction_refuses_a_disk_too_small_for_its_features(tmp_path, monkeypatch):
    """The projected size of a process's features against its disk's free space, before extracting."""
    import shutil as sh

    manifest = {"shard_counts": [100, 300], "num_object_regions": 2_000_000}
    assert feature_store.projected_bytes(manifest, [1], 1024, "float16") == int(1_500_000 * (1024 * 2 + 16))
    usage = sh.disk_usage(tmp_path)
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage._replace(free=2 * 2**30))
    feature_store.check_free_space(tmp_path / "f", manifest, [0], 256, "float16")      # 0.24 GiB: fits
    with pytest.raises(errors.InputError, match=r"--features-dir .*: its disk has 2.0 GiB free, .* need ~2.9 GiB"):
        feature_store.check_free_space(tmp_path / "f", manifest, [1], 1024, "float16")
