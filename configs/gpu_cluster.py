"""A multi-node GPU run (``launch/gpu_slurm.sh``, one process per GPU): ViT-L/14 at 336 px.

    CONFIG=configs/gpu_cluster.py sbatch --nodes=8 --ntasks-per-node=8 --gpus-per-node=8 \
        launch/gpu_slurm.sh /shared/runs/l14 --config.data.dir=/shared/regions

What a GPU cluster changes from the paper config: the global batch of 32K is reached with 4
gradient-accumulation microbatches (the same update; a quarter of each GPU's share of the batch
in memory at once, since a GPU has less memory than the v5p chips the paper config was sized
for), ``attention_impl="auto"`` (cuDNN on GPU, stated so a log shows it), no progress bar.
"""
from rice_jax.configs import rice


def get_config(arg=None):
    c = rice.get_config(",".join(["l14_336"] + ([arg] if arg else [])))
    if not c.runlocal:
        c.grad_accum_steps = 4
    c.model.attention_impl = "auto"
    c.progress_bar = False
    return c
