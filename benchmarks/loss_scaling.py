"""Class-parallel loss: per-device compiled memory and step time vs device count W and K.

Each W runs in its own process (the emulated device count is fixed at start-up).
For every (W, K, ρ): compiled per-device memory of forward+backward (XLA memory
analysis: arguments + temporaries), the largest temporary buffer that scales
with K, and the median step time; plus a single-process PyTorch reference of
the same formula (dense, fp32) in the same run.

    python -m benchmarks.loss_scaling            # W ∈ {1,2,4,8}, K ∈ {1e4,1e5,1e6}, ρ ∈ {1, 0.1}
    python -m benchmarks.loss_scaling --smoke    # tiny, not written
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks.common import RESULTS, report, timeit


def _worker(w: int, ks, rates, b: int, d: int, repeats: int, time_limit_k: int):
    import jax
    import jax.numpy as jnp

    from rice_jax import losses
    from rice_jax.sharding import make_mesh

    mesh = make_mesh(1, w) if w > 1 else None
    rows = []
    for k in ks:
        k_pad = losses.padded_num_classes(k, w)
        for rate in rates:
            def step(f, c, lab, key):
                return jax.value_and_grad(lambda f, c: losses.margin_softmax_loss(
                    f, c, lab, sample_rate=rate, rng=key, mesh=mesh, num_classes=k)[0], argnums=(0, 1))(f, c)
            if mesh is not None:
                from jax.sharding import NamedSharding, PartitionSpec as P
                sh_c = NamedSharding(mesh, P(("data", "fsdp"), None))
                sh_b = NamedSharding(mesh, P(("data", "fsdp"), None))
                fn = jax.jit(step, in_shardings=(sh_b, sh_c, sh_b, None))
            else:
                fn = jax.jit(step)
            args = (jax.ShapeDtypeStruct((b, d), jnp.float32), jax.ShapeDtypeStruct((k_pad, d), jnp.float32),
                    jax.ShapeDtypeStruct((b, 1), jnp.int32), jax.random.key(0))
            compiled = fn.lower(*args).compile()
            ma = compiled.memory_analysis()
            per_dev = (ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes) if ma else None
            row = {"W": w, "K": k, "rate": rate, "B": b, "D": d,
                   "per_device_bytes": per_dev, "temp_bytes": ma.temp_size_in_bytes if ma else None,
                   "bk_bytes_if_materialised": b * k * 4}
            if k <= time_limit_k:
                key = jax.random.key(1)
                f = jax.random.normal(key, (b, d))
                c = jax.random.normal(key, (k_pad, d)) * 0.01
                lab = jax.random.randint(key, (b, 1), 0, k)
                if mesh is not None:
                    f, c, lab = jax.device_put(f, sh_b), jax.device_put(c, sh_c), jax.device_put(lab, sh_b)
                t = timeit(lambda: jax.block_until_ready(compiled(f, c, lab, jax.random.key(2))),
                           warmup=1, repeats=repeats)
                row["step_s"] = t["median_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _torch_reference(ks, rates, b, d, repeats, time_limit_k):
    """Dense PyTorch eager version of the same formula (sampling by index gather)."""
    import math

    from benchmarks.common import torch_threads

    torch = torch_threads()
    out = []
    for k in ks:
        if k > time_limit_k:
            continue
        for rate in rates:
            f = torch.randn(b, d, requires_grad=True)
            c = (torch.randn(k, d) * 0.01).requires_grad_(True)
            lab = torch.randint(0, k, (b,))

            def step():
                if rate < 1:
                    n = math.ceil(rate * k)
                    score = torch.rand(k)
                    score[lab] = 2.0
                    idx = torch.topk(score, n).indices
                    cs = c[idx]
                    pos = (idx[None, :] == lab[:, None])
                else:
                    cs, pos = c, torch.nn.functional.one_hot(lab, k).bool()
                fn = torch.nn.functional.normalize(f, dim=1)
                cos = fn @ torch.nn.functional.normalize(cs, dim=1).T
                cp = cos[pos].clamp(-1 + 1e-6, 1 - 1e-6)
                zp = 64 * torch.cos(torch.acos(cp) + 0.3)
                zn = torch.where(pos, torch.full_like(cos, -float("inf")), 64 * cos)
                zero = torch.zeros(b, 1)
                loss = (torch.logsumexp(torch.cat([zero, -zp[:, None]], 1), 1)
                        + torch.logsumexp(torch.cat([zero, zn], 1), 1)).mean()
                f.grad = c.grad = None
                loss.backward()

            t = timeit(step, warmup=1, repeats=repeats)
            out.append({"K": k, "rate": rate, "torch_step_s": t["median_s"]})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", type=int, default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--ks", type=float, nargs="+", default=[1e4, 1e5, 1e6])
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.1])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--time-limit-k", type=float, default=1e6, help="time steps only for K up to this")
    a = ap.parse_args(argv)
    if a.smoke:
        a.ks, a.devices, a.batch, a.dim, a.repeats = [1000], [1, 2], 16, 32, 1
    ks = [int(k) for k in a.ks]
    if a.worker is not None:
        rows = _worker(a.worker, ks, a.rates, a.batch, a.dim, a.repeats, int(a.time_limit_k))
        print("RESULT " + json.dumps(rows))
        return
    rows = []
    for w in a.devices:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={w}", JAX_PLATFORMS="cpu")
        cmd = [sys.executable, "-m", "benchmarks.loss_scaling", "--worker", str(w), "--ks", *map(str, ks),
               "--rates", *map(str, a.rates), "--batch", str(a.batch), "--dim", str(a.dim),
               "--repeats", str(a.repeats), "--time-limit-k", str(a.time_limit_k)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        rows += json.loads([l for l in res.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
    torch_rows = _torch_reference(ks, a.rates, a.batch, a.dim, a.repeats, int(a.time_limit_k))
    record = report("loss_scaling" if not a.smoke else "loss_scaling_smoke",
                    {"rows": rows, "torch": torch_rows}, write=not a.smoke)
    if not a.smoke:
        _plot(rows)
    return record


def _plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for k in sorted({r["K"] for r in rows}):
        for rate in sorted({r["rate"] for r in rows}):
            sel = sorted((r for r in rows if r["K"] == k and r["rate"] == rate), key=lambda r: r["W"])
            lbl = f"K={k:.0e} ρ={rate}"
            ax[0].plot([r["W"] for r in sel], [r["per_device_bytes"] / 2**20 for r in sel], "o-", label=lbl)
            if all("step_s" in r for r in sel):
                ax[1].plot([r["W"] for r in sel], [r["step_s"] for r in sel], "o-", label=lbl)
    for a_, t in zip(ax, ("per-device memory (MiB, compiled)", "fwd+bwd step (s, emulated devices)")):
        a_.set_xscale("log", base=2)
        a_.set_yscale("log")
        a_.set_xlabel("devices W")
        a_.set_title(t)
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "loss_scaling.png", dpi=100)


if __name__ == "__main__":
    main()
