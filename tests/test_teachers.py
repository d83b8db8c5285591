"""JAX CLIP / SigLIP teachers against transformers on random tiny configs saved to a temp dir."""
import numpy as np
import pytest
import torch

from rice_jax import backbones, errors
from rice_jax.features import RegionFeatures, TransformersRegionFeatures
from rice_jax.models import teachers

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
            image_size=32)


def _randomise(model, seed):
    """HF initialises biases / LN / embeddings to constants: randomise every tensor so each mapping is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _save(kind, path, seed=0, **kw):
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "clip":
        model = tf.CLIPVisionModel(tf.CLIPVisionConfig(**TINY, **kw))
    elif kind == "siglip":
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(**TINY, **kw))
    elif kind == "clip_full":
        cfg = tf.CLIPConfig(vision_config=dict(TINY, **kw), text_config=dict(hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=4))
        model = tf.CLIPModel(cfg)
    else:
        cfg = tf.SiglipConfig(vision_config=dict(TINY, **kw), text_config=dict(hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=4))
        model = tf.SiglipModel(cfg)
    model = _randomise(model.eval(), seed + 1)
    model.save_pretrained(str(path))
    return model


def _reference(model, x_nhwc):
    vision = model.vision_model if hasattr(model, "text_model") else model
    with torch.no_grad():
        out = vision(pixel_values=torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))),
                     output_hidden_states=True, interpolate_pos_encoding=True)
    return out


@pytest.fixture(scope="module", params=["clip", "siglip", "clip_full", "siglip_full"])
def saved(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, _save(request.param, path, seed=3)


@pytest.mark.parametrize("hw", [(32, 32), (48, 48), (40, 24)])   # native, larger, non-square
def test_teacher_matches_transformers(saved, hw):
    kind, path, model = saved
    teacher = backbones.load(f"hf:{path}")
    assert isinstance(teacher, teachers.VisionTeacher) and teacher.cfg.family == kind.split("_")[0]
    x = np.random.default_rng(hw[0]).standard_normal((2, *hw, 3)).astype(np.float32)
    ref = _reference(model, x)
    out = teacher(x, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == TINY["num_hidden_layers"] + 1
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        np.testing.assert_allclose(np.asarray(mine), theirs.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), ref.last_hidden_state.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(out.pooler_output), ref.pooler_output.numpy(), atol=1e-4, rtol=0)


def test_bf16_close_to_fp32(saved):
    _, path, _ = saved
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    f32 = np.asarray(backbones.load(f"hf:{path}")(x).last_hidden_state)
    b16 = np.asarray(backbones.load(f"hf:{path}", dtype="bfloat16")(x).last_hidden_state, np.float32)
    assert np.abs(b16 - f32).max() < 0.05 * np.abs(f32).max()


def test_bicubic_matrix_is_torchs():
    """The position-embedding resize on its own, against torch.nn.functional.interpolate."""
    grid = np.random.default_rng(0).standard_normal((7 * 7, 5)).astype(np.float32)
    for gh, gw in [(7, 7), (11, 4), (3, 16)]:
        ref = torch.nn.functional.interpolate(torch.from_numpy(grid.reshape(1, 7, 7, 5)).permute(0, 3, 1, 2),
                                              size=(gh, gw), mode="bicubic", align_corners=False)
        ref = ref.permute(0, 2, 3, 1).reshape(gh * gw, 5).numpy()
        np.testing.assert_allclose(np.asarray(teachers.resize_position_embeddings(grid, 7, gh, gw)), ref, atol=1e-5)


def test_roi_features_equal_the_pytorch_reference_path(tmp_path):
    """Clustering's two teacher paths agree: the JAX tower through RegionFeatures and the PyTorch model
    through TransformersRegionFeatures (CLIP: last hidden state minus the class token; both take uint8
    pixels, and SigLIP-style statistics in preprocessor_config.json are honoured by both)."""
    import json

    _save("clip", tmp_path, seed=5)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5],
                                                                   "image_std": [0.5, 0.5, 0.5]}))
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    p0 = rng.uniform(0, 0.5, (3, 4, 2))
    boxes = np.concatenate([p0, p0 + rng.uniform(0.2, 0.5, (3, 4, 2))], -1).clip(0, 1).astype(np.float32)
    valid = np.ones((3, 4), bool)
    ours = RegionFeatures(backbones.load(f"hf:{tmp_path}"), 32)(x, boxes, valid)["roi"]["2"]
    ref = TransformersRegionFeatures(str(tmp_path), device="cpu")(x, boxes, valid)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    with pytest.raises(errors.InputError, match="takes uint8 RGB pixels"):
        RegionFeatures(backbones.load(f"hf:{tmp_path}"), 32)(x.astype(np.float32), boxes, valid)


def test_bad_teacher_folders_are_one_line_errors(tmp_path):
    import json

    _save("siglip", tmp_path, seed=1)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.InputError, match="does not match its weights: .*expected"):
        backbones.load(f"hf:{tmp_path}")
    with pytest.raises(errors.InputError, match="takes only dtype and attention_impl"):
        backbones.load(f"hf:{tmp_path}", remat_policy="dots_saveable")
    with pytest.raises(errors.InputError, match="region tokens run on an MLCD/RICE backbone"):
        cfg["hidden_size"] = 32
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        RegionFeatures(backbones.load(f"hf:{tmp_path}"), 32, region_layers=1)
