"""Size the real train step for a TPU slice (or these CPU devices) before queueing for it.

    bash launch/plan.sh --config rice_jax/configs/rice.py:l14_336 --topology v5p:4x4x4 \\
        --config.batch_size=32768 --num_obj_classes 1000000
    # = TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu .venv-plan/bin/python -m rice_jax.preflight.plan ...

Builds the training step the train loop runs — the RICE model, the class-parallel
margin-softmax loss over K centres sharded along the mesh, AdamW, the config's
shardings, remat policy and dtype — from abstract shapes only (nothing is
allocated), compiles it ahead of time for the target's devices, and prints per
device: HBM for arguments (parameters, centres, optimiser state, the batch),
temporaries and outputs against the chip's HBM, a fit / no-fit verdict, the
compiled FLOPs per step and a projected step time and throughput at an assumed
MFU (``--mfu``, default 0.4; datasheet peaks in ``rice_jax.perf.CHIPS``). A
program that cannot fit fails in the TPU compiler with its out-of-memory
message, which becomes the "no fit" verdict.

TPU targets need libtpu, which must stay out of the project's main environment
(with libtpu importable, ``import jax`` on a machine without TPUs probes for a
TPU and a cloud metadata server). ``launch/plan.sh`` makes ``.venv-plan`` with
``jax[tpu]`` and always runs it with ``TPU_SKIP_MDS_QUERY=1`` and
``JAX_PLATFORMS=cpu`` (set below too, before jax loads, so nothing leaves the
machine). ``--topology cpu:N`` plans on N local CPU devices (any environment).
"""
from __future__ import annotations

import os

# Before jax (and libtpu) load: never query a cloud metadata server, never look for a TPU.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_ID", "0")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No chip is opened here, so two plans (or a plan beside the suite's planner test) may run at once:
# without this, libtpu's single-process lockfile makes the second one fail.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import time  # noqa: E402

import jax  # noqa: E402 - after the environment above
from absl import flags  # noqa: E402

from rice_jax import batch as batch_contract, cli, errors, perf, sharding, train  # noqa: E402
from rice_jax.preflight import target  # noqa: E402

MIB = 2**20


