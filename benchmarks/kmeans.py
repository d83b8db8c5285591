"""k-means at scale, one run, same features: rice_jax mesh k-means vs faiss-cpu vs scikit-learn.

Features: N unit vectors in D dims drawn around 4K hidden directions (a stand-in for region
embeddings). Each method runs the same number of passes over them; reported: seconds per
pass, final inertia (squared distance on the sphere, measured the same way for all three),
and, for the mesh k-means, per-device compiled memory at K = 1M (abstract shapes; nothing is
allocated) on 2 and 8 devices, plus the projection to the paper's 2B x 1M.

    python -m benchmarks.kmeans                 # 1M x 256, K = 10K, 5 passes (several minutes)
    python -m benchmarks.kmeans --sweep         # vs faiss: D 128/256 x K 4K-16K x 3 seeds, 100K rows
    python -m benchmarks.kmeans --smoke
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import report
from rice_jax.losses import l2_normalize


def features(n: int, d: int, hidden: int, seed: int = 0) -> np.ndarray:
    r = np.random.default_rng(seed)
    dirs = r.standard_normal((hidden, d)).astype(np.float32)
    x = dirs[r.integers(0, hidden, n)] + 0.6 * r.standard_normal((n, d)).astype(np.float32)
    return l2_normalize(x)


def sphere_inertia(x: np.ndarray, centers: np.ndarray, chunk: int = 65536) -> float:
    c = l2_normalize(np.asarray(centers))
    return float(sum(np.sum(2.0 - 2.0 * (x[s:s + chunk] @ c.T).max(1)) for s in range(0, len(x), chunk)))


def compiled_memory_per_device(k: int, dim: int, batch_size: int, mesh=None) -> dict:
    """Per-device bytes of one accumulation step compiled for ``k`` centres (abstract shapes only:
    nothing is allocated). For sizing, and for the test that memory falls as 1/W."""
    import jax
    import jax.numpy as jnp

    from rice_jax.labelling.kmeans import MeshKMeans

    km = MeshKMeans(k, dim, mesh=mesh, batch_size=batch_size, log=lambda s: None)
    rows = lambda n: jax.ShapeDtypeStruct((n, dim), jnp.float32, sharding=km.row_sharding)
    vec = lambda n, dt: jax.ShapeDtypeStruct((n,), dt, sharding=km.vec_sharding)
    b = km.batch_size
    mem = km._accumulate.lower(rows(km.k_pad), rows(km.k_pad), vec(km.k_pad, jnp.int32), vec(km.k_pad, jnp.float32),
                               rows(b),
                               vec(b, jnp.bool_)).compile().memory_analysis()
    return {"argument_bytes": int(mem.argument_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes),
            "total_bytes": int(mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes)}


def run_jax(x, k, passes, seed, devices=None, precision="float32", return_model=False):
    import jax

    from rice_jax import sharding
    from rice_jax.labelling.kmeans import MeshKMeans

    devs = jax.devices()[:devices] if devices else jax.devices()
    km = MeshKMeans(k, x.shape[1], metric="cosine", batch_size=8192, seed=seed, log=lambda s: None,
                    mesh=sharding.make_mesh(len(devs), 1, devices=devs), precision=precision)
    km.init_random(x)
    km.lloyd_pass(x[:8192 * 2])             # compile outside the timing
    km.init_random(x)
    km.passes_done = 0
    t = time.perf_counter()
    km.fit(x, passes=passes, init="given")
    sec = (time.perf_counter() - t) / passes
    return (sec, km.centers_numpy(), km) if return_model else (sec, km.centers_numpy())


def precision(n: int, d: int, k: int, passes: int, seeds: int, smoke: bool) -> dict:
    """bf16 scoring (bf16 matmuls with fp32 accumulation, the two best centres of each row rescored in
    fp32) against fp32 HIGHEST, same features and init, one device: time per pass, final inertia
    ratio, and how many rows the bf16 scoring assigns to the same centre as fp32 scoring does given
    the same (fp32-trained) centres, beside plain bf16 scores' argmax (no rescoring, NumPy)."""
    import ml_dtypes
    out = []
    for seed in range(seeds):
        x = features(n, d, hidden=max(k // 2, 2), seed=seed)
        s32, c32, km32 = run_jax(x, k, passes, seed, devices=1, return_model=True)
        s16, c16, km16 = run_jax(x, k, passes, seed, devices=1, precision="bfloat16", return_model=True)
        lab32, _ = km32.assign(x)
        km16.set_centers(c32)
        lab16, _ = km16.assign(x)
        bf = lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32)  # noqa: E731
        cb = bf(l2_normalize(np.asarray(c32)))
        plain = np.concatenate([(bf(x[s:s + 8192]) @ cb.T).argmax(1) for s in range(0, len(x), 8192)])
        out.append({"seed": seed, "seconds_per_pass_fp32": s32, "seconds_per_pass_bf16": s16,
                    "speedup": s32 / s16, "inertia_ratio_bf16_over_fp32": sphere_inertia(x, c16) / sphere_inertia(x, c32),
                    "assignment_agreement": float(np.mean(lab16 == lab32)),
                    "plain_bf16_agreement": float(np.mean(plain == lab32))})
        print(f"[kmeans precision] {out[-1]}", flush=True)
    import jax

    return report("kmeans_precision" if not smoke else "kmeans_precision_smoke", {
        "N": n, "D": d, "K": k, "passes": passes, "backend": jax.default_backend(), "runs": out}, write=not smoke)


def run_faiss(x, k, passes, seed):
    import faiss

    init = x[np.sort(np.random.default_rng(seed).choice(len(x), k, replace=False))]
    km = faiss.Kmeans(x.shape[1], k, niter=passes, seed=seed, spherical=True, max_points_per_centroid=10**9)
    t = time.perf_counter()
    km.train(x, init_centroids=init)
    return (time.perf_counter() - t) / passes, km.centroids


def run_sklearn(x, k, passes, seed):
    from sklearn.cluster import MiniBatchKMeans

    r = np.random.default_rng(seed)
    init = x[np.sort(r.choice(len(x), k, replace=False))]
    b = max(8192, 2 * k)                  # partial_fit needs at least K rows per call
    km = MiniBatchKMeans(k, init=init, n_init=1, batch_size=b, random_state=seed)
    t = time.perf_counter()
    for _ in range(passes):
        for s in range(0, len(x) - b + 1, b):
            km.partial_fit(x[s:s + b])
    return (time.perf_counter() - t) / passes, km.cluster_centers_


SWEEP_SIZES = tuple((d, k) for d in (128, 256) for k in (4096, 8192, 16384))


def shape_matmul_rate(b: int, d: int, k: int) -> float:
    """FLOP/s of the scoring's own matmul shape, ``[b, d] @ [d, k]``, jitted on one device."""
    import jax
    import jax.numpy as jnp

    x, c = jnp.ones((b, d), jnp.float32), jnp.ones((k, d), jnp.float32)
    f = jax.jit(lambda x, c: x @ c.T)
    f(x, c).block_until_ready()
    best = min(_seconds(lambda: f(x, c).block_until_ready()) for _ in range(3))
    return 2.0 * b * d * k / best


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def sweep(n: int, sizes, passes: int, seeds: int, smoke: bool) -> dict:
    """Mesh k-means (one device) against faiss-cpu over sizes and seeds, same features, init and
    passes: time per pass and final inertia at every point (features, init and splits all change
    with the seed). The scoring's FLOP rate (2·N·K·D per pass over the measured time, so the
    update and the host loop count against it) is reported next to the same run's matmul rates:
    the square 2048 peak and the scoring's own ``[8192, D] @ [D, K]`` shape."""
    from rice_jax import perf

    points = []
    peak = perf.peak_flops(512 if smoke else 2048)
    for d, k in sizes:
        shape_rate = shape_matmul_rate(8192, d, k)
        for seed in range(seeds):
            x = features(n, d, hidden=max(k // 2, 2), seed=seed)
            try:
                tf, cf = run_faiss(x, k, passes, seed)
            except ImportError as e:
                return {"skipped": f"not installed ({e.name})"}
            tj, cj = run_jax(x, k, passes, seed, devices=1)
            p = {"D": d, "K": k, "seed": seed, "seconds_per_pass_jax": tj, "seconds_per_pass_faiss": tf,
                 "time_ratio_jax_over_faiss": tj / tf,
                 "inertia_ratio_jax_over_faiss": sphere_inertia(x, cj) / sphere_inertia(x, cf),
                 "jax_scoring_flop_rate": 2.0 * n * k * d / tj, "shape_matmul_flop_rate": shape_rate}
            points.append(p)
            print(f"[kmeans sweep] D={d} K={k} seed {seed}: time jax / faiss {p['time_ratio_jax_over_faiss']:.3f}, "
                  f"inertia {p['inertia_ratio_jax_over_faiss']:.5f}, scoring "
                  f"{p['jax_scoring_flop_rate'] / 1e9:.0f} GFLOP/s (shape matmul {shape_rate / 1e9:.0f}, "
                  f"peak {peak / 1e9:.0f})", flush=True)
    worst = lambda key: float(max(p[key] for p in points))
    return report("kmeans_sweep" if not smoke else "kmeans_sweep_smoke", {
        "N": n, "passes": passes, "seeds": seeds, "points": points, "peak_flops": peak,
        "max_time_ratio": worst("time_ratio_jax_over_faiss"),
        "max_inertia_ratio": worst("inertia_ratio_jax_over_faiss")}, write=not smoke)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time and inertia vs faiss over sizes and seeds")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sweep-n", type=int, default=100_000, help="rows per sweep point")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--k", type=int, default=10_000)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--precision", action="store_true", help="bf16 vs fp32 scoring: speed, inertia, agreement")
    a = ap.parse_args(argv)
    if a.precision:
        return precision(*((20_000, 32, 100, 2, 1) if a.smoke else (200_000, 256, 4096, 3, 3)), smoke=a.smoke)
    if a.sweep:
        if a.smoke:
            return sweep(4_000, ((16, 64), (32, 128)), passes=2, seeds=2, smoke=True)
        return sweep(a.sweep_n, SWEEP_SIZES, passes=a.passes, seeds=a.seeds, smoke=False)
    import jax

    from rice_jax import perf, sharding

    n, d, k, passes = (20_000, 32, 100, 2) if a.smoke else (a.n, a.d, a.k, a.passes)
    x = features(n, d, hidden=max(k // 2, 2))
    rows = {}
    import functools

    # The CPU is one device: time it as one (jax_mesh_1dev). The 8 emulated devices share its two
    # cores and run 8 small programs plus collectives where one would do (jax_mesh_8dev) — shown to
    # exercise the sharded path, not as this machine's speed.
    methods = (("jax_mesh_1dev", functools.partial(run_jax, devices=1)), ("jax_mesh_8dev", run_jax),
               ("faiss_cpu", run_faiss), ("sklearn_minibatch", run_sklearn))
    for name, fn in methods:
        try:
            sec, centers = fn(x, k, passes, seed=0)
        except ImportError as e:
            rows[name] = {"skipped": f"not installed ({e.name})"}
            continue
        rows[name] = {"seconds_per_pass": sec, "inertia": sphere_inertia(x, centers)}
        print(f"[kmeans bench] {name}: {rows[name]}", flush=True)
    mem = {}
    k_big = 1_000_000 if not a.smoke else 10_000
    for w in (2, jax.device_count()):
        mesh = sharding.make_mesh(w, 1, devices=jax.devices()[:w])
        mem[str(w)] = compiled_memory_per_device(k_big, d, 1024, mesh=mesh)
    # Projection: a Lloyd pass costs 2·N·K·D FLOPs (scores) + O(N·D); measured rate on this machine.
    flops_pass = 2.0 * n * k * d
    rate = flops_pass / rows["jax_mesh_1dev"]["seconds_per_pass"]
    paper = 2.0 * 2e9 * 1e6 * 1024
    assumed_chip = 0.5 * 459e12           # TPU v5p bf16 peak 459 TFLOP/s at an assumed 50% MFU
    projection = {"flops_per_pass_2B_x_1M_x_1024": paper, "this_machine_hours_per_pass": paper / rate / 3600,
                  "v5p_256_chips_minutes_per_pass_at_50pct": paper / (256 * assumed_chip) / 60,
                  "assumption": "TPU v5p, 459 TFLOP/s bf16 per chip, 50% of peak, 256 chips; D = 1024 (ViT-L)"}
    return report("kmeans" if not a.smoke else "kmeans_smoke", {
        "N": n, "D": d, "K": k, "passes": passes, "devices": jax.device_count(), "methods": rows,
        "jax_flop_rate": rate, "peak_flops": perf.peak_flops(1024 if a.smoke else 2048),
        "memory_per_device_k1m": {"K": k_big, "D": d, "batch": 1024, "by_devices": mem},
        "projection": projection}, write=not a.smoke)


if __name__ == "__main__":
    main()
