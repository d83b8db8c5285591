"""Pre-flight: will this host's input pipeline feed its chips? Run it on one training host, on the
run's own records, before queueing for the slice.

    python -m rice_jax.preflight.bench --data DIR --config rice_jax/configs/rice.py:l14_336 \\
        --topology v5p:8x8x8 [--config.batch_size=32768] [--config.data.workers=auto] [--seconds 30]

Two numbers, side by side:

- **supply**: images/s this host's pipeline delivers — :func:`rice_jax.data.pipeline.make_dataset`
  with the config's ``c.data`` settings (``data.workers`` resolved on this host), the last stage's
  image size (``--stage``) and this host's share of the global batch, over ``--seconds`` after the
  first batch. Whole batches: records read, decoded, cropped, regions chosen, labels encoded.
- **demand**: images/s per host that the chips consume at the planner's projection —
  :func:`rice_jax.perf.project`: the step's model FLOPs over chips x datasheet peak x ``--mfu`` —
  divided by the topology's hosts (``chips_per_host`` in :data:`rice_jax.perf.CHIPS`, or
  ``--chips_per_host``). The projection needs no TPU and no compile; ``launch/plan.sh`` compiles the
  step for the memory verdict.

The verdict is ``input keeps up (N x headroom)`` or ``input-bound by N x`` with what to change:
more reading processes (``data.workers``), more cores per host, or smaller source JPEGs (decoding
cost grows with the stored size; JPEG draft decoding only helps when it is >= 2x the crop). A JSON
line follows (``--out`` writes it too).
"""
from __future__ import annotations

import math
import os
import threading
import time

from absl import flags

from rice_jax import cli, errors, perf
from rice_jax.data import pipeline, records
from rice_jax.preflight import target


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (Linux /proc): the Grain workers of a reading process."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(") ", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _usage(pid: int) -> tuple[int, int]:
    """``(open file descriptors, resident bytes)`` of one process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return fds, rss


class ReaderUsage:
    """Peak descriptors and resident memory of each reading process while it runs: the Grain workers
    (children of this process), or this process when it reads in-process (unless ``workers_only``). Sampled every
    ``every_s`` in a thread; :meth:`stop` returns ``{"processes", "peak_fds", "peak_fds_growth",
    "peak_rss_bytes"}`` (growth: over each process's first sample, what reading many shards adds)."""

    def __init__(self, every_s: float = 0.05, *, workers_only: bool = False):
        self.every_s, self.workers_only, self._first, self._peak = every_s, workers_only, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self):
        me = os.getpid()
        for pid in _children(me) or ([] if self.workers_only else [me]):
            try:
                fds, rss = _usage(pid)
            except (OSError, StopIteration):
                continue
            self._first.setdefault(pid, fds)
            f, r = self._peak.get(pid, (0, 0))
            self._peak[pid] = (max(f, fds), max(r, rss))

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.every_s)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        peaks = self._peak.values()
        return {"processes": len(self._peak), "peak_fds": max((f for f, _ in peaks), default=0),
                "peak_fds_growth": max((self._peak[p][0] - self._first[p] for p in self._peak), default=0),
                "peak_rss_bytes": max((r for _, r in peaks), default=0)}


def host_supply(data_dir, c, *, per_host_batch: int, image_size: int, seconds: float) -> dict:
    """Images/s of this host's pipeline with the config's data settings, after its first batch."""
    cfg = pipeline.config_from_section(c.data, image_size=image_size, batch_size=per_host_batch, seed=c.seed)
    workers = pipeline.resolve_workers(cfg.workers)
    t_start = time.perf_counter()
    usage = ReaderUsage()
    it = iter(pipeline.make_dataset(data_dir, cfg, process_index=0, process_count=1))
    first = next(it)                       # start-up: worker spawn, first decodes
    startup = time.perf_counter() - t_start
    n, bad, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3 * per_host_batch:
        b = next(it)
        n += per_host_batch
        bad += int((~b["image_ok"]).sum())
    wall = time.perf_counter() - t0
    readers = usage.stop()
    del it, first
    return {"images_per_s": n / wall, "images": n, "seconds": wall, "startup_s": startup, "readers": readers,
            "undecodable": bad, "workers": workers, "threads": cfg.threads, "cores": pipeline.usable_cores(),
            "per_host_batch": per_host_batch, "image_size": image_size}


