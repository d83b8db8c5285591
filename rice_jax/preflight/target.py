"""What both pre-flight commands are asked about: the target slice and the step's size.

One parser for the topology string (:func:`parse`) and one definition of the flags ``plan`` and
``bench`` share (:func:`define_flags`), so ``--topology v5p:8x8x8 --num_obj_classes 1000000`` means
the same chips, hosts and loss to both.
"""
from __future__ import annotations

import dataclasses
import math

from absl import flags

from rice_jax import errors, perf


@dataclasses.dataclass(frozen=True)
class Topology:
    """A target: ``kind`` (a :data:`rice_jax.perf.CHIPS` key, or ``cpu``), its chip grid or count
    ``dims``, and the chips one host drives."""
    name: str
    kind: str
    dims: tuple[int, ...]
    chips_per_host: int

    @property
    def chips(self) -> int:
        return math.prod(self.dims)

    @property
    def hosts(self) -> int:
        return max(1, math.ceil(self.chips / self.chips_per_host))

    @property
    def is_tpu(self) -> bool:
        return self.kind in TPU_KINDS


TPU_KINDS = tuple(sorted(k for k in perf.CHIPS if not k.startswith("h")))   # h100, h200 are the GPUs


def parse(text: str, chips_per_host: int = 0, *, cpu: bool = False) -> Topology:
    """``v5p:8x8x8`` (a TPU chip grid), ``h100:64`` (a GPU count) or, with ``cpu``, ``cpu:N`` (this
    machine's devices) -> a :class:`Topology`; a one-line error naming the accepted forms otherwise.
    Counts only: no libtpu, no devices."""
    kind, _, shape = str(text).lower().partition(":")
    try:
        dims = tuple(int(d) for d in shape.split("x")) if shape else ()
    except ValueError:
        dims = ()
    known = kind in perf.CHIPS or (cpu and kind == "cpu")
    if not known or not dims or min(dims) < 1 or (kind == "cpu" and len(dims) != 1):
        forms = "cpu:N, " if cpu else ""
        raise errors.InputError(f"--topology {text!r}: use {forms}a chip and its grid or count, e.g. v5p:8x8x8, "
                                f"v6e:16x16, h100:64 (known chips: {', '.join(sorted(perf.CHIPS))})")
    per_host = chips_per_host or (dims[0] if kind == "cpu" else perf.CHIPS[kind]["chips_per_host"])
    return Topology(str(text), kind, dims, per_host)


def define_flags(default_topology: str) -> None:
    """The flags of every pre-flight command: the config, the target and the step's loss size."""
    from rice_jax import cli

    cli.define_config_flag()
    flags.DEFINE_string("topology", default_topology,
                        "the target: a TPU chip grid (v5p:4x4x4, v6e:16x16), GPUs (h100:64)"
                        + (" or this machine's CPU devices (cpu:N)" if default_topology.startswith("cpu") else ""))
    flags.DEFINE_integer("num_obj_classes", 1_000_000, "K object centres (paper: 1M); enters the step's FLOPs")
    flags.DEFINE_integer("num_ocr_classes", 0, "V OCR token centres (0 = the config's loss.num_ocr_classes, or "
                                               f"{perf.CLIP_VOCAB} — a CLIP-sized BPE vocabulary — when that is 0 too)")
    flags.DEFINE_float("mfu", 0.4, "assumed model FLOPs utilisation of the chips")
    flags.DEFINE_integer("stage", -1, "which stage's image size (default: the last)")
    flags.DEFINE_string("out", "", "also write the result as JSON here")
    flags.mark_flags_as_required(["config"])
