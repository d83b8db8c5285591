#!/usr/bin/env bash
# Run a rice_jax module on every worker of a Cloud TPU VM pod slice, as one multi-process job:
# jax.distributed.initialize() (--distributed) reads the topology from the TPU metadata.
#
# Training (the default MODULE; each host reads its own slice of the data through Grain):
#   TPU_NAME=my-v5p-128 ZONE=us-east5-a WORKDIR=gs://bucket/rice/l14 DATA=/gcs/bucket/regions \
#     bash launch/tpu_pod.sh [--config.key=value ...]
# Any other module that takes --distributed (clustering: each host extracts and labels its own
# record shards with the JAX teacher on its chips):
#   TPU_NAME=... ZONE=... MODULE=rice_jax.labelling.clustering bash launch/tpu_pod.sh \
#     --data /gcs/bucket/regions --k 1000000 --extractor hf:/gcs/bucket/clip-vit-large-patch14-336
# The end-to-end order (mine -> tokenizer -> clustering -> train) is in docs/training.md.
#
# WORKDIR may be gs:// (checkpoints, metrics, TensorBoard and config go to the bucket through
# etils.epath). DATA must be a path every host can read as local files: ArrayRecord opens local
# files only, so mount the bucket with gcsfuse first (GCSFUSE_BUCKET=bucket mounts it at /gcs/bucket).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
MODULE="${MODULE:-rice_jax.train}"
CONFIG="${CONFIG:-configs/l14_224_336.py}"
REPO_DIR="${REPO_DIR:-~/rice_jax}"
MOUNT=""
if [ -n "${GCSFUSE_BUCKET:-}" ]; then
  MOUNT="sudo mkdir -p /gcs/$GCSFUSE_BUCKET && sudo chown \$USER /gcs/$GCSFUSE_BUCKET && (mountpoint -q /gcs/$GCSFUSE_BUCKET || gcsfuse --implicit-dirs $GCSFUSE_BUCKET /gcs/$GCSFUSE_BUCKET);"
fi
if [ "$MODULE" = "rice_jax.train" ]; then
  : "${WORKDIR:?set WORKDIR}" "${DATA:?set DATA (a local or gcsfuse path)}"
  ARGS="--config $CONFIG --workdir $WORKDIR --config.data.dir=$DATA --distributed $*"
else
  ARGS="--distributed $*"
fi
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e; cd $REPO_DIR; $MOUNT
  python3.11 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2' && .venv/bin/pip install -q --no-deps -e .
  .venv/bin/python -m $MODULE $ARGS"
