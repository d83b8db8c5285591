"""The quickstart's run: ViT-tiny at 64 px on the embedded synthetic data (CPU, minutes).

    python -m rice_jax.train --config configs/tiny.py --workdir /tmp/rice_tiny --config.data.dir=DATA

Every setting is the package default for the ``tiny`` variant (``rice_jax/configs/rice.py``, the one
source of defaults); edit a copy of this file, or override on the command line, to depart from it.
"""
from rice_jax.configs import rice


def get_config(arg=None):
    return rice.get_config(",".join(["tiny"] + ([arg] if arg else [])))
