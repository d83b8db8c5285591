"""Evaluation: the probes separate informative from uninformative features; the CLI path runs."""
import numpy as np
import pytest
from flax import nnx

from rice_jax import evaluate
from rice_jax.labelling import clustering
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
    tr, te = evaluate.split_by_image(items)
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
    for k in ("region_linear_acc", "region_knn_acc", "dense_miou", "ocr_token_recall@5", "ocr_layout_recall@5",
              "global_linear_acc"):
        assert 0.0 <= res[k] <= 1.0, k
    assert res["num_regions_test"] > 50


def test_box_layout_is_the_roi_align_of_the_probe_layer():
    """The OCR layout feature is the 2 x 4 RoIAlign of the probe layer's patch tokens, row-major,
    beside the mean pool of the same tokens (tests/test_region checks roi_align itself)."""
    import jax.numpy as jnp

    from rice_jax.labelling.features import RegionFeatures
    from rice_jax.models.region import box_patch_visibility, roi_align, roi_mean_pool

    vit = ViT(get_preset("vit_tiny"), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    boxes = np.array([[[0.1, 0.2, 0.9, 0.5], [0.0, 0.0, 1.0, 1.0]]] * 2, np.float32)
    valid = np.ones((2, 2), bool)
    out = RegionFeatures(vit, 64, layers=(-2,), keep_tokens=True, layout_layers=(-2,))(x, boxes, valid)
    key = str(vit.cfg.num_layers - 1)
    gh, gw = vit.grid(64, 64)
    ref = np.asarray(roi_align(jnp.asarray(out["tokens"][key]), jnp.asarray(boxes), gh, gw, 2, 4))
    d = out["tokens"][key].shape[-1]
    np.testing.assert_allclose(out["layout"][key], ref.reshape(2, 2, 8 * d), atol=1e-5)
    # The mean pool is what the layout loses: the visible patches' average, not their places.
    vis = box_patch_visibility(jnp.asarray(boxes), jnp.asarray(valid), gh, gw)
    mean = np.asarray(roi_mean_pool(jnp.asarray(out["tokens"][key]), vis))
    np.testing.assert_allclose(out["roi"][key], mean, atol=1e-5)
    assert np.abs(ref[:, 1, :, 0] - ref[:, 1, :, -1]).mean() > 0.1 * np.abs(ref).mean()
