"""Input pipeline throughput: images/s at 224 px, N=10, with 0 and 2 worker processes.

    python -m benchmarks.input_pipeline [--smoke]
"""
from __future__ import annotations

import argparse
import tempfile
import time

from benchmarks.common import report


def measure(data_dir, workers: int, image_size: int, batch: int, steps: int) -> float:
    from rice_jax.data import pipeline

    cfg = pipeline.PipelineConfig(image_size=image_size, num_regions=10, batch_size=batch, worker_count=workers)
    it = iter(pipeline.make_dataset(data_dir, cfg, process_index=0, process_count=1))
    next(it)  # start-up (worker spawn, first decode) is not throughput
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--num-images", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args(argv)
    from rice_jax.data import synthetic, tokenizer

    size, batch, steps, n = (224, 32, a.steps, a.num_images) if not a.smoke else (64, 8, 3, 32)
    with tempfile.TemporaryDirectory() as d:
        synthetic.build(d, n, seed=0, gen=synthetic.GeneratorConfig(min_size=160, max_size=320))
        tokenizer.build_for_dataset(d, vocab_size=256)
        rates = {f"workers_{w}": measure(d, w, size, batch, steps) for w in (0, 2)}
    return report("input_pipeline" if not a.smoke else "input_pipeline_smoke",
                  {"image_size": size, "num_regions": 10, "batch": batch, "images_per_s": rates}, write=not a.smoke)


if __name__ == "__main__":
    main()
