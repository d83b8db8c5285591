"""Mesh construction and parameter sharding rules (docs/design.md §5).

One mesh builder for the whole code base. Parameters are placed by a short
table of ``(regex on the parameter path -> tactic)`` rules, first match wins
(big_vision style), so changing the FSDP layout is a config edit.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from rice_jax import errors

MESH_AXES = ("data", "fsdp")
# The batch and the class-parallel centre matrices are split over every device.
ALL_AXES = MESH_AXES


AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None,
              axis_type: str = "auto", dcn_data: int = 1) -> Mesh:
    """A ``("data", "fsdp")`` mesh; ``-1`` for one axis takes the remaining devices.

    ``axis_type``: ``"auto"`` (the compiler propagates shardings) or ``"explicit"`` (JAX's
    sharding-in-types mode: every array's sharding is part of its type). The loss and the train
    step run on both.

    ``dcn_data``: slices of a multi-slice job (TPU slices joined by the data-centre network). The
    ``data`` axis is then ``dcn_data`` blocks, one per slice, and ``fsdp`` stays inside a slice: only
    the gradient all-reduce over ``data`` crosses the slow network, never a parameter gather (the
    hybrid layout of ``mesh_utils.create_hybrid_device_mesh``, as MaxText builds it). Devices with a
    ``slice_index`` are grouped by it; others (CPU tests) by position, in contiguous blocks."""
    if axis_type not in AXIS_TYPES:
        raise errors.InputError(f"mesh axis_type {axis_type!r}: use one of {sorted(AXIS_TYPES)}")
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise errors.InputError("at most one of data/fsdp may be -1")
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise errors.InputError(
            f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but {n} are available; "
            "set mesh sizes whose product is the device count (or -1 for one of them)"
        )
    types = (AXIS_TYPES[axis_type],) * 2
    if dcn_data == 1:
        return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=types, devices=devices)
    if dcn_data < 1 or data % dcn_data:
        raise errors.InputError(f"mesh dcn_data={dcn_data}: the data axis ({data}) must be a multiple of the number "
                                "of slices")
    ici = (data // dcn_data, fsdp)
    if all(getattr(d, "slice_index", None) is not None for d in devices):
        from jax.experimental import mesh_utils

        slices = {d.slice_index for d in devices}
        if len(slices) != dcn_data:
            raise errors.InputError(f"mesh dcn_data={dcn_data}, but the devices are in {len(slices)} slice(s)")
        grid = mesh_utils.create_hybrid_device_mesh(ici, (dcn_data, 1), devices)
    else:
        grid = np.asarray(devices, dtype=object).reshape(dcn_data * ici[0], fsdp)
    return Mesh(grid, MESH_AXES, axis_types=types)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis over all mesh axes, the rest replicated."""
    return NamedSharding(mesh, P(ALL_AXES, *([None] * (ndim - 1))))


def has_explicit_axes(mesh: Mesh) -> bool:
    return any(t == AxisType.Explicit for t in mesh.axis_types)


def conform(x: jax.Array, mesh: Mesh, spec: P) -> jax.Array:
    """``x`` laid out as ``spec`` on ``mesh`` when the mesh has Explicit axes (where an array's
    sharding is part of its type and ``shard_map`` checks it against ``in_specs``); unchanged on
    Auto meshes, where the compiler inserts the layout change itself."""
    if not has_explicit_axes(mesh):
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def path_to_str(path) -> str:
    """A jax key path as ``a/b/0/c``: the string the rules match against."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _fsdp_spec(shape: tuple[int, ...], axis_size: int, min_size: int) -> P:
    """Shard the largest axis divisible by the fsdp size; tiny arrays stay replicated."""
    if axis_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % axis_size == 0:
            spec = [None] * len(shape)
            spec[i] = "fsdp"
            return P(*spec)
    return P()


# Default rules: centre matrices class-parallel over every device, everything
# else FSDP over "fsdp" (replicated when the fsdp axis has size 1).
DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|/)centers_\w+", "class_parallel"),
    (r".*", "fsdp"),
)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, rules=DEFAULT_RULES,
             min_fsdp_size: int = 2**12) -> P:
    for pattern, tactic in rules:
        if re.search(pattern, path):
            if tactic == "replicate":
                return P()
            if tactic == "fsdp":
                return _fsdp_spec(shape, mesh.shape["fsdp"], min_fsdp_size)
            if tactic == "class_parallel":
                if shape[0] % mesh.size:
                    raise errors.InputError(
                        f"{path}: {shape[0]} rows are not divisible by the {mesh.size} devices; "
                        "pad K to a multiple of the device count (losses.padded_num_classes)"
                    )
                return P(ALL_AXES, *([None] * (len(shape) - 1)))
            raise errors.InputError(f"unknown sharding tactic {tactic!r} for {path}")
    return P()


def tree_shardings(tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for every array leaf of ``tree`` (e.g. an nnx.State)."""
    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, spec_for(path_to_str(path), shape, mesh, rules))
    return jax.tree_util.tree_map_with_path(one, tree)
