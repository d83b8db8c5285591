"""Evaluation: the probes separate informative from uninformative features; the CLI path runs."""
import numpy as np
import pytest
from flax import nnx

from rice_jax import clustering, evaluate
from rice_jax.data import records, tokenizer
from rice_jax.models.config import get_preset
from rice_jax.models.vit import ViT
from tests.helpers import synthetic_dataset


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    return synthetic_dataset(tmp_path_factory.mktemp("eval"), 96, seed=21, num_shards=1, vocab_size=128)


def test_probe_above_chance_on_informative_features_and_chance_when_shuffled(eval_dir):
    src = records.RecordSource(eval_dir)
    items = [{"image": i, "feat": clustering.handcrafted_features(crop), "category": int(src[i].category[r])}
             for i, r, crop in clustering._iter_object_crops(src)]
    tr, te = evaluate._split(items)
    y = np.array([t["category"] for t in te])
    pred, _, _ = evaluate._probe(tr, te, "category")
    assert np.mean(pred == y) > 0.4          # 12 classes: chance is ~0.08
    rng = np.random.default_rng(0)
    shuffled = [dict(t, category=int(c)) for t, c in zip(tr, rng.permutation([t["category"] for t in tr]))]
    pred_s, _, _ = evaluate._probe(shuffled, te, "category")
    assert np.mean(pred_s == y) < 0.2


def test_evaluate_backbone_reports_every_metric(eval_dir):
    vit = ViT(get_preset("vit_tiny"), rngs=nnx.Rngs(0))
    res = evaluate.evaluate_backbone(vit, eval_dir, 64, tokenizer.OCRTokenizer(eval_dir))
    for k in ("region_linear_acc", "region_knn_acc", "dense_miou", "ocr_token_recall@5", "global_linear_acc"):
        assert 0.0 <= res[k] <= 1.0, k
    assert res["num_regions_test"] > 50
