#!/usr/bin/env bash
# Ahead-of-time sizing of the train step for a TPU topology (rice_jax.preflight.plan), in its own .venv-plan:
# jax[tpu] brings libtpu, which must stay out of the main .venv (with libtpu importable, `import jax`
# on a machine without TPUs probes for a TPU and a cloud metadata server). Always run with the
# metadata query off and the CPU platform: nothing leaves this machine.
#   bash launch/plan.sh --config rice_jax/configs/rice.py:l14_336 --topology v5p:4x4x4
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source launch/_venv_plan.sh
export TPU_SKIP_MDS_QUERY=1 TPU_WORKER_ID=0 TPU_WORKER_HOSTNAMES=localhost JAX_PLATFORMS=cpu
exec .venv-plan/bin/python -m rice_jax.preflight.plan "$@"
