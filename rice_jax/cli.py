"""How every ``python -m rice_jax.*`` command ends on an expected failure: one line, exit code 2.

Expected failures are bad input the user can fix — a missing dataset or tokenizer, a damaged
shard or checkpoint, a config value out of range; their messages already name the file or
field and the command to run. A traceback would bury that line. Set ``RICE_JAX_TRACEBACK=1``
to get the traceback anyway. Anything else (a bug) still raises normally.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

EXIT_BAD_INPUT = 2


def first_line(err: BaseException, max_chars: int = 300) -> str:
    """``"TypeName: first non-empty line of the message"``: how errors are quoted inside our own
    one-line messages (a damaged shard's reader error, an unreadable checkpoint's)."""
    lines = [l.strip() for l in str(err).splitlines() if l.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:max_chars]


def expected_errors() -> tuple[type[BaseException], ...]:
    from rice_jax.checkpoint import CheckpointDamaged, CheckpointIncompatible
    from rice_jax.data.records import RecordError

    return (FileNotFoundError, NotADirectoryError, RecordError, CheckpointDamaged, CheckpointIncompatible, ValueError)


def run(fn: Callable[[], object]) -> object:
    """Call ``fn()``; on an expected error print ``error: <first line>`` to stderr and exit 2."""
    try:
        return fn()
    except expected_errors() as e:
        if os.environ.get("RICE_JAX_TRACEBACK"):
            raise
        lines = [l for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
        print(f"error: {lines[0]}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


def add_distributed_flags(ap) -> None:
    """The multi-process flags of the argparse commands (train has the same ones through absl)."""
    ap.add_argument("--coordinator-address", default="", help="host:port: local multi-process CPU run (gloo)")
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--distributed", action="store_true",
                    help="jax.distributed.initialize() from the environment (TPU pods, SLURM)")


def init_distributed(args) -> None:
    """Join the job described by :func:`add_distributed_flags` (no-op for a single process)."""
    import jax

    if args.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif args.distributed:
        jax.distributed.initialize()
