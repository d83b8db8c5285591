"""The paper's ViT-L/14 run continued at 336 px: 400K steps at 224, then 30K at 336 with lr / 10.

    python -m rice_jax.train --config configs/l14_224_336.py --workdir gs://BUCKET/runs/l14_336 \
        --config.data.dir=/gcs/BUCKET/regions --distributed
"""
from rice_jax.configs import rice


def get_config(arg=None):
    return rice.get_config(",".join(["l14_336"] + ([arg] if arg else [])))
