"""Region clustering: quality on synthetic data, determinism, chunking, labels in batches, errors."""
import re
import shutil

import numpy as np
import pytest

from rice_jax.labelling import clustering, feature_store
from rice_jax.losses import l2_normalize
from rice_jax.data import labels as labels_store
from rice_jax.data import pipeline, records, synthetic


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn_cluster")
    synthetic.build(str(d), 160, seed=11, num_shards=2)
    return d


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_handcrafted_kmeans_recovers_categories(syn, tmp_path):
    d = _copy(syn, tmp_path / "a")
    rep = clustering.run(d, 12, chunk=128, log=lambda s: None)
    # 12 categories (shape x texture), colour uninformative by construction. Shuffled
    # labels give NMI ~0.02 at this size; 0.3 means shape/texture are clearly captured
    # (measured ~0.45-0.5 with the handcrafted HOG + colour features).
    assert rep["nmi"] > 0.3 and rep["ari"] > 0.15
    m = records.read_manifest(d)
    assert m["num_clusters"] == 12 and m["clustering"]["extractor"] == "handcrafted"
    assert np.load(d / clustering.CENTERS_FILE).shape == (12, clustering.HandcraftedExtractor.dim)
    # Same seed: identical labels; labels reach the pipeline's batches.
    first = labels_store.read_all(d)[1]
    clustering.run(d, 12, chunk=128, log=lambda s: None)
    np.testing.assert_array_equal(labels_store.read_all(d)[1], first)
    cfg = pipeline.PipelineConfig(image_size=32, num_regions=6, batch_size=8, text_fraction=0.0)
    b = next(iter(pipeline.make_dataset(d, cfg, process_index=0, process_count=1)))
    obj = b["region_valid"] & (b["region_kind"] == 0)
    assert obj.sum() > 8
    lab = b["labels"][obj][:, 0]
    assert ((lab >= 0) & (lab < 12)).all()
    # Each batch label is the sidecar label of that record's region (join by record + region index).
    offsets = labels_store.read_all(d)[0]
    rows, slots = np.nonzero(obj)
    np.testing.assert_array_equal(lab, first[offsets[b["image_index"][rows]] + b["region_index"][rows, slots]])


def test_chunked_assignment_equals_unchunked():
    r = np.random.default_rng(0)
    feats = l2_normalize(r.standard_normal((1000, 16)).astype(np.float32))
    centers = l2_normalize(r.standard_normal((37, 16)).astype(np.float32))
    a, ia = clustering.assign(feats, centers, chunk=1000)
    b, ib = clustering.assign(feats, centers, chunk=33)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(ia, ib, rtol=1e-5)
    np.testing.assert_array_equal(a, np.argmax(feats @ centers.T, 1))


def test_bad_arguments_are_clear(syn, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        clustering.run(tmp_path / "nope", 4, log=lambda s: None)
    d = _copy(syn, tmp_path / "b")
    with pytest.raises(ValueError, match="between 1 and the number of object regions"):
        clustering.run(d, 10**6, log=lambda s: None)
    with pytest.raises(ValueError, match="--extractor 'clip': use handcrafted, oracle, hf:DIR"):
        clustering.make_extractor("clip")
    with pytest.raises(ValueError, match="--dtype .float16.: use one of"):
        clustering.make_extractor("handcrafted", dtype="float16")


def test_vit_extractor_from_local_hf_dir(syn, tmp_path):
    from tests.helpers import save_random_hf_model

    save_random_hf_model(tmp_path / "hf", patch_size=8, image_size=32)
    d = _copy(syn, tmp_path / "c")
    rep = clustering.run(d, 8, extractor=f"hf:{tmp_path / 'hf'}", chunk=256, features_dir=tmp_path / "f",
                         log=lambda s: None)
    assert rep["extractor"].startswith("hf:") and rep["clusters_used"] >= 2
    feats = np.asarray(feature_store.FeatureShards(tmp_path / "f", records.read_manifest(d)["shards"], "float16", 64))
    assert feats.shape == (rep["num_regions"], 64)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=2e-3)      # unit rows, stored in fp16
    assert {p.name for p in d.glob("*.npy")} == {clustering.CENTERS_FILE}          # no features in the data dir


def _tiny_encoder(kind, path):
    import transformers as T

    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
    model = {"clip": lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**kw)),
             "siglip": lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**kw)),
             "dinov2": lambda: T.Dinov2Model(T.Dinov2Config(**kw)),
             "clip_full": lambda: T.CLIPModel(T.CLIPConfig(vision_config=kw, text_config=dict(
                 hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)))}[kind]()
    model.save_pretrained(path)
    return model.eval()


