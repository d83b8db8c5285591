"""Teacher ROI extraction: the JAX CLIP tower vs transformers' PyTorch one, same CPU, same inputs.

    python -m benchmarks.teacher_extraction [--smoke]

A randomly initialised CLIP ViT-B/16 @ 224 (the architecture, not the weights, sets the cost) is
saved to a temp folder and loaded both ways: ``hf:DIR`` (rice_jax.models.teachers through
RegionFeatures, jitted) and ``transformers:DIR`` (TransformersRegionFeatures, PyTorch eager, every
core). Both extract last-layer ROI features of the same batch; the result also checks that they
agree. The projection to the paper's 2B regions (400M images at 5 regions each) divides the
model FLOPs of that many forwards (``perf.vision_forward_flops``) by chips x datasheet bf16 peak x
an assumed MFU (stated in the result).
"""
from __future__ import annotations

import argparse
import tempfile

import numpy as np

from benchmarks.common import report, timeit, torch_threads

PAPER_IMAGES, PAPER_REGIONS = 400_000_000, 2_000_000_000
TARGETS = (("v5p", 64, "v5p-128 (64 chips)"), ("h100", 64, "64 H100"))


def gemm_rates(torch, rows: int, d: int, hidden: int) -> dict:
    """fp32 FLOP/s of the tower's MLP matmul, ``[rows, d] @ [d, hidden]`` (the bulk of its FLOPs), in
    ``jnp`` (XLA:CPU) and ``torch`` on the same cores: how much of the forward's ratio is the GEMM's."""
    import jax
    import jax.numpy as jnp

    from benchmarks.common import timeit

    xj, wj = jnp.ones((rows, d), jnp.float32), jnp.ones((d, hidden), jnp.float32)
    f = jax.jit(lambda a, w: a @ w)
    xt, wt = torch.ones(rows, d), torch.ones(d, hidden)
    flops = 2.0 * rows * d * hidden
    return {"shape": [rows, d, hidden],
            "jax": flops / timeit(lambda: f(xj, wj).block_until_ready(), repeats=5)["min_s"],
            "torch": flops / timeit(lambda: xt @ wt, repeats=5)["min_s"]}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--regions", type=int, default=10)
    ap.add_argument("--mfu", type=float, default=0.4)
    a = ap.parse_args(argv)
    torch = torch_threads()
    import jax
    import transformers as tf

    from rice_jax import backbones, perf
    from rice_jax.labelling.features import RegionFeatures, TransformersRegionFeatures

    arch = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                patch_size=16, image_size=224)
    if a.smoke:
        arch.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=64)
    size, b, n = arch["image_size"], a.batch, a.regions
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
    p0 = rng.uniform(0, 0.6, (b, n, 2))
    boxes = np.concatenate([p0, np.minimum(p0 + rng.uniform(0.1, 0.4, (b, n, 2)), 1)], -1).astype(np.float32)
    valid = np.ones((b, n), bool)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        tf.CLIPVisionModel(tf.CLIPVisionConfig(**arch)).eval().save_pretrained(tmp)
        teacher = backbones.load(f"hf:{tmp}")
        key = str(teacher.cfg.num_layers)
        ours = RegionFeatures(teacher, size)
        theirs = TransformersRegionFeatures(tmp, device="cpu")
        run_jax = lambda: ours(x, boxes, valid)["roi"][key]
        diff = float(np.abs(run_jax() - theirs(x, boxes, valid)).max())
        t_jax = timeit(run_jax, warmup=1, repeats=3)
        t_torch = timeit(lambda: theirs(x, boxes, valid), warmup=1, repeats=3)
        cfg = teacher.cfg
    regions = b * n
    gemm = gemm_rates(torch, b * ((size // arch["patch_size"]) ** 2 + 1), arch["hidden_size"], arch["intermediate_size"])
    jax_rate = regions / t_jax["median_s"] / jax.local_device_count()
    torch_rate = regions / t_torch["median_s"]
    flops_image = perf.vision_forward_flops(cfg, (size, size))
    total = flops_image * PAPER_IMAGES
    projection = {label: {"chips": chips, "bf16_peak_per_chip": perf.chip(kind)["bf16_flops"],
                          "hours": total / (chips * perf.chip(kind)["bf16_flops"] * a.mfu) / 3600}
                  for kind, chips, label in TARGETS}
    return report("teacher_extraction" if not a.smoke else "teacher_extraction_smoke", {
        "teacher": f"CLIP ViT-B/16 @ {size} (random weights)" if not a.smoke else "tiny CLIP",
        "batch": b, "regions_per_image": n, "devices": jax.local_device_count(),
        "jax_regions_per_s_per_device": jax_rate, "torch_regions_per_s": torch_rate,
        "jax_over_torch": jax_rate / torch_rate, "max_abs_diff": diff, "mlp_gemm_flop_rate": gemm,
        "flops_per_image": flops_image, "paper_images": PAPER_IMAGES, "paper_regions": PAPER_REGIONS,
        "mfu_assumed": a.mfu, "projection": projection}, write=not a.smoke)


if __name__ == "__main__":
    main()
