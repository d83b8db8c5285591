#!/usr/bin/env bash
# Multi-host on one machine: N processes x D CPU devices form one mesh over CPU collectives (gloo),
# exercising the same code path as a TPU pod or a multi-GPU cluster.
#   bash launch/local_multiprocess.sh WORKDIR [--config.key=value ...]
# Env: NUM_PROCESSES (2), DEVICES_PER_PROCESS (4), CONFIG (rice_jax/configs/rice.py:tiny), PORT (free port).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
WORKDIR="${1:?usage: launch/local_multiprocess.sh WORKDIR [--config.key=value ...]}"; shift
NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
CONFIG="${CONFIG:-rice_jax/configs/rice.py:tiny}"
PORT="${PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}"
pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  python -m rice_jax.train --config "$CONFIG" --workdir "$WORKDIR" \
    --coordinator-address "127.0.0.1:${PORT}" --num-processes "$NUM_PROCESSES" --process-id "$i" "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit "$rc"
