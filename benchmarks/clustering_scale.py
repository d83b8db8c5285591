"""Clustering at the paper's scale, from the layout: what each process holds and writes at 2B regions,
K = 1M; and the peak memory of each process of a 2-process run measured at two dataset sizes.

    python -m benchmarks.clustering_scale [--smoke]

The arithmetic follows what the code stores: fp16 feature files of a process's own shards
(rice_jax.labelling.feature_store), its ids (4 int32 per region) and labels (int32) while it assigns, the
label files it writes (int32 per region + offsets), the centre shard and running sums each device
holds (fp32, K/W rows), and the rows one random initialisation moves (K/W rows per device).
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import report

GIB = 2**30
SETUPS = (("v5p-128: 16 hosts x 4 chips", 16, 64), ("64 H100: 64 processes (one per GPU)", 64, 64))


def layout(regions: int, images: int, dim: int, k: int, processes: int, devices: int) -> dict:
    per_proc = regions / processes
    return {
        "features_disk_per_process_gib": per_proc * dim * 2 / GIB,
        "ids_and_labels_ram_per_process_gib": per_proc * (4 * 4 + 4) / GIB,
        "label_files_per_process_gib": (per_proc + images / processes) * 4 / GIB,
        "centres_and_sums_per_device_gib": 2 * (k / devices) * dim * 4 / GIB,
        "init_rows_per_device_gib": (k / devices) * dim * 4 / GIB,
        "label_files_total_gib": (regions + images) * 4 / GIB,
    }


def measure(images: int, tmp: Path) -> list[float]:
    """Peak RSS (MiB) of the two processes of a 2 x 4-device clustering run on ``images`` synthetic images."""
    from rice_jax.data import synthetic

    data = tmp / f"d{images}"
    synthetic.build(str(data), images, seed=0, num_shards=4)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-m", "rice_jax.labelling.clustering", "--data", str(data), "--k", "16",
                               "--backend", "jax", "--passes", "3", "--chunk", "256",
                               "--features-dir", str(tmp / f"f{images}_{i}"), "--coordinator-address",
                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(outs[0][1][-2000:] + outs[1][1][-2000:])
    return [float(re.search(r"peak RSS (\d+) MiB", o).group(1)) for o, _ in outs]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    paper = dict(regions=2_000_000_000, images=400_000_000, dim=1024, k=1_000_000)
    table = {name: layout(**paper, processes=p, devices=w) for name, p, w in SETUPS}
    sizes = (40, 80) if a.smoke else (200, 800)
    with tempfile.TemporaryDirectory() as tmp:
        measured = {str(n): measure(n, Path(tmp)) for n in sizes}
    return report("clustering_scale" if not a.smoke else "clustering_scale_smoke",
                  {"paper": paper, "layout": table, "measured_peak_rss_mib": measured}, write=not a.smoke)


if __name__ == "__main__":
    main()