def verdict(supply: dict, demand_per_host: float) -> tuple[str, str]:
    """``(headline, what to change)``."""
    ratio = supply["images_per_s"] / demand_per_host
    if ratio >= 1:
        return f"input keeps up ({ratio:.1f}x headroom)", ""
    cores, workers = supply["cores"], supply["workers"]
    readers = max(1, workers) if workers else min(cores, 3)   # threads of one process top out near 3 cores
    per_reader = supply["images_per_s"] / readers
    need = math.ceil(demand_per_host / per_reader)
    change = [f"each reading process gives ~{per_reader:,.0f} img/s here, so ~{need} are needed"]
    if need <= max(cores - 1, 1):
        change.append(f"set --config.data.workers={need} (this host has {cores} usable cores; "
                      f"data.workers={workers} now)")
    else:
        change.append(f"this host has only {cores} usable cores: use hosts with more cores, store smaller JPEGs "
                      "(decode cost follows the stored size), or pre-resize the records near the training size")
    return f"input-bound by {1 / ratio:.1f}x", "; ".join(change)


def main(argv):
    del argv
    F = flags.FLAGS
    c = cli.absl_config("config")
    data_dir = F.data or c.data.dir
    if not data_dir:
        raise errors.InputError("--data DIR (or --config.data.dir): the region records to read")
    topo = target.parse(F.topology, F.chips_per_host)
    kind, chips, hosts = topo.kind, topo.chips, topo.hosts
    image_size = int(c.stages[F.stage][1])
    if c.batch_size % hosts:
        raise errors.InputError(f"batch_size {c.batch_size} does not split over the {hosts} hosts of {F.topology}")
    spec = perf.chip(kind)
    demand = perf.project(c, F.num_obj_classes, perf.ocr_classes(c, F.num_ocr_classes), image_size, chips,
                          spec["bf16_flops"], F.mfu)
    per_host = demand["images_per_s"] / hosts
    supply = host_supply(data_dir, c, per_host_batch=c.batch_size // hosts, image_size=image_size,
                         seconds=F.seconds)
    head, change = verdict(supply, per_host)
    print(f"[bench] this host reads {supply['images_per_s']:,.0f} img/s ({supply['image_size']} px, batch "
          f"{supply['per_host_batch']:,} per host, data.workers -> {supply['workers']} worker processes x "
          f"{supply['threads']} threads, {supply['cores']} cores; {supply['undecodable']} undecodable)", flush=True)
    u = supply["readers"]
    print(f"[bench] each reading process peaked at {u['peak_fds']} open files (+{u['peak_fds_growth']} while reading) "
          f"and {u['peak_rss_bytes'] / 2**20:,.0f} MiB resident ({u['processes']} process(es); bounds: "
          f"{records.MAX_OPEN_SHARDS} shard readers + {records.MAX_OPEN_SHARDS} label maps)", flush=True)
    print(f"[bench] the chips take {per_host:,.0f} img/s per host ({c.model.backbone}, {F.topology}: {chips} chips "
          f"on {hosts} hosts, {demand['images_per_s']:,.0f} img/s at {F.mfu:.0%} MFU)", flush=True)
    print(f"[bench] {head}" + (f": {change}" if change else ""), flush=True)
    out = {"topology": F.topology, "chips": chips, "hosts": hosts, "demand_images_per_s": demand["images_per_s"],
           "demand_per_host": per_host, "mfu_assumed": F.mfu, "supply": supply,
           "ratio": supply["images_per_s"] / per_host, "verdict": head, "change": change}
    cli.emit_json(out, F.out)


if __name__ == "__main__":
    target.define_flags("v5p:4x4x4")
    flags.DEFINE_string("data", "", "region records to read (default: the config's data.dir)")
    flags.DEFINE_integer("chips_per_host", 0, "chips one host drives (0 = the chip's usual: 4 for TPUs, 8 for GPUs)")
    flags.DEFINE_float("seconds", 20.0, "how long to measure after the first batch")
    cli.run_absl(main)
