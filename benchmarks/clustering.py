"""Clustering throughput: handcrafted region extraction (regions/s) and assignment at K=10k, D=256.

    python -m benchmarks.clustering [--smoke]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from benchmarks.common import report, timeit


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    from rice_jax.labelling import clustering
    from rice_jax.losses import l2_normalize
    from rice_jax.data import records, synthetic

    n_img, k, d, n_feat = (200, 10_000, 256, 50_000) if not a.smoke else (10, 100, 32, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        synthetic.build(tmp, n_img, seed=0)
        src = records.RecordSource(tmp)
        t0 = time.perf_counter()
        n = sum(len(ids) for ids, _ in clustering.HandcraftedExtractor()(src, 1024))
        extract_rate = n / (time.perf_counter() - t0)
    r = np.random.default_rng(0)
    feats = l2_normalize(r.standard_normal((n_feat, d)).astype(np.float32))
    centers = l2_normalize(r.standard_normal((k, d)).astype(np.float32))
    t = timeit(lambda: clustering.assign(feats, centers, chunk=4096), warmup=1, repeats=3)
    return report("clustering" if not a.smoke else "clustering_smoke", {
        "extract_regions_per_s": extract_rate, "extractor": "handcrafted",
        "assign_regions_per_s": n_feat / t["median_s"], "K": k, "D": d}, write=not a.smoke)


if __name__ == "__main__":
    main()
