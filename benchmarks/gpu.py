"""One-command GPU benchmark: the real ``l14_336`` RICE train step (bf16, region tokens, the
class-parallel margin-softmax loss, AdamW) with cuDNN flash attention (region mask included) vs
XLA attention; images/s and MFU against the card's datasheet bf16 peak (``rice_jax.perf.CHIPS``).

    bash benchmarks/gpu.sh                        # on a GPU machine: results/gpu_<variant>.json
    python -m benchmarks.gpu --smoke              # any machine: tiny model, plumbing only

Each attention path is compiled and timed in the same process on the same batch; the MFU
numerator is the step's model FLOPs (``perf.rice_train_flops``; XLA's cost analysis misses the
cuBLAS/cuDNN calls on GPU and is recorded beside it), so the paths are compared on identical
work. An attention micro-benchmark (forward + backward of one layer's attention at the variant's
shapes, with and without the region mask) checks each fused path against the einsum reference. On a machine without a GPU ``--smoke`` runs a tiny config on the CPU to keep the
script from rotting; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import time

import jax

from benchmarks.common import report, timeit
from rice_jax.batch import random_batch


def _config(variant: str, batch: int, impl: str, num_classes: int, smoke: bool):
    from rice_jax.configs.rice import get_config

    c = get_config("tiny" if smoke else variant)
    c.batch_size = batch
    c.model.attention_impl = impl
    if not smoke:
        c.stages = ((10, c.stages[-1][1]),)
    c.loss.num_obj_classes = num_classes
    return c


def step_time(c, num_classes: int, vocab: int, repeats: int) -> dict:
    from rice_jax import perf, sharding, train

    mesh = sharding.make_mesh(-1, 1)
    state, setup = train.init_state(c, mesh, train.build_model_config(c), num_classes, vocab)
    step, batch_sh = train.make_train_step(c, setup)
    b = c.batch_size
    local = random_batch(b, c.stages[-1][1], c.data.num_regions, c.data.max_labels, min(num_classes, vocab))
    batch = train.to_global_batch(local, batch_sh)
    t0 = time.perf_counter()
    compiled = train.compile_step(step, state, batch)
    compile_s = time.perf_counter() - t0
    holder = {"s": state}

    def run():
        holder["s"], m = compiled(holder["s"], batch)
        jax.block_until_ready(m["loss"])

    t = timeit(run, warmup=2, repeats=repeats)
    mem = {}
    try:  # the compiled program's own per-device footprint (the process-wide peak mixes both paths)
        ma = compiled.memory_analysis()
        mem = {"program_bytes": int(ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes
                                    - ma.alias_size_in_bytes),
               "temp_bytes": int(ma.temp_size_in_bytes)}
        stats = jax.devices()[0].memory_stats() or {}
        mem["device_bytes_limit"] = stats.get("bytes_limit")
    except Exception:  # noqa: BLE001 - a diagnostic only
        pass
    return {"step_s": t["median_s"], "step_min_s": t["min_s"], "images_per_s": b / t["median_s"],
            "model_flops_per_step": perf.model_flops(c, setup.num_obj_classes, setup.num_ocr_classes, b, (c.stages[-1][1],) * 2),
            "xla_cost_flops_per_step": perf.xla_cost_flops(compiled),
            "compile_s": compile_s, **mem}


def attention_micro(c, batch: int, repeats: int) -> dict:
    """Forward + backward of one attention call at the model's shapes ([B, heads, 1+T+N, Dh], bf16):
    time per path and max |difference| from the einsum path, without and with the region mask."""
    import jax.numpy as jnp
    import numpy as np

    from rice_jax import train
    from rice_jax.models import vit

    m = train.build_model_config(c).backbone
    n = c.data.num_regions
    tokens = 1 + (c.stages[-1][1] // m.patch_size) ** 2 + n
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.standard_normal((batch, m.num_heads, tokens, m.head_dim)), jnp.bfloat16)
               for _ in range(3))
    region = jnp.asarray(r.random((batch, 1, tokens, tokens)) < 0.5) | jnp.eye(tokens, dtype=bool)
    out = {"shape": [batch, m.num_heads, tokens, m.head_dim]}
    for mask_name, mask in (("no_mask", None), ("region_mask", region)):
        def loss(q, k, v, impl):
            return jnp.sum(vit.attention(q, k, v, mask, impl=impl).astype(jnp.float32) ** 2)

        ref = None
        for impl in ("einsum", "xla", "cudnn"):
            key = f"{mask_name}/{impl}"
            try:
                f = jax.jit(jax.value_and_grad(lambda q, k, v: loss(q, k, v, impl), argnums=(0, 1, 2)))
                val, grads = f(q, k, v)
                t = timeit(lambda: jax.block_until_ready(f(q, k, v)), warmup=2, repeats=repeats)
                out[key] = {"fwd_bwd_ms": 1e3 * t["median_s"]}
                if ref is None:
                    ref = (val, grads)
                else:
                    out[key]["max_abs_grad_diff"] = max(
                        float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                        for a, b in zip(grads, ref[1]))
                    out[key]["rel_loss_diff"] = float(abs(val - ref[0]) / abs(ref[0]))
            except Exception as e:  # noqa: BLE001 - record a refused path, time the others
                out[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(f"[gpu bench] attention micro {key}: {out[key]}", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="l14_336")
    ap.add_argument("--batch", type=int, default=0, help="global batch (0: 32 per GPU)")
    ap.add_argument("--classes", type=int, default=100_000)
    ap.add_argument("--vocab", type=int, default=49408)
    ap.add_argument("--chip", default="h100", help="datasheet peak for MFU (rice_jax.perf.CHIPS)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--impls", default="", help="comma-separated attention paths (default: cudnn,xla on GPU)")
    ap.add_argument("--attention-micro", action=argparse.BooleanOptionalAction, default=True)
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
    impls = tuple(a.impls.split(",")) if a.impls else (("cudnn", "xla") if gpu else ("einsum", "xla"))
    micro = attention_micro(_config(a.variant, batch, "auto", classes, a.smoke), batch if not a.smoke else 2,
                            a.repeats if not a.smoke else 1) if a.attention_micro else None
    rows = {}
    for impl in impls:
        c = _config(a.variant, batch, impl, classes, a.smoke)
        try:
            rows[impl] = step_time(c, classes, vocab, a.repeats if not a.smoke else 1)
        except Exception as e:  # noqa: BLE001 - one path failing must not hide the other's numbers
            if a.smoke:
                raise
            rows[impl] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(f"[gpu bench] attention={impl} FAILED: {rows[impl]['error']}", flush=True)
            continue
        rows[impl]["mfu"] = rows[impl]["model_flops_per_step"] / rows[impl]["step_s"] / peak
        print(f"[gpu bench] attention={impl}: {rows[impl]}", flush=True)
    rec = {"variant": a.variant if not a.smoke else "tiny", "global_batch": batch, "classes": classes,
           "devices": n, "device_kind": jax.devices()[0].device_kind, "peak_flops_all_devices": peak,
           "attention": rows}
    if micro:
        rec["attention_micro"] = micro
    if len(impls) == 2 and all("step_s" in rows[i] for i in impls):
        rec["speedup_first_over_second"] = rows[impls[1]]["step_s"] / rows[impls[0]]["step_s"]
    return report(f"gpu_{a.variant}" if not a.smoke else "gpu_smoke", rec, write=not a.smoke)


if __name__ == "__main__":
    main()
