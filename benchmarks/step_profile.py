"""Where a CPU train step's time goes, op category by op category: JAX (XLA:CPU) vs PyTorch eager.

Both sides run the step of ``benchmarks/train_step.py`` (ViT + margin softmax + AdamW, same batch,
same cores) under their own profiler, and every executed op is put in one of the categories below
and in a phase (forward, backward, optimiser):

- JAX: ``jax.profiler`` records one event per executed HLO thunk (``hlo_op`` = the instruction's
  name in the compiled module). The instruction's phase comes from its ``op_name`` metadata
  (``transpose(jvp(...))`` = backward, ``jvp(...)`` = forward, the rest = optimiser and bookkeeping);
  its category from the operations inside it (a fusion is classified by the ops of the computation
  it calls: ``erf`` → GELU, ``rsqrt`` → LayerNorm, a dot over the ``bhq..`` einsum → attention...).
- PyTorch: ``torch.profiler`` self-times per ATen op; the phase comes from the op's ancestors
  (``autograd::engine`` → backward, ``Optimizer.step`` → optimiser), the category from its name
  (RoPE: HF's rotary function runs under a profiler label; its backward is "other elementwise").

XLA:CPU may run independent thunks concurrently, so JAX's summed op time can exceed the step's
wall time; the table shows both. Categories are coarse on purpose: the point is to see which
kind of work is slower on one side, not to attribute every microsecond.

    python -m benchmarks.step_profile [--preset vit_b16_224 --batch 8]   # writes results/step_profile.json
    python -m benchmarks.step_profile --smoke
"""
from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile
import time

import jax

from benchmarks.common import report
from benchmarks.train_step import build_jax_step, build_torch_step, parse_step_arguments, step_arguments

CATEGORIES = ("linear matmuls", "attention", "LayerNorm", "GELU", "RoPE", "loss", "layout copies / transposes",
              "other elementwise", "collectives")
PHASES = ("forward", "backward", "optimizer")

