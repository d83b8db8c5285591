"""Train-step throughput and MFU: JAX (this repo) vs a PyTorch eager reference, same model + loss.

JAX: the real jitted train step of rice_jax.train (forward + backward + AdamW), both the
RICE objective (N region tokens in the last k blocks + object/OCR losses) and the
global-only objective. PyTorch: HF ``MLCDVisionModel`` + the same multi-label margin
softmax on the pooled embedding + AdamW, eager, same batch, same threads. MFU uses the
training loop's peak (``rice_jax.perf.peak_flops``: best jnp matmul on 2048^2, fp32, same
run); torch.matmul's rate is recorded beside it.

    python -m benchmarks.train_step [--preset vit_b16_224 --batch 8]   # writes results
    python -m benchmarks.train_step --smoke
"""
from __future__ import annotations

import argparse
import tempfile

import jax

from benchmarks.common import report, timeit, torch_threads
from rice_jax.batch import random_batch


def _config(objective: str, preset: str, batch: int, image: int, k: int, v: int):
    from rice_jax.configs.rice import get_config

    c = get_config(f"tiny,objective={objective}")
    c.model.backbone = preset
    c.batch_size = batch
    c.stages = ((10, image),)
    c.loss.num_obj_classes, c.loss.num_ocr_classes = k, v
    c.loss.sample_rate = 1.0
    c.loss.scale, c.loss.margin = 64.0, 0.3
    c.loss.pad_classes_to = 1
    return c


def peak_flops(n: int = 2048) -> dict:
    """The training loop's peak (rice_jax.perf: best jnp matmul, same run) and, for reference, torch's."""
    from rice_jax import perf

    torch = torch_threads()
    jax_peak = perf.peak_flops(n)
    xt = torch.ones(n, n)
    tt = timeit(lambda: xt @ xt, repeats=5)["min_s"]
    return {"jax_dot": jax_peak, "torch_matmul": 2 * n**3 / tt, "peak": jax_peak}


def build_jax_step(objective, preset, batch, image, n_regions, k, v):
    """``(run, compiled)``: one call of ``run()`` is one real train step (blocking) on one device."""
    from rice_jax import perf, sharding, train

    c = _config(objective, preset, batch, image, k, v)
    c.data.num_regions = n_regions
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])  # one device: the same cores as PyTorch
    state, setup = train.init_state(c, mesh, train.build_model_config(c), k, v)
    step, batch_sh = train.make_train_step(c, setup)
    local = random_batch(batch, image, n_regions, 4, min(k, v))
    b = train.to_global_batch(local, batch_sh)
    compiled = train.compile_step(step, state, b)
    holder = {"s": state}

    def run():
        holder["s"], m = compiled(holder["s"], b)
        jax.block_until_ready(m["loss"])

    run.model_flops = perf.model_flops(c, setup.num_obj_classes, setup.num_ocr_classes, batch, (image, image))
    return run, compiled


def jax_step(objective, preset, batch, image, n_regions, k, v, repeats):
    run, _ = build_jax_step(objective, preset, batch, image, n_regions, k, v)
    return timeit(run, warmup=1, repeats=repeats), run.model_flops


def build_torch_step(preset, batch, image, k):
    """``run()``: one PyTorch eager step (HF MLCDVisionModel + the same margin softmax + AdamW)."""
    torch = torch_threads()
    from transformers import MLCDVisionModel

    from rice_jax.models import hf
    from rice_jax.models.config import get_preset
    from rice_jax.models.vit import ViT
    from flax import nnx

    vit = ViT(get_preset(preset), rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as d:
        hf.save_hf(vit, d)
        model = MLCDVisionModel.from_pretrained(d, attn_implementation="sdpa").train()
    centers = torch.nn.Parameter(0.01 * torch.randn(k, vit.cfg.hidden_size))
    opt = torch.optim.AdamW(list(model.parameters()) + [centers], lr=1e-3, weight_decay=0.05)
    x = torch.randn(batch, 3, image, image)
    labels = torch.randint(0, k, (batch,))

    def loss_fn(emb):
        f = torch.nn.functional.normalize(emb, dim=1)
        cos = f @ torch.nn.functional.normalize(centers, dim=1).T
        pos = torch.nn.functional.one_hot(labels, k).bool()
        cp = cos[pos].clamp(-1 + 1e-6, 1 - 1e-6)
        zp = 64 * torch.cos(torch.acos(cp) + 0.3)
        zn = torch.where(pos, torch.full_like(cos, -float("inf")), 64 * cos)
        zero = torch.zeros(batch, 1)
        return (torch.logsumexp(torch.cat([zero, -zp[:, None]], 1), 1)
                + torch.logsumexp(torch.cat([zero, zn], 1), 1)).mean()

    def run():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(pixel_values=x).pooler_output).backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + [centers], 1.0)
        opt.step()

    return run


def torch_step(preset, batch, image, k, repeats):
    return timeit(build_torch_step(preset, batch, image, k), warmup=1, repeats=repeats)


def step_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The step's own options, shared with ``benchmarks.step_profile`` (which profiles this step)."""
    ap.add_argument("--preset", default="vit_b16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--smoke", action="store_true", help="vit_tiny, batch 2, 64 classes: plumbing only")
    return ap


def parse_step_arguments(ap: argparse.ArgumentParser, argv) -> argparse.Namespace:
    a = ap.parse_args(argv)
    if a.smoke:
        a.preset, a.batch, a.classes = "vit_tiny", 2, 64
    return a


def main(argv=None):
    ap = step_arguments(argparse.ArgumentParser())
    ap.add_argument("--regions", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    a = parse_step_arguments(ap, argv)
    if a.smoke:
        a.regions, a.repeats = 3, 1
    from rice_jax.models.config import get_preset

    image = get_preset(a.preset).image_size
    peak = peak_flops(512 if a.smoke else 2048)
    t_mlcd, f_mlcd = jax_step("mlcd", a.preset, a.batch, image, a.regions, a.classes, a.classes, a.repeats)
    t_rice, f_rice = jax_step("rice", a.preset, a.batch, image, a.regions, a.classes, a.classes, a.repeats)
    t_torch = torch_step(a.preset, a.batch, image, a.classes, a.repeats)
    rec = {
        "preset": a.preset, "batch": a.batch, "image_size": image, "regions": a.regions, "classes": a.classes,
        "peak_flops": peak,
        "jax_global_only": {"step_s": t_mlcd["median_s"], "images_per_s": a.batch / t_mlcd["median_s"],
                            "flops": f_mlcd, "mfu": f_mlcd / t_mlcd["median_s"] / peak["peak"]},
        "jax_rice": {"step_s": t_rice["median_s"], "images_per_s": a.batch / t_rice["median_s"],
                     "flops": f_rice, "mfu": f_rice / t_rice["median_s"] / peak["peak"]},
        "torch_global_only": {"step_s": t_torch["median_s"], "images_per_s": a.batch / t_torch["median_s"],
                              "mfu_at_jax_flops": f_mlcd / t_torch["median_s"] / peak["peak"]},
        "jax_over_torch_same_objective": t_torch["median_s"] / t_mlcd["median_s"],
    }
    return report("train_step" if not a.smoke else "train_step_smoke", rec, write=not a.smoke)


if __name__ == "__main__":
    main()
