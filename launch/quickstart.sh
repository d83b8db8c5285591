#!/usr/bin/env bash
# The README's main command: set up .venv and run the main job end to end on
# 8 CPU-emulated devices. Idempotent; outputs go to ${WORKDIR:-runs/quickstart}.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
WORKDIR="${WORKDIR:-runs/quickstart}"
mkdir -p "$WORKDIR"
python -m rice_jax.quickstart --workdir "$WORKDIR" "$@"