MEGACORE_KINDS = ("v4", "v5p")
# Remat policies by the activations they keep, most first — so by the recompute they cost, least
# first. ``everything_saveable`` keeps what ``none`` keeps; the fit search skips it.
REMAT_BY_MEMORY = ("none", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable")


def target_devices(topology: str, num_slices: int = 1):
    """``cpu:N`` -> N local CPU devices; ``v5p:4x4x4`` etc. -> the devices of that TPU topology
    description (libtpu compiles for it; no TPU is needed), ``num_slices`` copies of it joined by
    the data-centre network for a multi-slice plan (``--config.mesh.dcn_data``)."""
    topo = target.parse(topology, cpu=True)
    if topo.kind == "cpu":
        n = topo.chips * num_slices    # cpu:N is one slice's devices
        if n > jax.device_count():
            raise errors.InputError(f"--topology {topology}" + (f" x {num_slices} slices" if num_slices > 1 else "")
                                    + f": only {jax.device_count()} CPU devices here "
                                    f"(XLA_FLAGS=--xla_force_host_platform_device_count={n})")
        return jax.devices("cpu")[:n]
    if not topo.is_tpu:
        raise errors.InputError(f"--topology {topology!r}: the planner compiles for cpu:N or a TPU generation and its "
                                f"chip grid, e.g. v5p:4x4x4, v4:2x2x2, v5e:4x4, v6e:8x8 (known: "
                                f"{', '.join(target.TPU_KINDS)})")
    try:
        from jax.experimental import topologies  # needs libtpu: imported only for a TPU target

        # v4 and v5p chips have two TensorCores that JAX drives as one device ("megacore", the
        # default on those pods); a plain description lists one device per core, which JAX's mesh
        # construction refuses for TPUs after v3.
        extra = {"chip_config_name": "megacore"} if topo.kind in MEGACORE_KINDS else {}
        if num_slices > 1:
            extra["num_slices"] = num_slices
        return topologies.get_topology_desc(topology_name=topology, platform="tpu", **extra).devices
    except Exception as e:  # noqa: BLE001 - missing libtpu or an unknown topology name
        raise errors.InputError(f"--topology {topology}: cannot describe this TPU topology here ({_first(e)}); "
                                "check the chip grid, run through launch/plan.sh (its .venv-plan has libtpu), "
                                "or use cpu:N") from e


def _first(e: BaseException) -> str:
    return errors.first_line(e, 300)


def plan(c, topology: str, *, num_obj_classes: int, num_ocr_classes: int, mfu: float = 0.4, stage: int = -1,
         search: bool = True, log=lambda msg: None) -> dict:
    """Compile the train step of config ``c`` for ``topology``; per-device memory, FLOPs, projection.
    A step that does not fit gets ``fits_with``: what would (:func:`smallest_fit`, unless ``search`` is off)."""
    r = compile_plan(c, topology, num_obj_classes=num_obj_classes, num_ocr_classes=num_ocr_classes, mfu=mfu,
                     stage=stage)
    if r["fits"] is False and search:
        r["fits_with"] = smallest_fit(c, topology, num_obj_classes=num_obj_classes, num_ocr_classes=num_ocr_classes,
                                      mfu=mfu, stage=stage, log=log)
    return r


def smallest_fit(c, topology: str, *, num_obj_classes: int, num_ocr_classes: int, mfu: float = 0.4,
                 stage: int = -1, log=lambda msg: None) -> list[dict]:
    """The cheapest ways to make a step that does not fit, fit — found by compiling them.

    For each remat policy from the config's own towards more recompute (:data:`REMAT_BY_MEMORY`), the
    smallest ``grad_accum_steps`` (doubling from the config's, while the microbatch still spreads over
    the devices) whose step fits. A policy with more recompute is tried only for fewer microbatches
    than the best found so far, so every entry is a real trade: fewer microbatches for more recompute.
    Each entry: ``remat_policy``, ``grad_accum_steps``, its per-device total bytes and projected step."""
    devices = len(list(target_devices(topology)))
    accum0 = int(c.get("grad_accum_steps", 1) or 1)
    current = c.model.remat_policy if c.model.remat_policy in REMAT_BY_MEMORY else "none"
    found: list[dict] = []
    best = None
    for policy in REMAT_BY_MEMORY[REMAT_BY_MEMORY.index(current):]:
        accum = accum0
        while c.batch_size % (accum * devices) == 0 and (best is None or accum < best):
            if (policy, accum) != (current, accum0):
                trial = c.copy_and_resolve_references()
                with trial.unlocked():
                    trial.model.remat_policy, trial.grad_accum_steps = policy, accum
                r = compile_plan(trial, topology, num_obj_classes=num_obj_classes, num_ocr_classes=num_ocr_classes,
                                 mfu=mfu, stage=stage)
                total = r.get("per_device", {}).get("total_bytes")
                log(f"  tried remat {policy}, grad_accum_steps {accum}: "
                    + (f"{total / 2**30:.2f} GiB per device" if total is not None else "out of memory in the compiler")
                    + (" - fits" if r["fits"] else ""))
                if r["fits"]:
                    # The compiler counts one microbatch (a scan body once) with its recomputation:
                    # x microbatches over the model FLOPs is the price of the remat policy.
                    model = r.get("model_flops_per_step")
                    found.append({"remat_policy": policy, "grad_accum_steps": accum, "total_bytes": total,
                                  "step_time_s": r.get("step_time_s"),
                                  "compiled_over_model_flops": r["flops_per_step"] * accum / model if model else None})
                    best = accum
                    break
            accum *= 2
        if best == accum0:
            break       # nothing needs fewer microbatches than the config already has
    return found


def compile_plan(c, topology: str, *, num_obj_classes: int, num_ocr_classes: int, mfu: float = 0.4,
                 stage: int = -1) -> dict:
    """One compile of config ``c``'s train step for ``topology`` (:func:`plan` without the fit search)."""
    devices = list(target_devices(topology, c.mesh.dcn_data))
    mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, devices=devices, axis_type=c.mesh.axis_type,
                              dcn_data=c.mesh.dcn_data)
    if c.batch_size % mesh.size:
        raise errors.InputError(f"batch_size {c.batch_size} is not a multiple of the {mesh.size} devices of {topology}")
    image_size = int(c.stages[stage][1])
    model_cfg = train.build_model_config(c)
    _, setup = train.abstract_setup(c, mesh, model_cfg, num_obj_classes, num_ocr_classes)
    step, batch_sh = train.make_train_step(c, setup)
    batch = batch_contract.abstract_batch(c.batch_size, image_size, c.data.num_regions, c.data.max_labels,
                                          batch_sh)
    kind = target.parse(topology, cpu=True).kind
    out = {"topology": topology, "slices": int(c.mesh.dcn_data), "devices": len(devices),
           "device_kind": devices[0].device_kind,
           "mesh": dict(mesh.shape), "global_batch": c.batch_size, "image_size": image_size,
           "grad_accum_steps": int(c.get("grad_accum_steps", 1) or 1),
           "backbone": c.model.backbone, "num_layers": model_cfg.backbone.num_layers,
           "dtype": c.model.dtype, "remat_policy": c.model.remat_policy, "num_obj_classes": num_obj_classes,
           "num_ocr_classes": num_ocr_classes, "sample_rate": c.loss.sample_rate, "num_regions": c.data.num_regions}
    t = time.perf_counter()
    try:
        compiled = step.lower(setup.abstract_state, batch).compile()
    except Exception as e:  # noqa: BLE001 - the TPU compiler's out-of-memory error is the verdict
        msg = str(e)
        if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower() or "exceeds" in msg.lower():
            hbm = {"hbm_bytes": perf.chip(kind)["hbm_bytes"]} if kind in perf.CHIPS else {}
            return dict(out, fits=False, compile_s=time.perf_counter() - t, error=_first(e), **hbm)
        raise
    out["compile_s"] = time.perf_counter() - t
    mem = compiled.memory_analysis()
    per = {"argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
           "alias_bytes": int(mem.alias_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
           "code_bytes": int(getattr(mem, "generated_code_size_in_bytes", 0) or 0)}
    # Donated state: outputs that alias arguments occupy the arguments' buffers.
    per["total_bytes"] = per["argument_bytes"] + per["output_bytes"] - per["alias_bytes"] + per["temp_bytes"]
    flops = perf.xla_cost_flops(compiled, len(devices))
    out.update(per_device=per, flops_per_device=flops / len(devices), flops_per_step=flops)
    if kind in perf.CHIPS:
        spec = perf.chip(kind)
        out["hbm_bytes"] = spec["hbm_bytes"]
        out["fits"] = per["total_bytes"] <= spec["hbm_bytes"]
        out.update(perf.project(c, num_obj_classes, num_ocr_classes, image_size, len(devices), spec["bf16_flops"], mfu))
    else:
        out["fits"] = None          # CPU devices have no HBM to fit into; the figures are still exact
    return out


def format_report(r: dict) -> str:
    micro = f" in {r['grad_accum_steps']} microbatches" if r.get("grad_accum_steps", 1) > 1 else ""
    head = (f"{r['backbone']} @ {r['image_size']} px, global batch {r['global_batch']:,}{micro}, K = {r['num_obj_classes']:,}, "
            f"V = {r['num_ocr_classes']:,}, rho = {r['sample_rate']}, N = {r['num_regions']}, {r['dtype']}, remat "
            f"{r['remat_policy']} on {r['topology']} ({r['devices']} x {r['device_kind']}, mesh {r['mesh']})")
    if "per_device" not in r:
        return "\n".join([head, f"  DOES NOT FIT: {r.get('error', '')}"] + _fit_lines(r))
    p = r["per_device"]
    lines = [head, f"  per device: arguments {p['argument_bytes'] / MIB:,.0f} MiB, temporaries "
                   f"{p['temp_bytes'] / MIB:,.0f} MiB, outputs {p['output_bytes'] / MIB:,.0f} MiB "
                   f"(aliased {p['alias_bytes'] / MIB:,.0f}), total {p['total_bytes'] / MIB:,.0f} MiB"
                   + (f" of {r['hbm_bytes'] / MIB:,.0f} MiB HBM" if "hbm_bytes" in r else ""),
             f"  compiler FLOPs per step {r['flops_per_step']:.3g} ({r['flops_per_device']:.3g} per device; remat "
             f"included, one microbatch under accumulation); compiled in {r['compile_s']:.0f} s"]
    if r.get("step_time_s"):
        lines.append(f"  model FLOPs per step {r['model_flops_per_step']:.3g}; at {r['mfu_assumed']:.0%} MFU: "
                     f"{r['step_time_s']:.3g} s/step, {r['images_per_s']:,.0f} images/s")
    if r["fits"] is not None:
        lines.append("  FITS" if r["fits"] else "  DOES NOT FIT")
    return "\n".join(lines + _fit_lines(r))


def _fit_lines(r: dict) -> list[str]:
    """What the fit search found, as the flags to pass."""
    if r.get("fits") is not False or "fits_with" not in r:
        return []
    if not r["fits_with"]:
        return ["  nothing tried fits (every remat policy, microbatches down to one row per device): "
                "shard the parameters (--config.mesh.fsdp), lower the batch or the image size, or use more chips"]
    out = ["  would fit with (found by compiling each):"]
    for f in r["fits_with"]:
        step = f", ~{f['step_time_s']:.3g} s/step before recompute" if f.get("step_time_s") else ""
        if f.get("compiled_over_model_flops"):
            step += f", compiled FLOPs {f['compiled_over_model_flops']:.2f}x the model's"
        out.append(f"    --config.grad_accum_steps={f['grad_accum_steps']} --config.model.remat_policy={f['remat_policy']}"
                   f"  ({f['total_bytes'] / 2**30:.2f} GiB per device{step})")
    return out


def main(argv):
    del argv
    F = flags.FLAGS
    c = cli.absl_config("config")
    r = plan(c, F.topology, num_obj_classes=F.num_obj_classes, num_ocr_classes=perf.ocr_classes(c, F.num_ocr_classes),
             mfu=F.mfu, stage=F.stage, search=F.fit_search, log=lambda msg: print(msg, flush=True))
    print(format_report(r), flush=True)
    cli.emit_json(r, F.out)


if __name__ == "__main__":
    target.define_flags("cpu:8")
    flags.DEFINE_bool("fit_search", True, "when the step does not fit, compile remat policies and microbatch "
                                          "counts to find the smallest change that does")
    cli.run_absl(main)
