"""k-means on the mesh: scikit-learn parity, 8 devices == 1, memory per device ~ 1/W, resume after kill -9."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from rice_jax import sharding
from rice_jax.kmeans import MeshKMeans, compiled_memory_per_device
from tests.test_train import ROOT, _env


def _blobs(n=2000, d=16, k=21, seed=0):
    x, y = make_blobs(n, n_features=d, centers=k, cluster_std=1.5, random_state=seed)
    return x.astype(np.float32), y


@pytest.mark.parametrize("passes,seed", [(1, 0), (4, 1), (10, 2)])
def test_equals_sklearn_lloyd_given_the_same_init(passes, seed):
    x, _ = _blobs(seed=seed)
    k = 21                                  # not a multiple of 8: padded centre rows must never win
    init = x[np.random.default_rng(seed).choice(len(x), k, replace=False)]
    ref = KMeans(k, init=init, n_init=1, max_iter=passes, tol=0.0, algorithm="lloyd").fit(x)
    km = MeshKMeans(k, x.shape[1], metric="euclidean", batch_size=256, log=lambda s: None)
    km.set_centers(init)
    km.fit(x, passes=passes, init="given")
    labels, inertia = km.assign(x)
    assert abs(inertia - ref.inertia_) <= 1e-4 * ref.inertia_
    np.testing.assert_array_equal(labels, ref.labels_)
    np.testing.assert_allclose(km.centers_numpy(), ref.cluster_centers_, rtol=1e-4, atol=1e-4)


def test_eight_devices_equal_one_device():
    x, _ = _blobs(n=1500, d=12, k=10, seed=3)
    out = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = sharding.make_mesh(len(devices), 1, devices=devices)
        km = MeshKMeans(13, 12, metric="cosine", mesh=mesh, batch_size=128, seed=5, log=lambda s: None)
        km.fit(x, passes=5)
        out.append((km.centers_numpy(), km.assign(x)))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out[0][1][0], out[1][1][0])


def test_spherical_recovers_planted_clusters_and_reseeds_empty_ones():
    from sklearn.metrics import normalized_mutual_info_score

    x, y = _blobs(n=3000, d=32, k=12, seed=4)
    x -= x.mean(0)
    msgs = []
    km = MeshKMeans(12, 32, metric="cosine", batch_size=512, seed=0, log=msgs.append)
    km.fit(x, passes=15, init="kmeans++")
    labels, inertia = km.assign(x)
    assert normalized_mutual_info_score(y, labels) > 0.9
    np.testing.assert_allclose(np.linalg.norm(km.centers_numpy(), axis=1), 1.0, rtol=1e-5)
    # A centre far from all data gets no rows in the first pass and is re-seeded, not left empty.
    c = km.centers_numpy().copy()
    c[0] = 0.0
    c[0, 0] = 1.0
    far = MeshKMeans(12, 32, metric="euclidean", batch_size=512, seed=0, log=msgs.append)
    far.set_centers(np.concatenate([c[:1] * 1e4, c[1:]]))
    far.fit(x, passes=1, init="given")
    assert any("empty cluster(s) re-seeded" in m for m in msgs)
    assert np.all(np.abs(far.centers_numpy()[0]) < 1e3)


def test_memory_per_device_falls_with_device_count_at_1m_centres():
    """K = 1M, D = 256 compiled (abstract shapes, nothing allocated): per-device bytes ~ 1/W."""
    k, d, b = 1_000_000, 256, 512
    per = {}
    for w in (2, 8):
        mesh = sharding.make_mesh(w, 1, devices=jax.devices()[:w])
        per[w] = compiled_memory_per_device(k, d, b, mesh=mesh)
    full = k * d * 4
    # Arguments: centres + running sums shards (+ counts, batch): 2·K·D·4 / W, never a whole [K, D].
    assert per[8]["argument_bytes"] < 0.3 * full
    assert per[8]["argument_bytes"] == pytest.approx(per[2]["argument_bytes"] / 4, rel=0.05)
    assert per[8]["total_bytes"] == pytest.approx(per[2]["total_bytes"] / 4, rel=0.1)
    # Temporaries hold the [B, K/W] score block, never a [B, K] one.
    assert per[8]["temp_bytes"] < b * k * 4 / 4


SCRIPT = """
import sys, numpy as np
from rice_jax.kmeans import MeshKMeans
x = np.load(sys.argv[1])
km = MeshKMeans(40, x.shape[1], metric="cosine", batch_size=256, seed=7, checkpoint_dir=sys.argv[2],
                log=lambda s: print(s, flush=True))
km.fit(x, passes=int(sys.argv[3]))
np.save(sys.argv[4], km.centers_numpy())
"""


@pytest.mark.slow
def test_kill9_between_passes_then_rerun_equals_uninterrupted(tmp_path):
    x, _ = _blobs(n=20000, d=32, k=40, seed=6)
    np.save(tmp_path / "x.npy", x)
    cmd = lambda state, out: [sys.executable, "-c", SCRIPT, str(tmp_path / "x.npy"), str(state), "12", str(out)]
    subprocess.run(cmd(tmp_path / "ref_state", tmp_path / "ref.npy"), env=_env(), check=True, capture_output=True,
                   timeout=600)
    proc = subprocess.Popen(cmd(tmp_path / "state", tmp_path / "run.npy"), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 300
    for line in proc.stdout:
        if "pass 3/12" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run.npy").exists()
    res = subprocess.run(cmd(tmp_path / "state", tmp_path / "run.npy"), env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed after pass" in res.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "run.npy"), np.load(tmp_path / "ref.npy"))


def test_topk_assignment_matches_a_dense_reference():
    x, _ = _blobs(n=700, d=8, k=9, seed=8)
    km = MeshKMeans(37, 8, metric="cosine", batch_size=128, seed=1, log=lambda s: None)
    km.fit(x, passes=3)
    labels, scores = km.assign_topk(x, 5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ km.centers_numpy().T
    want = np.argsort(-sim, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(labels, want)
    np.testing.assert_allclose(scores, np.take_along_axis(sim, want, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels[:, 0], km.assign(x)[0])
