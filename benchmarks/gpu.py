"""One-command GPU benchmark: the real ``l14_336`` RICE train step (bf16, region tokens, the
class-parallel margin-softmax loss, AdamW) with cuDNN flash attention (region mask included) vs
XLA attention; images/s and MFU against the card's datasheet bf16 peak (``rice_jax.perf.CHIPS``).

    bash benchmarks/gpu.sh                        # on a GPU machine: writes results/gpu.json
    python -m benchmarks.gpu --smoke              # any machine: tiny model, plumbing only

Each attention path is compiled and timed in the same process on the same batch; the MFU
numerator is the compiled step's FLOPs (XLA cost analysis), so the two paths are compared on
identical work. On a machine without a GPU ``--smoke`` runs a tiny config on the CPU to keep the
script from rotting; its numbers mean nothing.
"""
from __future__ import annotations

import argparse

import jax

from benchmarks.common import random_batch, report, timeit


def _config(variant: str, batch: int, impl: str, num_classes: int, smoke: bool):
    from rice_jax.configs.rice import get_config

    c = get_config("tiny" if smoke else variant)
    c.batch_size = batch
    c.model.attention_impl = impl
    if not smoke:
        c.stages = ((10, c.stages[-1][1]),)
    c.loss.num_classes = num_classes
    return c


def step_time(c, num_classes: int, vocab: int, repeats: int) -> dict:
    from rice_jax import sharding, train

    mesh = sharding.make_mesh(-1, 1)
    state, setup = train.init_state(c, mesh, train.build_model_config(c), num_classes, vocab)
    step, batch_sh = train.make_train_step(c, setup)
    b = c.batch_size
    local = random_batch(b, c.stages[-1][1], c.data.num_regions, c.data.max_labels, min(num_classes, vocab))
    batch = train.to_global_batch(local, batch_sh)
    compiled, flops = train.compile_step(step, state, batch)
    holder = {"s": state}

    def run():
        holder["s"], m = compiled(holder["s"], batch)
        jax.block_until_ready(m["loss"])

    t = timeit(run, warmup=2, repeats=repeats)
    return {"step_s": t["median_s"], "images_per_s": b / t["median_s"], "flops_per_step": flops}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="l14_336")
    ap.add_argument("--batch", type=int, default=0, help="global batch (0: 32 per GPU)")
    ap.add_argument("--classes", type=int, default=100_000)
    ap.add_argument("--vocab", type=int, default=49408)
    ap.add_argument("--chip", default="h100", help="datasheet peak for MFU (rice_jax.perf.CHIPS)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    from rice_jax import perf

    gpu = jax.default_backend() == "gpu"
    if not gpu and not a.smoke:
        raise SystemExit("no GPU here: run on a GPU machine, or --smoke for the plumbing")
    n = jax.device_count()
    batch = a.batch or (32 * n if not a.smoke else 8)
    classes, vocab = (a.classes, a.vocab) if not a.smoke else (256, 128)
    peak = perf.chip(a.chip)["bf16_flops"] * n if gpu else perf.peak_flops(512)
    impls = ("cudnn", "xla") if gpu else ("einsum", "xla")
    rows = {}
    for impl in impls:
        c = _config(a.variant, batch, impl, classes, a.smoke)
        rows[impl] = step_time(c, classes, vocab, a.repeats if not a.smoke else 1)
        rows[impl]["mfu"] = rows[impl]["flops_per_step"] / rows[impl]["step_s"] / peak
        print(f"[gpu bench] attention={impl}: {rows[impl]}", flush=True)
    rec = {"variant": a.variant if not a.smoke else "tiny", "global_batch": batch, "classes": classes,
           "devices": n, "device_kind": jax.devices()[0].device_kind, "peak_flops_all_devices": peak,
           "attention": rows, "speedup_first_over_second": rows[impls[1]]["step_s"] / rows[impls[0]]["step_s"]}
    return report("gpu" if not a.smoke else "gpu_smoke", rec, write=not a.smoke)


if __name__ == "__main__":
    main()
