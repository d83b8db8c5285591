"""The paper's ViT-B/16 run: 400K steps at 224 px, then 30K at 512 px with lr / 10 (global batch 32K).

    python -m rice_jax.train --config configs/b16_224_512.py --workdir gs://BUCKET/runs/b16 \
        --config.data.dir=/gcs/BUCKET/regions --distributed

Sized with ``bash launch/plan.sh`` (docs/performance.md): bf16 with dots remat fits a v5p-1024 slice
(512 chips) at both resolutions. ``arg`` passes through (``objective=mlcd``, ``runlocal``).
"""
from rice_jax.configs import rice


def get_config(arg=None):
    return rice.get_config(",".join(["b16"] + ([arg] if arg else [])))
