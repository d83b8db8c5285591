#!/usr/bin/env bash
# SLURM, one process per GPU: jax.distributed.initialize() picks up SLURM_* variables
# (coordinator = first node, process id = SLURM_PROCID).
#   sbatch --nodes=8 --ntasks-per-node=8 --gpus-per-node=8 launch/gpu_slurm.sh WORKDIR [--config.key=value ...]
#SBATCH --job-name=rice_jax
#SBATCH --exclusive
set -euo pipefail
WORKDIR="${1:?usage: sbatch ... launch/gpu_slurm.sh WORKDIR [overrides]}"; shift
CONFIG="${CONFIG:-configs/gpu_cluster.py}"
# XLA flags that matter on GPUs: latency-hiding scheduler, cuDNN attention is picked automatically.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
# Install once per node beforehand: pip install -r requirements.txt 'jax[cuda12]==0.10.2' && pip install -e .
srun --kill-on-bad-exit=1 python -m rice_jax.train --config "$CONFIG" --workdir "$WORKDIR" --distributed "$@"
