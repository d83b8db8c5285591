"""Forward images/s of the JAX ViT vs HF ``MLCDVisionModel`` (PyTorch eager), same weights.

    python -m benchmarks.vit_forward                 # ViT-B/16 @ 224, batch 8, fp32
    python -m benchmarks.vit_forward --smoke         # tiny sizes (used by the tests)
"""
from __future__ import annotations

import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import report, timeit, torch_threads
from rice_jax.models import hf
from rice_jax.models import config as mcfg
from rice_jax.models.vit import ViT


def run(preset: str, batch: int, repeats: int, attention_impl: str, write: bool,
        num_regions: int = 10, region_layers: int = 2):
    cfg = mcfg.get_preset(preset, attention_impl=attention_impl)
    vit = ViT(cfg, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)

    graphdef, state = nnx.split(vit)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).pooler_output)
    xj = jnp.asarray(x)
    jax_t = timeit(lambda: fwd(state, xj).block_until_ready(), repeats=repeats)

    torch = torch_threads()
    from transformers import MLCDVisionModel

    with tempfile.TemporaryDirectory() as d:
        hf.save_hf(vit, d)
        torch_model = MLCDVisionModel.from_pretrained(d).eval()
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.inference_mode():
        torch_t = timeit(lambda: torch_model(pixel_values=xt), repeats=repeats)
        ref = torch_model(pixel_values=xt).pooler_output.numpy()
    max_diff = float(np.max(np.abs(np.asarray(fwd(state, xj)) - ref)))

    # RICE: the same backbone with N region tokens in the last k blocks.
    from rice_jax.models.rice import RICEConfig, RICEModel

    rice = RICEModel(RICEConfig(backbone=cfg, region_layers=region_layers), rngs=nnx.Rngs(0), backbone=vit)
    rg, rs = nnx.split(rice)
    r = np.random.default_rng(1)
    lo = r.uniform(0, 0.6, (batch, num_regions, 2))
    boxes = jnp.asarray(np.concatenate([lo, lo + r.uniform(0.1, 0.4, lo.shape)], -1).clip(0, 1), jnp.float32)
    valid = jnp.ones((batch, num_regions), bool)
    rfwd = jax.jit(lambda s, x, b, v: nnx.merge(rg, s)(x, b, v).region_embed)
    # Interleave the two measurements so machine noise hits both alike.
    vit_t2 = timeit(lambda: fwd(state, xj).block_until_ready(), repeats=repeats)
    rice_t = timeit(lambda: rfwd(rs, xj, boxes, valid).block_until_ready(), repeats=repeats)

    jax_ips = batch / jax_t["median_s"]
    torch_ips = batch / torch_t["median_s"]
    return report("vit_forward" if write else "vit_forward_smoke", {
        "preset": preset, "batch": batch, "image_size": cfg.image_size, "dtype": "float32",
        "attention_impl": attention_impl, "jax_images_per_s": jax_ips, "torch_images_per_s": torch_ips,
        "jax_over_torch": jax_ips / torch_ips, "jax": jax_t, "torch": torch_t,
        "max_abs_diff_pooler": max_diff,
        "rice": {"num_regions": num_regions, "region_layers": region_layers, "rice": rice_t, "vit": vit_t2,
                 "overhead": rice_t["median_s"] / vit_t2["median_s"] - 1.0},
    }, write=write)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="vit_b16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--attention-impl", default="auto")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few repeats, results not written")
    a = ap.parse_args(argv)
    if a.smoke:
        return run("vit_tiny", 2, 2, a.attention_impl, write=False)
    return run(a.preset, a.batch, a.repeats, a.attention_impl, write=True)


if __name__ == "__main__":
    main()