def _cells_in_box(box, g):
    """Independent statement of the visibility rule: cells whose open square meets the box, plus the
    cell holding the box centre."""
    x0, y0, x1, y1 = box
    cells = {(i, j) for i in range(g) for j in range(g)
             if min((j + 1) / g, x1) > max(j / g, x0) and min((i + 1) / g, y1) > max(i / g, y0)}
    cells.add((min(int((y0 + y1) / 2 * g), g - 1), min(int((x0 + x1) / 2 * g), g - 1)))
    return sorted(i * g + j for i, j in cells)


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2", "clip_full"])
def test_transformers_encoder_roi_features_match_a_direct_computation(kind, tmp_path):
    import torch

    from rice_jax.labelling.features import TransformersRegionFeatures

    model = _tiny_encoder(kind, tmp_path / kind)
    vision = model.vision_model if kind == "clip_full" else model
    ext = TransformersRegionFeatures(str(tmp_path / kind))
    r = np.random.default_rng(0)
    x = r.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    lo = r.uniform(0, 0.6, (3, 4, 2))
    boxes = np.concatenate([lo, lo + r.uniform(0.05, 0.4, (3, 4, 2))], -1).clip(0, 1).astype(np.float32)
    valid = np.ones((3, 4), bool)
    got = ext(x, boxes, valid)
    # No preprocessor_config.json saved: the family's image-processor defaults (SigLIP 0.5 / 0.5),
    # CLIP's statistics otherwise.
    mean, std = (np.float32(0.5), np.float32(0.5)) if kind == "siglip" else (pipeline.CLIP_MEAN, pipeline.CLIP_STD)
    with torch.no_grad():
        pix = (x / np.float32(255) - mean) / std
        hidden = vision(pixel_values=torch.from_numpy(pix.transpose(0, 3, 1, 2).astype(np.float32).copy())
                        ).last_hidden_state.numpy()
    patches = hidden[:, -16:]
    for b in range(3):
        for n in range(4):
            want = patches[b, _cells_in_box(boxes[b, n], 4)].mean(0)
            np.testing.assert_allclose(got[b, n], want, rtol=1e-4, atol=1e-5)


def test_clustering_with_a_transformers_encoder(syn, tmp_path):
    _tiny_encoder("dinov2", tmp_path / "enc")
    d = _copy(syn, tmp_path / "c")
    rep = clustering.run(d, 6, extractor=f"transformers:{tmp_path / 'enc'}", chunk=256, features_dir=tmp_path / "f",
                         log=lambda s: None)
    assert rep["extractor"].startswith("transformers:") and rep["clusters_used"] >= 2
    assert feature_store.FeatureShards(tmp_path / "f", records.read_manifest(d)["shards"], "float16", 32).shape == \
        (rep["num_regions"], 32)


def test_jax_backend_end_to_end(syn, tmp_path):

    d = _copy(syn, tmp_path / "c")
    rep = clustering.run(d, 12, backend="jax", chunk=256, passes=10, topk=3, log=lambda s: None)
    assert rep["backend"] == "jax" and rep["clusters_used"] >= 8
    assert (tmp_path / "c" / "kmeans_state").is_dir()           # resumable between passes
    assert (labels_store.read_all(d)[1] >= 0).sum() == rep["num_regions"]
    assert rep["nmi"] > 0.3
    # Top-k per shard, beside the labels: the nearest of every region is its label.
    offsets, flat = labels_store.read_all(d)
    shards = records.read_manifest(d)["shards"]
    starts = np.concatenate([[0], np.cumsum(records.read_manifest(d)["shard_counts"])])
    n = 0
    for s, shard in enumerate(shards):
        top = np.load(d / clustering.TOPK_DIR / f"{shard}.npz")
        assert top["labels"].shape[1] == 3 and (np.diff(top["scores"], axis=1) <= 1e-6).all()
        rec = starts[s] + top["ids"][:, 0]
        np.testing.assert_array_equal(top["labels"][:, 0], flat[offsets[rec] + top["ids"][:, 1]])
        n += len(top["ids"])
    assert n == rep["num_regions"]


def test_hierarchical_clustering_command(syn, tmp_path):
    d = _copy(syn, tmp_path / "c")
    rep = clustering.run(d, 16, backend="jax", levels=2, chunk=256, passes=5, log=lambda s: None)
    assert rep["clusters_used"] >= 8 and np.load(d / clustering.CENTERS_FILE).shape[0] == 16
    with pytest.raises(ValueError, match="need --backend jax"):
        clustering.run(d, 16, backend="sklearn", levels=2, log=lambda s: None)


@pytest.mark.slow
@pytest.mark.parametrize("levels,nproc", [("1", 4), ("2", 2)])
def test_clustering_command_on_several_processes_equals_one(tmp_path, levels, nproc):
    """`python -m rice_jax.labelling.clustering --backend jax` on 4 processes x 2 CPU devices (flat) and
    2 x 4 (hierarchical), over gloo, each process extracting and labelling its own shards: the labels
    and centres of a 1-process, 8-device run."""
    import socket
    import subprocess
    import sys

    from tests.test_train import _env

    data = tmp_path / "data"
    synthetic.build(str(data), 160, seed=11, num_shards=5)      # 4 processes own 1, 1, 1 and 2 shards
    one, two = _copy(data, tmp_path / "one"), _copy(data, tmp_path / "two")
    base = [sys.executable, "-m", "rice_jax.labelling.clustering", "--k", "12", "--backend", "jax", "--passes", "6",
            "--chunk", "256", "--levels", levels]
    r = subprocess.run(base + ["--data", str(one), "--features-dir", str(tmp_path / "f1")], env=_env(8), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    procs = [subprocess.Popen(base + ["--data", str(two), "--features-dir", str(tmp_path / f"f2_{i}"),
                                      "--coordinator-address", f"127.0.0.1:{port}",
                                      "--num-processes", str(nproc), "--process-id", str(i)], env=_env(8 // nproc),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(nproc)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), "".join(o[1][-2000:] for o in outs)
    assert f"{nproc} process(es)" in outs[0][0]
    a, b = labels_store.read_all(one), labels_store.read_all(two)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(np.load(two / clustering.CENTERS_FILE), np.load(one / clustering.CENTERS_FILE),
                               rtol=1e-5, atol=1e-6)
    assert records.read_manifest(two)["clustering"]["processes"] == nproc
    # No process holds everything: process 0 (which also writes centres and the manifest) peaks
    # within 1.5x of the others.
    peak = [float(re.search(r"peak RSS (\d+) MiB", o).group(1)) for o, _ in outs]
    assert peak[0] <= 1.5 * min(peak[1:]), peak
