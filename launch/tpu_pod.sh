#!/usr/bin/env bash
# Launch on every worker of a Cloud TPU VM pod slice. jax.distributed.initialize() reads the
# topology from the TPU metadata; each host reads its own slice of the data (Grain, process_index).
#   TPU_NAME=my-v5p-128 ZONE=us-east5-a WORKDIR=gs://bucket/rice/l14 bash launch/tpu_pod.sh [--config.key=value ...]
# The data dir and workdir must be visible to every host (GCS via gcsfuse, or a shared filesystem).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
CONFIG="${CONFIG:-configs/rice.py:l14_336}"
REPO_DIR="${REPO_DIR:-~/rice_jax}"
ARGS="$*"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e; cd $REPO_DIR
  python3.11 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2' && .venv/bin/pip install -q --no-deps -e .
  .venv/bin/python -m rice_jax.train --config $CONFIG --workdir $WORKDIR --distributed $ARGS"