# ----------------------------------------------------------------------------- JAX side
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) (\S+?)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY )?%(\S+) .*\{\s*$")
_TABLE_ROW = re.compile(r"^(\d+) (.*)$")


def _source_tables(text: str) -> dict:
    """Stack frame id -> function names, innermost first, from the module text's FileNames /
    FunctionNames / FileLocations / StackFrames tables."""
    tables, current = collections.defaultdict(dict), None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = line
            continue
        if current is None:
            continue
        m = _TABLE_ROW.match(line)
        if not m:
            if line.startswith(("HloModule", "%", "ENTRY")) or " = " in line:
                current = None
            continue
        tables[current][int(m.group(1))] = m.group(2)
    functions = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
    files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
    locations = {k: (int(re.search(r"function_name_id=(\d+)", v).group(1)),
                     int(re.search(r"file_name_id=(\d+)", v).group(1))) for k, v in tables["FileLocations"].items()}
    frames = {k: (int(re.search(r"file_location_id=(\d+)", v).group(1)),
                  int(re.search(r"parent_frame_id=(\d+)", v).group(1))) for k, v in tables["StackFrames"].items()}

    def chain(fid: int) -> tuple:
        out, seen = [], set()
        while fid in frames and fid not in seen:
            seen.add(fid)
            loc, parent = frames[fid]
            fn, fl = locations.get(loc, (0, 0))
            out.append(f"{files.get(fl, '?')}:{functions.get(fn, '?')}")
            fid = parent
        return tuple(out)

    return {fid: chain(fid) for fid in frames}


def parse_hlo(text: str) -> tuple[dict, dict]:
    """``(instructions, computations)`` of a compiled HLO module's text: instruction name ->
    (opcode, shape, called computation, op_name, source functions innermost first), and
    computation name -> its set of opcodes (nested calls included)."""
    sources = _source_tables(text)
    instrs, comps, calls, current = {}, collections.defaultdict(set), collections.defaultdict(set), None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m:
            current = m.group(1)
            continue
        m = _INSTR.match(line)
        if not m or current is None:
            continue
        name, shape, opcode, rest = m.groups()
        called = re.search(r"calls=%([\w.\-]+)", rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        frame = re.search(r"stack_frame_id=(\d+)", rest)
        instrs[name] = (opcode, shape, called.group(1) if called else None, op_name.group(1) if op_name else "",
                        sources.get(int(frame.group(1)), ()) if frame else ())
        comps[current].add(opcode)
        if called:
            calls[current].add(called.group(1))
        if "__ynn_fusion" in rest or "__onednn" in rest:
            comps[current].add("library-fusion")

    def closure(c, seen=()):
        out = set(comps.get(c, ()))
        for sub in calls.get(c, ()):
            if sub not in seen:
                out |= closure(sub, (*seen, c))
        return out

    return instrs, {c: closure(c) for c in comps}


def jax_phase(op_name: str) -> str:
    if "transpose(jvp" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    return "optimizer"


# Source functions (innermost first) that name a category, checked in this order.
_SOURCE_CATEGORIES = (("vit.py:attention", "attention"), ("gelu_exact", "GELU"), ("LayerNorm.", "LayerNorm"),
                      ("apply_rope", "RoPE"), ("ViT.rope", "RoPE"), ("rope_angles", "RoPE"), ("losses.py", "loss"))
_LAYOUT = {"copy", "transpose", "bitcast", "parameter", "slice", "concatenate", "pad", "reshape", "broadcast",
           "get-tuple-element", "tuple", "constant", "dynamic-slice", "dynamic-update-slice"}


def jax_category(opcode: str, ops: set, source: tuple) -> str:
    if opcode in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute") or \
            ops & {"all-reduce", "all-gather", "reduce-scatter"}:
        return "collectives"
    where = next((cat for fn in source for key, cat in _SOURCE_CATEGORIES if key in fn), None)
    if where in ("attention", "loss"):
        return where
    if opcode == "dot" or "dot" in ops or "library-fusion" in ops or "convolution" in ops:
        return "linear matmuls"
    if where:
        return where
    if ops <= _LAYOUT:
        return "layout copies / transposes"
    return "other elementwise"


def profile_jax(run, compiled, steps: int, top_n: int = 8) -> dict:
    from jax.profiler import ProfileData

    instrs, comps = parse_hlo(compiled.as_text())
    run()  # warm
    out = {p: collections.Counter() for p in PHASES}
    unknown, per_op = collections.Counter(), collections.Counter()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d):
            for _ in range(steps):
                run()
        wall = (time.perf_counter() - t0) / steps
        data = ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                stats = dict(ev.stats)
                name = stats.get("hlo_op")
                if not name:
                    continue
                if name not in instrs:
                    unknown[name] += ev.duration_ns
                    continue
                opcode, _, called, op_name, source = instrs[name]
                ops = comps.get(called, set()) | {opcode}
                phase, cat = jax_phase(op_name), jax_category(opcode, ops, source)
                out[phase][cat] += ev.duration_ns / 1e6 / steps
                per_op[(name, phase, cat, instrs[name][1].split("{")[0], ",".join(sorted(ops - _LAYOUT)))] += \
                    ev.duration_ns / 1e6 / steps
    if unknown:
        print(f"[step_profile] {len(unknown)} thunk names not in the module text "
              f"({sum(unknown.values()) / 1e6 / steps:.1f} ms/step), e.g. {list(unknown)[:3]}")
    top = {phase: [{"op": k[0], "category": k[2], "shape": k[3], "ops": k[4], "ms": v}
                   for k, v in per_op.most_common() if k[1] == phase][:top_n] for phase in PHASES}
    return {"wall_ms": 1e3 * wall, "ms": {p: dict(c) for p, c in out.items()}, "top_ops": top}


# ----------------------------------------------------------------------------- PyTorch side
def torch_category(name: str, ancestors=()) -> str:
    n = name.lower()
    if "rope" in ancestors:
        return "RoPE"
    if "scaled_dot_product" in n or "flash_attention" in n or "softmax" in n:
        return "attention"
    if "layer_norm" in n:
        return "LayerNorm"
    if "gelu" in n:
        return "GELU"
    if any(k in n for k in ("::mm", "addmm", "bmm", "::matmul", "::linear", "convolution", "conv2d")):
        return "linear matmuls"
    if any(k in n for k in ("acos", "logsumexp", "normalize", "one_hot", "index", "clamp", "cos")):
        return "loss"
    if any(k in n for k in ("copy_", "clone", "contiguous", "transpose", "permute", "::cat", "::t", "view",
                            "reshape", "expand", "slice", "select", "unsqueeze", "as_strided", "empty", "zeros")):
        return "layout copies / transposes"
    return "other elementwise"


def _label_torch_rope():
    """Run HF's rotary embedding under a ``record_function("rope")`` label so its forward ops can be
    told apart (its backward ops run in the autograd engine, outside any label: "other elementwise")."""
    import torch
    from transformers.models.mlcd import modeling_mlcd as m

    inner = m.apply_rotary_pos_emb_vision
    if getattr(inner, "_labelled", False):
        return

    def labelled(*args, **kw):
        with torch.profiler.record_function("rope"):
            return inner(*args, **kw)

    labelled._labelled = True
    m.apply_rotary_pos_emb_vision = labelled


def profile_torch(run, steps: int) -> dict:
    import torch

    _label_torch_rope()
    run()  # warm
    out = {p: collections.Counter() for p in PHASES}
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
    wall = (time.perf_counter() - t0) / steps
    for ev in prof.events():
        if not ev.name.startswith(("aten::", "mkldnn::")):  # python frames and autograd nodes: no own work
            continue
        phase, a, names = "forward", ev.cpu_parent, set()
        while a is not None:
            names.add(a.name)
            if a.name.startswith("Optimizer.step"):
                phase = "optimizer"
                break
            if a.name.startswith("autograd::engine"):
                phase = "backward"
                break
            a = a.cpu_parent
        out[phase][torch_category(ev.name, names)] += ev.self_cpu_time_total / 1e3 / steps
    return {"wall_ms": 1e3 * wall, "ms": {p: dict(c) for p, c in out.items()}}


def materialization_ab(preset: str, batch: int, image: int, classes: int, repeats: int, pairs: int = 2) -> dict:
    """Median step time with ``vit.materialize_grad`` switched off and on, built and timed in this
    process (off, on, off, on: the machine's drift shows up as the spread of the pairs; the smoke run
    builds one pair, each build being a compile)."""
    from benchmarks.common import timeit
    from rice_jax.models import vit

    keep, out = vit.materialize_grad, {"off_s": [], "on_s": []}
    try:
        for key in ("off_s", "on_s") * pairs:
            vit.materialize_grad = keep if key == "on_s" else (lambda x: x)
            run, _ = build_jax_step("mlcd", preset, batch, image, 3, classes, classes)
            out[key].append(timeit(run, warmup=1, repeats=repeats)["median_s"])
    finally:
        vit.materialize_grad = keep
    out["speedup"] = sum(out["off_s"]) / sum(out["on_s"])
    print(f"[step_profile] residual-gradient materialisation: off {out['off_s']} s, on {out['on_s']} s, "
          f"{out['speedup']:.2f}x", flush=True)
    return out


def main(argv=None):
    ap = step_arguments(argparse.ArgumentParser())
    ap.add_argument("--steps", type=int, default=2, help="profiled steps (after one warm-up)")
    a = parse_step_arguments(ap, argv)
    if a.smoke:
        a.steps = 1
    from rice_jax.models.config import get_preset

    image = get_preset(a.preset).image_size
    ab = materialization_ab(a.preset, a.batch, image, a.classes, 1 if a.smoke else 3, pairs=1 if a.smoke else 2)
    run, compiled = build_jax_step("mlcd", a.preset, a.batch, image, 3, a.classes, a.classes)
    jx = profile_jax(run, compiled, a.steps)
    th = profile_torch(build_torch_step(a.preset, a.batch, image, a.classes), a.steps)
    rec = {"preset": a.preset, "batch": a.batch, "image_size": image, "classes": a.classes, "steps": a.steps,
           "objective": "global-only (the objective PyTorch runs)", "jax": jx, "torch": th,
           "residual_grad_materialization": ab}
    for phase in PHASES:
        for op in jx["top_ops"][phase]:
            print(f"[step_profile] jax top {phase:9s} {op['ms']:7.1f} ms  {op['category']:18s} {op['shape']:28s} "
                  f"{op['op']} [{op['ops']}]")
    for side in ("jax", "torch"):
        for p in PHASES:
            print(f"[step_profile] {side:5s} {p:9s} " + ", ".join(
                f"{k} {v:.0f}" for k, v in sorted(rec[side]["ms"][p].items(), key=lambda kv: -kv[1])), flush=True)
    return report("step_profile" if not a.smoke else "step_profile_smoke", rec, write=not a.smoke)


if __name__ == "__main__":
    main()
