"""Size the paper's configurations on TPU slices with ``rice_jax.preflight.plan`` (ahead-of-time compiles on
this CPU machine; run in the planner's environment):

    source launch/_venv_plan.sh && .venv-plan/bin/python -m benchmarks.plan_sweep

K = 1M object centres, rho = 0.1, N = 10 regions, global batch 32K (the paper's), V = 49,408 OCR
token centres (assumed CLIP-sized), bf16 compute, each configuration's last stage resolution
(and the 224 px first stage of the ViT-L configs). For every configuration and slice it tries
the remat policies from most to least memory-hungry and keeps the first that fits, so the table
says what each slice needs. Writes ``benchmarks/results/plan.json``.
"""
from __future__ import annotations

import argparse

from rice_jax.preflight import plan  # first: sets the no-metadata-server / CPU-platform environment

from benchmarks.common import report  # noqa: E402

CONFIGS = (("b16", 0), ("b16", 1), ("l14_336", 0), ("l14_336", 1), ("l14_560", 1))
TOPOLOGIES = ("v5p:8x8x8", "v5e:16x16")
POLICIES = ("dots_with_no_batch_dims_saveable", "nothing_saveable")
# --accumulation: the slice where nothing fits at 32K in one pass, and the microbatch count tried
# for each configuration (sized from the no-fit temporaries above: enough to bring them under HBM).
ACCUM_TOPOLOGY = "v5e:16x16"
ACCUM_STEPS = {("b16", 0): 4, ("b16", 1): 8, ("l14_336", 0): 8, ("l14_336", 1): 16, ("l14_560", 1): 16}


def _config(variant: str, policy: str, batch: int, accum: int = 1):
    from rice_jax.configs.rice import get_config

    c = get_config(variant)
    c.unlock()
    c.batch_size = batch
    c.model.dtype = "bfloat16"
    c.model.remat_policy = policy
    c.data.num_regions = 10
    c.loss.sample_rate = 0.1
    c.grad_accum_steps = accum
    return c


def accumulation_rows():
    """Rows for ``ACCUM_STEPS`` on ``ACCUM_TOPOLOGY`` (the batch stays 32K; each microbatch is
    32K / steps), appended to the existing results (earlier accumulation rows replaced)."""
    import json

    from benchmarks.common import RESULTS

    path = RESULTS / "plan.json"
    rec = json.loads(path.read_text())
    rows = [r for r in rec["rows"] if r.get("grad_accum_steps", 1) == 1]
    for (variant, stage), steps in ACCUM_STEPS.items():
        for policy in POLICIES:
            c = _config(variant, policy, rec["global_batch"], steps)
            try:
                r = plan.plan(c, ACCUM_TOPOLOGY, num_obj_classes=rec["K"], num_ocr_classes=rec["V"], stage=stage)
            except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
                r = {"topology": ACCUM_TOPOLOGY, "error": plan._first(e), "fits": None}
            r.update(variant=variant, stage=stage, policy=policy, grad_accum_steps=steps)
            rows.append(r)
            print(f"[plan sweep] {variant} stage {stage} on {ACCUM_TOPOLOGY}, {policy}, {steps} microbatches: "
                  f"fits={r['fits']} total={r.get('per_device', {}).get('total_bytes', 0) / 2**30:.1f} GiB", flush=True)
            if r["fits"]:
                break
    rec["rows"] = rows
    return report("plan", {k: v for k, v in rec.items() if k not in ("benchmark", "machine", "time")})


def reproject():
    """Re-derive each fitting row's projection from its configuration with ``perf.project``
    (memory figures are the compiler's and stay as they are)."""
    import json

    from benchmarks.common import RESULTS
    from rice_jax import perf

    path = RESULTS / "plan.json"
    rec = json.loads(path.read_text())
    for r in rec["rows"]:
        if "per_device" not in r:
            continue
        c = _config(r["variant"], r["policy"], rec["global_batch"], r.get("grad_accum_steps", 1))
        chip = perf.chip(r["topology"].partition(":")[0])
        r.update(perf.project(c, rec["K"], rec["V"], r["image_size"], r["devices"], chip["bf16_flops"],
                              r.get("mfu_assumed", 0.4)))
    return report("plan", {k: v for k, v in rec.items() if k not in ("benchmark", "machine", "time")})


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--reproject", action="store_true",
                    help="recompute every row's step-time projection (perf.project) without recompiling")
    ap.add_argument("--accumulation", action="store_true",
                    help=f"add gradient-accumulation rows on {ACCUM_TOPOLOGY} to results/plan.json")
    a = ap.parse_args(argv)
    if a.accumulation:
        return accumulation_rows()
    if a.reproject:
        return reproject()
    configs, topologies = (CONFIGS, TOPOLOGIES) if not a.smoke else ((("b16", 0),), ("v5e:2x2",))
    batch, k, v = (32768, 1_000_000, 49408) if not a.smoke else (64, 4096, 512)
    rows = []
    for variant, stage in configs:
        for topo in topologies:
            for policy in POLICIES:
                c = _config(variant if not a.smoke else "tiny", policy, batch)
                try:
                    r = plan.plan(c, topo, num_obj_classes=k, num_ocr_classes=v, stage=stage)
                except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
                    r = {"topology": topo, "error": plan._first(e), "fits": None}
                r.update(variant=variant, stage=stage, policy=policy)
                rows.append(r)
                print(f"[plan sweep] {variant} stage {stage} @ {r.get('image_size')} on {topo}, {policy}: "
                      f"fits={r['fits']} total={r.get('per_device', {}).get('total_bytes', 0) / 2**30:.1f} GiB "
                      f"step={r.get('step_time_s')}", flush=True)
                if r["fits"]:
                    break
    return report("plan" if not a.smoke else "plan_smoke", {"rows": rows, "global_batch": batch, "K": k, "V": v},
                  write=not a.smoke)


if __name__ == "__main__":
    main()
