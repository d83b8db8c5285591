"""Export a backbone as a Hugging Face ``MLCDVisionModel`` folder (safetensors; PyTorch loads it).

    python -m rice_jax.export --from ckpt:RUN --to-hf OUT_DIR --verify
    python -m rice_jax.export --from hf:SRC_DIR --to-hf OUT_DIR --torch-state-dict
    python -m rice_jax.export --from preset:vit_tiny --seed 0 --to-hf OUT_DIR    # a fresh initialisation

``--from`` takes the one backbone spec of :mod:`rice_jax.backbones`: ``hf:``, ``ckpt:``, ``hub:`` or
``preset:NAME`` (a :mod:`rice_jax.models.config` preset, randomly initialised: for tests and tooling). Only the backbone is written: RICE heads, region tokens and centres are training-only.
``--verify`` reloads the folder with ``transformers`` and compares outputs.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from rice_jax import backbones, cli, storage
from rice_jax.models import hf


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", required=True,
                    help="hf:DIR, ckpt:RUN, hub:ID (downloads) or preset:NAME (fresh initialisation)")
    ap.add_argument("--seed", type=int, default=0, help="init seed for --from preset:NAME")
    ap.add_argument("--to-hf", required=True, help="output directory (local or gs://...)")
    ap.add_argument("--torch-state-dict", action="store_true", help=f"also write {hf.TORCH_STATE_DICT}")
    ap.add_argument("--verify", action="store_true", help="reload with transformers and compare outputs")
    ap.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"))
    args = ap.parse_args(argv)
    model = backbones.load(backbones.parse(args.source, backbones.JAX_SCHEMES, what="--from"), seed=args.seed)
    out = hf.save_hf(model, args.to_hf, torch_state_dict=args.torch_state_dict)
    print(f"wrote {out}")
    if args.verify:
        cfg = model.cfg
        h, w = args.image_size or (cfg.image_size, cfg.image_size)
        x = np.random.default_rng(0).standard_normal((2, h, w, cfg.num_channels)).astype(np.float32)
        diffs = hf.compare_with_transformers(model, storage.download_dir(out), x)
        print(json.dumps({"verify": diffs}))
        if max(diffs.values()) > 1e-3:
            raise SystemExit(f"export parity check failed: {diffs}")


if __name__ == "__main__":
    cli.run(main)
