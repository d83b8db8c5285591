"""Size the paper's configurations on TPU slices with ``rice_jax.plan`` (ahead-of-time compiles on
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

from rice_jax import plan  # first: sets the no-metadata-server / CPU-platform environment

from benchmarks.common import report  # noqa: E402

CONFIGS = (("b16", 0), ("b16", 1), ("l14_336", 0), ("l14_336", 1), ("l14_560", 1))
TOPOLOGIES = ("v5p:8x8x8", "v5e:16x16")
POLICIES = ("dots_with_no_batch_dims_saveable", "nothing_saveable")


def _config(variant: str, policy: str, batch: int):
    from rice_jax.configs.rice import get_config

    c = get_config(variant)
    c.unlock()
    c.batch_size = batch
    c.model.dtype = "bfloat16"
    c.model.remat_policy = policy
    c.data.num_regions = 10
    c.loss.sample_rate = 0.1
    return c


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    configs, topologies = (CONFIGS, TOPOLOGIES) if not a.smoke else ((("b16", 0),), ("v5e:2x2",))
    batch, k, v = (32768, 1_000_000, 49408) if not a.smoke else (64, 4096, 512)
    rows = []
    for variant, stage in configs:
        for topo in topologies:
            for policy in POLICIES:
                c = _config(variant if not a.smoke else "tiny", policy, batch)
                try:
                    r = plan.plan(c, topo, num_classes=k, vocab_size=v, stage=stage)
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
