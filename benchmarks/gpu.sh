#!/usr/bin/env bash
# The GPU benchmark in one command, on a machine with NVIDIA GPUs and CUDA 12/13 drivers:
# makes .venv (pinned CPU deps) plus jax[cuda] in it, then runs benchmarks/gpu.py.
#   bash benchmarks/gpu.sh [--variant l14_336 --batch 256]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/_venv.sh"
python -c "import jax; assert jax.default_backend() == 'gpu'" 2>/dev/null || \
  python -m pip install -q "jax[cuda13]==0.10.2"
cd "$ROOT"
exec python -m benchmarks.gpu "$@"
