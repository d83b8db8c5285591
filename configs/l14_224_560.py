"""The paper's ViT-L/14 run continued at 560 px (the released RICE-ViT-L/14-560 resolution).

    python -m rice_jax.train --config configs/l14_224_560.py --workdir gs://BUCKET/runs/l14_560 \
        --config.data.dir=/gcs/BUCKET/regions --distributed

At 560 px the planner leaves almost no HBM headroom on 512 v5p chips (94.6 of 95 GiB): this run
therefore halves the rows in memory with two gradient-accumulation microbatches (same update).
"""
from rice_jax.configs import rice


def get_config(arg=None):
    c = rice.get_config(",".join(["l14_560"] + ([arg] if arg else [])))
    if not c.runlocal:
        c.grad_accum_steps = 2
    return c
