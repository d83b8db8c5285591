"""A TPU pod run (``launch/tpu_pod.sh``): ViT-B/16 on a v5p slice, data and run folder in a bucket.

    CONFIG=configs/pod_v5p.py TPU_NAME=my-v5p-1024 ZONE=us-east5-a WORKDIR=gs://BUCKET/runs/b16 \
        DATA=/gcs/BUCKET/regions GCSFUSE_BUCKET=BUCKET bash launch/tpu_pod.sh

What a pod run changes from the paper config: checkpoints every 2,000 steps instead of 1,000
(each save writes ~1.2 GB per 100M parameters: fp32 weights and two Adam moments, plus the centres), metrics every 50 steps,
no progress bar (logs go to files), and damaged shards are skipped and counted instead of
stopping every host.
"""
from rice_jax.configs import rice


def get_config(arg=None):
    c = rice.get_config(",".join(["b16"] + ([arg] if arg else [])))
    if not c.runlocal:
        c.checkpoint_every = 2000
        c.log_every = 50
    c.progress_bar = False
    c.data.skip_damaged_shards = True
    return c
