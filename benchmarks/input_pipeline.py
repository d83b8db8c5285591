"""Input pipeline throughput on real-photo JPEG records, beside the floor the hardware sets.

    python -m benchmarks.input_pipeline [--smoke]

Records come from :mod:`benchmarks.photos` (random crops of the photos scikit-learn and
scikit-image ship, as 640 x 480 and 1024 x 768 JPEGs, N = 10 boxes each): thousands of distinct
JPEGs with photo statistics, not the synthetic PNGs that decode several times faster. For each
output size (224, 336 px) and source size:

- ``bare_one_core``: one process, one thread, the pipeline's own decode + random-crop + resize
  (``RegionExampleTransform.decode_and_crop``) in a loop: what one core can do.
- ``pipeline``: :func:`rice_jax.data.pipeline.make_dataset` at its defaults (``workers="auto"``, which
  resolves to ``auto_workers`` on this host), then with 1 and 2 Grain worker processes: images/s of
  whole batches (regions chosen, labels encoded).
- ``ratio``: pipeline images/s over cores x bare one-core images/s. This machine's speed drifts by
  tens of percent within minutes, so the two are measured in alternation — bare, pipeline A, bare,
  pipeline B, ... for several rounds — and each pipeline window is divided by the mean of the bare
  windows either side of it; the median over rounds is reported, every window is kept.
- ``threads``: the whole per-example transform in 1 and in 2 threads of one process. Python's lock
  makes the second thread add less than a core; ``serial_fraction`` (Amdahl: 2 / speed-up - 1) and
  the ceiling it implies for threads (1 / serial_fraction cores) are why ``auto`` uses processes.
- ``main_process_ms_per_image``: CPU time the consuming process spends per image when 2 workers
  read (receiving and joining worker batches): its inverse bounds what one host's trainer can take in.
- ``training``: ``data_wait_fraction`` (the share of the loop's time spent waiting in
  ``next(data_iter)``) and images/s of short real training runs (the ``tiny`` model on these 8 CPU
  devices, the photo records of both sizes, their photo-of-origin labels) at 224 and 64 px: the
  pipeline sharing the two cores with the XLA step, medians over the logged intervals after the
  first (which holds the compile).
- ``draft``: the bare loop with full JPEG decoding (``jpeg_draft=False``) and the pixel difference
  of the two decodes after the resize, per image (of 255 levels).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
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


def pipeline_rate(data_dir, image_size: int, batch: int, steps: int, **overrides) -> tuple[float, float]:
    """(images/s, this process's CPU seconds per image) of ``steps`` batches after two start-up batches."""
    from rice_jax.data import pipeline

    cfg = pipeline.PipelineConfig(image_size=image_size, num_regions=10, batch_size=batch, **overrides)
    it = iter(pipeline.make_dataset(data_dir, cfg, process_index=0, process_count=1))
    next(it), next(it)  # start-up (worker spawn, first decodes) is not throughput
    c0, t0 = os.times(), time.perf_counter()
    for _ in range(steps):
        next(it)
    wall, c1 = time.perf_counter() - t0, os.times()
    del it
    return steps * batch / wall, (c1.user - c0.user + c1.system - c0.system) / (steps * batch)


def thread_scaling(data_dir, image_size: int, seconds: float) -> dict:
    """The whole per-example transform (records parsed, decode, crop, regions, labels) in one thread
    and in two threads of this process: images/s, speed-up and the serial share it implies."""
    from rice_jax.data import labels, pipeline, records
    from rice_jax.data.tokenizer import for_dataset

    src = records.RecordSource(data_dir)
    tr = pipeline.RegionExampleTransform(pipeline.PipelineConfig(image_size=image_size, num_regions=10),
                                         for_dataset(data_dir), labels.open_labels(data_dir, records.read_manifest(data_dir)),
                                         where=src.where)
    raws = [src.raw(i) for i in range(min(len(src), 256))]

    def run(threads: int) -> float:
        counts = [0] * threads

        def loop(k):
            rng, n, t0 = np.random.default_rng(k), k * 97, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                tr((n % len(raws), raws[n % len(raws)]), rng)
                n, counts[k] = n + 1, counts[k] + 1
        pool = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
        t0 = time.perf_counter()
        [t.start() for t in pool], [t.join() for t in pool]
        return sum(counts) / (time.perf_counter() - t0)

    one, two = run(1), run(2)
    speedup = two / one
    serial = min(1.0, max(2 / speedup - 1, 1e-3))
    return {"one_thread": one, "two_threads": two, "speedup": speedup, "serial_fraction": serial,
            "thread_ceiling_cores": 1 / serial}


def alternate(data_dir, image_size: int, batch: int, steps: int, configs: dict, rounds: int, secs: float, cores: int):
    """Pipeline windows of each config in turn, a bare one-core window before and after each."""
    windows = {name: [] for name in configs}
    bare = [bare_rate(data_dir, image_size, secs)]
    for _ in range(rounds):
        for name, overrides in configs.items():
            rate, cpu = pipeline_rate(data_dir, image_size, batch, steps, **overrides)
            bare.append(bare_rate(data_dir, image_size, secs))
            floor = cores * (bare[-2] + bare[-1]) / 2
            windows[name].append({"images_per_s": rate, "ratio": rate / floor, "main_process_cpu_s_per_image": cpu})
    summary = {name: {"images_per_s": statistics.median(w["images_per_s"] for w in ws),
                      "ratio_to_cores_x_bare": statistics.median(w["ratio"] for w in ws),
                      "main_process_ms_per_image": 1e3 * statistics.median(w["main_process_cpu_s_per_image"] for w in ws),
                      "windows": ws} for name, ws in windows.items()}
    return summary, bare


def train_wait(data_dir, image_size: int, steps: int, log_every: int, num_classes: int) -> dict:
    """A short real training run on ``data_dir``: medians of its logged intervals after the first."""
    from rice_jax import train
    from rice_jax.configs.rice import get_config

    c = get_config("tiny")
    c.data.dir = str(data_dir)
    c.loss.num_obj_classes, c.loss.ocr_weight = num_classes, 0.0     # photo-of-origin labels, no text
    c.stages = ((steps, image_size),)
    c.log_every, c.progress_bar, c.checkpoint_every = log_every, False, 10**9
    with tempfile.TemporaryDirectory() as wd:
        hist = train.train(c, wd)["history"]
    later = hist[1:]
    med = lambda k: statistics.median(h[k] for h in later)
    return {"image_size": image_size, "steps": steps, "batch": c.batch_size, "images_per_s": med("images_per_s"),
            "step_time_s": med("step_time_s"), "data_wait_fraction": med("data_wait_fraction"),
            "data_wait_fraction_per_interval": [h["data_wait_fraction"] for h in hist],
            "loss_first": hist[0]["loss"], "loss_last": hist[-1]["loss"]}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--num-images", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=48)   # batches per pipeline window (~2-4 s here)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    from benchmarks import photos
    from rice_jax.data import pipeline

    cores = pipeline.usable_cores()
    if a.smoke:
        sources, sizes, n, batch, steps, secs, rounds = ((160, 120),), (64,), 32, 8, 2, 0.2, 1
    else:
        sources, sizes, n, batch, steps, secs, rounds = ((640, 480), (1024, 768)), (224, 336), a.num_images, 32, a.steps, 1.5, a.rounds
    configs = {"default": {}, "workers_1": {"workers": 1}, "workers_2": {"workers": 2}}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for src_size in sources:
            d = os.path.join(tmp, f"{src_size[0]}x{src_size[1]}")
            photos.build(d, n, (src_size,), num_shards=4)
            mean_kb = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) / n / 1024
            for size in sizes:
                summary, bares = alternate(d, size, batch, steps, configs, rounds, secs, cores)
                bare = statistics.median(bares)
                full_decode = bare_rate(d, size, secs, jpeg_draft=False)
                draft_bare = bare_rate(d, size, secs)
                run = {"source": f"{src_size[0]}x{src_size[1]}", "jpeg_kib": mean_kb, "image_size": size,
                       "bare_one_core": bare, "bare_windows": bares, "pipeline": summary,
                       "threads": thread_scaling(d, size, secs),
                       "bare_full_decode": full_decode, "draft_speedup": draft_bare / full_decode,
                       "draft_pixel_difference": draft_difference(d, size, 64 if not a.smoke else 4)}
                runs.append(run)
                print(f"[input_pipeline] {run['source']} -> {size}px: bare {bare:.0f} img/s/core, "
                      + ", ".join(f"{k} {v['images_per_s']:.0f} ({v['ratio_to_cores_x_bare']:.2f}x)" for k, v in summary.items())
                      + f"; 2 threads {run['threads']['speedup']:.2f}x one", flush=True)
        d = os.path.join(tmp, "mixed")
        photos.build(d, n, sources, num_shards=4)
        num_classes = len(photos.bundled_photos())
        training = ([train_wait(d, 32, 6, 2, num_classes)] if a.smoke else
                    [train_wait(d, 224, 40, 10, num_classes), train_wait(d, 64, 160, 20, num_classes)])
        for t in training:
            print(f"[input_pipeline] training at {t['image_size']} px: {t['images_per_s']:.0f} img/s, "
                  f"data_wait_fraction {t['data_wait_fraction']:.3f}", flush=True)
    return report("input_pipeline" if not a.smoke else "input_pipeline_smoke",
                  {"num_regions": 10, "batch": batch, "cores": cores, "rounds": rounds,
                   "default_workers": pipeline.resolve_workers("auto"), "runs": runs, "training": training},
                  write=not a.smoke)


if __name__ == "__main__":
    main()
