"""The method learns: a short RICE run moves held-out region probes clearly above random init.

Oracle labels (the generator's categories) isolate the learning from the quality
of the pseudo-labels; the probes are frozen-backbone and on held-out images.
"""
from pathlib import Path

import pytest

from rice_jax.configs.rice import get_config
from rice_jax import backbones, evaluate, train
from rice_jax.labelling import clustering
from rice_jax.data import synthetic

ROOT = Path(__file__).resolve().parents[1]
STEPS = 450


def _config():
    return get_config("tiny")


@pytest.mark.slow(seconds=150)
def test_short_run_lifts_region_probes_above_random_init(tmp_path):
    train_dir, eval_dir = tmp_path / "train", tmp_path / "eval"
    synthetic.build(str(train_dir), 2048, seed=7, num_shards=2)
    synthetic.build(str(eval_dir), 256, seed=8, num_shards=1)
    clustering.oracle_labels(train_dir, log=lambda s: None)
    c = _config()
    c.data.dir = str(train_dir)
    c.loss.ocr_weight = 0.0            # objects only: the probes below are object probes
    c.stages = ((STEPS, c.stages[0][1]),)
    c.progress_bar, c.checkpoint_every = False, 10**9
    s = train.train(c, tmp_path / "run")
    first, last = s["history"][0], s["history"][-1]
    assert last["object/top1_acc"] > first["object/top1_acc"] + 0.1, (first, last)

    size = c.stages[0][1]
    model = backbones.load(f"ckpt:{tmp_path / 'run'}", regions=True)   # the RICE model, region tokens as trained
    trained = evaluate.evaluate_backbone(model, eval_dir, size)
    random = evaluate.evaluate_backbone(evaluate.random_like(model, 0), eval_dir, size)
    print("trained vs random:", {k: (round(trained[k], 3), round(random[k], 3)) for k in
                                 ("region_token_linear_acc", "region_linear_acc")})
    assert trained["region_token_linear_acc"] > random["region_token_linear_acc"] + 0.12, (trained, random)
    assert trained["region_linear_acc"] > random["region_linear_acc"] + 0.06, (trained, random)

    # Downstream: the synthetic referring segmentation task (rice_jax.downstream), same head budget.
    from rice_jax.downstream import common, refseg, sources
    from rice_jax.downstream.encoders import FrozenEncoder

    down = tmp_path / "down"
    synthetic.build(str(down), 320, seed=9, num_shards=1)
    cfg = refseg.RefSegConfig(train=common.HeadTraining(steps=400))
    ciou = {name: refseg.run(FrozenEncoder(m), sources.open_source(f"synthetic:{down}"), cfg=cfg,
                             log=None)["splits"]["test"]["ciou"]
            for name, m in (("trained", model), ("random", evaluate.random_like(model, 0)))}
    print("refseg cIoU", ciou)
    assert ciou["trained"] > ciou["random"] + 0.04, ciou
