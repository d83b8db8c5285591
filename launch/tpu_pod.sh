#!/usr/bin/env bash
# Launch on every worker of a Cloud TPU VM pod slice. jax.distributed.initialize() reads the
# topology from the TPU metadata; each host reads its own slice of the data (Grain, process_index).
#   TPU_NAME=my-v5p-128 ZONE=us-east5-a WORKDIR=gs://bucket/rice/l14 DATA=/gcs/bucket/regions \
#     bash launch/tpu_pod.sh [--config.key=value ...]
# WORKDIR may be gs:// (checkpoints, metrics, TensorBoard and config go to the bucket through
# etils.epath). DATA must be a path every host can read as local files: ArrayRecord opens local
# files only, so mount the bucket with gcsfuse first (GCSFUSE_BUCKET=bucket mounts it at /gcs/bucket).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}" "${DATA:?set DATA (a local or gcsfuse path)}"
CONFIG="${CONFIG:-configs/l14_224_336.py}"
REPO_DIR="${REPO_DIR:-~/rice_jax}"
MOUNT=""
if [ -n "${GCSFUSE_BUCKET:-}" ]; then
  MOUNT="sudo mkdir -p /gcs/$GCSFUSE_BUCKET && sudo chown \$USER /gcs/$GCSFUSE_BUCKET && (mountpoint -q /gcs/$GCSFUSE_BUCKET || gcsfuse --implicit-dirs $GCSFUSE_BUCKET /gcs/$GCSFUSE_BUCKET);"
fi
ARGS="$*"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e; cd $REPO_DIR; $MOUNT
  python3.11 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2' && .venv/bin/pip install -q --no-deps -e .
  .venv/bin/python -m rice_jax.train --config $CONFIG --workdir $WORKDIR --config.data.dir=$DATA --distributed $ARGS"
