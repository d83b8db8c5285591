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


def random_batch(batch: int, image: int, regions: int, max_labels: int, num_labels: int, seed: int = 0) -> dict:
    """A per-process batch with the pipeline's keys, shapes and dtypes (random content), for timing
    the train step without the input pipeline."""
    import numpy as np

    r = np.random.default_rng(seed)
    lo = r.uniform(0, 0.6, (batch, regions, 2))
    return {"image": r.standard_normal((batch, image, image, 3)).astype(np.float32),
            "boxes": np.concatenate([lo, lo + 0.3], -1).clip(0, 1).astype(np.float32),
            "region_valid": np.ones((batch, regions), bool),
            "region_kind": (r.random((batch, regions)) < 0.3).astype(np.int32),
            "labels": r.integers(0, num_labels, (batch, regions, max_labels)).astype(np.int32),
            "image_ok": np.ones(batch, bool)}


def torch_threads(n: int | None = None):
    """Give PyTorch the same cores JAX uses (all of them by default)."""
    import torch

    torch.set_num_threads(n or os.cpu_count())
    return torch
