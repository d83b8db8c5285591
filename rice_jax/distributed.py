"""Joining a multi-process job, and the few host-side collectives the commands use.

Every command that can run on several processes (training, clustering, k-means) takes the same
flags — ``--coordinator-address HOST:PORT --num-processes P --process-id I`` for a local CPU run
(gloo collectives), or ``--distributed`` to read everything from the environment (TPU pods,
SLURM) — and joins with :func:`join`. The helpers below move small numpy arrays between
processes (one ``process_allgather`` each) and are free on one process.
"""
from __future__ import annotations

import jax
import numpy as np


def add_flags(ap) -> None:
    """The multi-process flags of an ``argparse`` parser (``rice_jax.train`` defines the same names
    through absl: :func:`define_absl_flags`)."""
    ap.add_argument("--coordinator-address", default="", help="host:port: local multi-process CPU run (gloo)")
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--distributed", action="store_true",
                    help="jax.distributed.initialize() from the environment (TPU pods, SLURM)")


def define_absl_flags() -> None:
    """The same flags, same spelling, for an absl command (``rice_jax.train``); read them back with
    :func:`absl_args`."""
    from absl import flags

    flags.DEFINE_string("coordinator-address", "", "host:port: local multi-process CPU run (gloo)")
    flags.DEFINE_integer("num-processes", 1, "with --coordinator-address")
    flags.DEFINE_integer("process-id", 0, "with --coordinator-address")
    flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() from the environment (TPU pods, SLURM)")


def absl_args():
    """The flags of :func:`define_absl_flags` as the namespace :func:`join` takes."""
    import types

    from absl import flags

    f = flags.FLAGS
    return types.SimpleNamespace(coordinator_address=f["coordinator-address"].value,
                                 num_processes=f["num-processes"].value, process_id=f["process-id"].value,
                                 distributed=f["distributed"].value)


def join(args) -> None:
    """Join the job described by the flags above (an argparse namespace or absl's FLAGS); no-op for
    one process."""
    if args.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif args.distributed:
        jax.distributed.initialize()


def _allgather(x, tiled: bool = False) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=tiled))


def all_true(flag: bool) -> bool:
    """True only if ``flag`` is true on every process."""
    if jax.process_count() == 1:
        return flag
    return bool(np.all(_allgather(np.array([flag], np.int32))))


def max_over_processes(v: int) -> int:
    if jax.process_count() == 1:
        return int(v)
    return int(np.max(_allgather(np.asarray([v], np.int64))))


def slice_offsets(n_local: int) -> tuple[int, int]:
    """(global index of this process's first row, total rows) when processes hold contiguous slices
    in process order."""
    if jax.process_count() == 1:
        return 0, n_local
    counts = _allgather(np.asarray([n_local], np.int64)).reshape(-1)
    return int(np.sum(counts[: jax.process_index()])), int(np.sum(counts))


def sum_over_processes(x: np.ndarray) -> np.ndarray:
    """Elementwise sum of every process's ``x`` (same shape everywhere)."""
    if jax.process_count() == 1:
        return x
    return _allgather(x).sum(axis=0)


def to_host(a: jax.Array) -> np.ndarray:
    """A (possibly multi-process) sharded array as one numpy array on every process."""
    if a.is_fully_addressable:
        return np.asarray(jax.device_get(a))
    return _allgather(a, tiled=True)


def gather_rows(x: np.ndarray) -> np.ndarray:
    """Every process's rows of ``x`` concatenated in process order, on every process (rows may differ
    in number between processes)."""
    if jax.process_count() == 1:
        return x
    n = max_over_processes(len(x))
    counts = _allgather(np.asarray([len(x)], np.int64)).reshape(-1)
    padded = np.zeros((n,) + x.shape[1:], x.dtype)
    padded[: len(x)] = x
    allx = _allgather(padded)
    return np.concatenate([allx[p, : counts[p]] for p in range(len(counts))])


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name``."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
