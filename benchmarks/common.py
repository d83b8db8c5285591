"""Timing and reporting helpers shared by the benchmark scripts.

Every benchmark prints one JSON line per result and writes
``benchmarks/results/<name>.json``. Machines here are noisy: compare numbers
only within one run (ratios), never across runs.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def timeit(fn, *, warmup: int = 2, repeats: int = 5, min_seconds: float = 0.0) -> dict:
    """Median/min wall time of ``fn()`` (which must block until its work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    t_start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - t_start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "n": len(times)}


def machine_info() -> dict:
    import jax

    return {
        "host": platform.node(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
        "backend": jax.default_backend(), "devices": jax.device_count(),
    }


def report(name: str, record: dict, *, write: bool = True) -> dict:
    record = {"benchmark": name, **record, "machine": machine_info(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(json.dumps(record), flush=True)
    if write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def load_result(name: str) -> dict | None:
    """The record :func:`report` last wrote for benchmark ``name`` (None when it has not run)."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def torch_threads(n: int | None = None):
    """Give PyTorch the same cores JAX uses (all of them by default)."""
    import torch

    torch.set_num_threads(n or os.cpu_count())
    return torch


def add_synthetic_run_flags(ap, *, steps: int, seeds: list[int], images: int, steps_help: str = "training steps"):
    """The flags of the benchmarks that train on generated synthetic data (ablation, reading)."""
    ap.add_argument("--steps", type=int, default=steps, help=steps_help)
    ap.add_argument("--seeds", type=int, nargs="+", default=seeds)
    ap.add_argument("--images", type=int, default=images, help="training images generated per seed")
    ap.add_argument("--eval-images", type=int, default=512, help="held-out images (generator seed + 1)")
    ap.add_argument("--data-root", default=None, help="keep the generated data here between runs")
    ap.add_argument("--smoke", action="store_true")
