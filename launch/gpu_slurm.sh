#!/usr/bin/env bash
# SLURM, one process per GPU: jax.distributed.initialize() (--distributed) picks up SLURM_*
# variables (coordinator = first node, process id = SLURM_PROCID).
#
# Training (the default MODULE):
#   sbatch --nodes=8 --ntasks-per-node=8 --gpus-per-node=8 launch/gpu_slurm.sh WORKDIR [--config.key=value ...]
# Any other module that takes --distributed (clustering: each process extracts and labels its own
# record shards on its GPU):
#   MODULE=rice_jax.labelling.clustering sbatch --nodes=8 --ntasks-per-node=8 --gpus-per-node=8 launch/gpu_slurm.sh \
#     --data /shared/regions --k 1000000 --extractor hf:/shared/clip-vit-large-patch14-336
# The end-to-end order (mine -> tokenizer -> clustering -> train) is in docs/training.md.
#SBATCH --job-name=rice_jax
#SBATCH --exclusive
set -euo pipefail
MODULE="${MODULE:-rice_jax.train}"
CONFIG="${CONFIG:-configs/gpu_cluster.py}"
# XLA flags that matter on GPUs: latency-hiding scheduler, cuDNN attention is picked automatically.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
# Install once per node beforehand: pip install -r requirements.txt 'jax[cuda12]==0.10.2' && pip install -e .
if [ "$MODULE" = "rice_jax.train" ]; then
  WORKDIR="${1:?usage: sbatch ... launch/gpu_slurm.sh WORKDIR [overrides]}"; shift
  srun --kill-on-bad-exit=1 python -m rice_jax.train --config "$CONFIG" --workdir "$WORKDIR" --distributed "$@"
else
  srun --kill-on-bad-exit=1 python -m "$MODULE" --distributed "$@"
fi
