"""Input pipeline throughput on real-photo JPEG records, beside the floor the hardware sets.

    python -m benchmarks.input_pipeline [--smoke]

Records come from :mod:`rice_jax.data.photos` (random crops of the photos scikit-learn and
scikit-image ship, as 640 x 480 and 1024 x 768 JPEGs, N = 10 boxes each): thousands of distinct
JPEGs with photo statistics, not the synthetic PNGs that decode several times faster. For each
output size (224, 336 px) and source size:

- ``bare_one_core``: one process, one thread, the pipeline's own decode + random-crop + resize
  (``RegionExampleTransform.decode_and_crop``) in a loop: what one core can do. Measured before
  and after the pipeline runs (the machine drifts); the median of both is the floor's unit.
- ``pipeline``: :func:`rice_jax.data.pipeline.make_dataset` at its defaults, then with 1 and 2
  Grain worker processes: images/s of whole batches (regions chosen, labels encoded).
- ``ratio``: pipeline images/s over cores x bare one-core images/s.
- ``draft``: the bare loop with full JPEG decoding (``jpeg_draft=False``) and the pixel difference
  of the two decodes after the resize, per image (of 255 levels).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from benchmarks.common import report


def bare_rate(data_dir, image_size: int, seconds: float, jpeg_draft: bool = True) -> float:
    """Images/s of the decode + crop + resize loop in this thread."""
    from rice_jax.data import pipeline, records

    src = records.RecordSource(data_dir)
    tr = pipeline.RegionExampleTransform(pipeline.PipelineConfig(image_size=image_size, jpeg_draft=jpeg_draft))
    rng = np.random.default_rng(0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 8:
        tr.decode_and_crop(src[n % len(src)], rng)
        n += 1
    return n / (time.perf_counter() - t0)


def draft_difference(data_dir, image_size: int, n: int) -> dict:
    """Pixels of the same random crops decoded with and without JPEG DCT scaling, after the resize:
    mean / p95 / max of the per-image mean absolute difference (of 255 levels)."""
    from rice_jax.data import pipeline, records

    src = records.RecordSource(data_dir)
    on, off = (pipeline.RegionExampleTransform(pipeline.PipelineConfig(image_size=image_size, jpeg_draft=d))
               for d in (True, False))
    d = [float(np.abs(on.decode_and_crop(src[i], np.random.default_rng(i))[0].astype(np.int16)
                      - off.decode_and_crop(src[i], np.random.default_rng(i))[0]).mean()) for i in range(min(n, len(src)))]
    return {"mean": float(np.mean(d)), "p95": float(np.percentile(d, 95)), "max": float(np.max(d))}


def pipeline_rate(data_dir, image_size: int, batch: int, steps: int, **overrides) -> float:
    from rice_jax.data import pipeline

    cfg = pipeline.PipelineConfig(image_size=image_size, num_regions=10, batch_size=batch, **overrides)
    it = iter(pipeline.make_dataset(data_dir, cfg, process_index=0, process_count=1))
    next(it), next(it)  # start-up (worker spawn, first decodes) is not throughput
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--num-images", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args(argv)
    from rice_jax.data import photos

    cores = os.cpu_count() or 1
    if a.smoke:
        sources, sizes, n, batch, steps, secs = ((160, 120),), (64,), 32, 8, 2, 0.2
    else:
        sources, sizes, n, batch, steps, secs = ((640, 480), (1024, 768)), (224, 336), a.num_images, 32, a.steps, 3.0
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for src_size in sources:
            d = os.path.join(tmp, f"{src_size[0]}x{src_size[1]}")
            photos.build(d, n, (src_size,), num_shards=4)
            mean_kb = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) / n / 1024
            for size in sizes:
                before = bare_rate(d, size, secs)
                rates = {"default": pipeline_rate(d, size, batch, steps),
                         "workers_1": pipeline_rate(d, size, batch, steps, worker_count=1),
                         "workers_2": pipeline_rate(d, size, batch, steps, worker_count=2)}
                after = bare_rate(d, size, secs)
                bare = statistics.median([before, after])
                full_decode = bare_rate(d, size, secs, jpeg_draft=False)
                run = {"source": f"{src_size[0]}x{src_size[1]}", "jpeg_kib": mean_kb, "image_size": size,
                       "bare_one_core": bare, "bare_before_after": [before, after], "pipeline": rates,
                       "ratio_to_cores_x_bare": {k: v / (cores * bare) for k, v in rates.items()},
                       "bare_full_decode": full_decode, "draft_speedup": bare / full_decode,
                       "draft_pixel_difference": draft_difference(d, size, 64 if not a.smoke else 4)}
                runs.append(run)
                print(f"[input_pipeline] {run['source']} -> {size}px: bare {bare:.0f} img/s/core, "
                      + ", ".join(f"{k} {v:.0f} ({v / (cores * bare):.2f}x)" for k, v in rates.items()), flush=True)
    return report("input_pipeline" if not a.smoke else "input_pipeline_smoke",
                  {"num_regions": 10, "batch": batch, "cores": cores, "runs": runs}, write=not a.smoke)


if __name__ == "__main__":
    main()
