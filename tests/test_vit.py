"""ViT numerics: HF parity, attention paths, dtype/remat options, sharded forward."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rice_jax import sharding
from rice_jax.models import hf
from rice_jax.models import config as mcfg
from rice_jax.models.vit import ViT, attention
from tests.helpers import hf_forward, save_random_hf_model, tiny_hf_config

NON_SQUARE = (56, 84)  # 4 x 6 patches of 14


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_tiny")
    model = save_random_hf_model(path, seed=0)
    return path, model


def _pixels(b=2, hw=NON_SQUARE, seed=0):
    return np.random.default_rng(seed).standard_normal((b, *hw, 3)).astype(np.float32)


def test_load_hf_matches_transformers_non_square(hf_dir):
    path, hf_model = hf_dir
    vit = hf.load_hf(path)
    x = _pixels()
    ref_last, ref_pool = hf_forward(hf_model, x)
    out = vit(jnp.asarray(x))
    assert out.last_hidden_state.shape == (2, 1 + 4 * 6, 64)
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), ref_last, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(out.pooler_output), ref_pool, atol=1e-4, rtol=0)


def test_hidden_states_match_transformers(hf_dir):
    """Every per-block output the extractors read is HF's ``hidden_states`` (embeddings first)."""
    import torch

    path, hf_model = hf_dir
    vit = hf.load_hf(path)
    x = _pixels()
    with torch.no_grad():
        ref = hf_model(pixel_values=torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                       output_hidden_states=True).hidden_states
    out = vit(jnp.asarray(x), output_hidden_states=True)
    assert len(out.hidden_states) == len(ref) == vit.cfg.num_layers + 1
    for mine, theirs in zip(out.hidden_states, ref):
        np.testing.assert_allclose(np.asarray(mine), theirs.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(out.hidden_states[-1]), np.asarray(out.last_hidden_state))
    assert vit(jnp.asarray(x)).hidden_states is None


def test_same_weights_any_resolution(hf_dir):
    """2D RoPE has no size-dependent parameter: one model serves square and non-square inputs."""
    path, hf_model = hf_dir
    vit = hf.load_hf(path)
    for hw in [(28, 28), (84, 56), (112, 42)]:
        x = _pixels(1, hw, seed=hw[0])
        ref_last, _ = hf_forward(hf_model, x)
        np.testing.assert_allclose(np.asarray(vit(jnp.asarray(x)).last_hidden_state), ref_last, atol=1e-4)


def test_prefixed_checkpoint_loads(hf_dir, tmp_path):
    """Older hub checkpoints carry a ``vision_model.`` prefix on every key."""
    from safetensors.numpy import load_file, save_file

    path, hf_model = hf_dir
    state = load_file(path / "model.safetensors")
    save_file({"vision_model." + k: v for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    vit = hf.load_hf(tmp_path)
    x = _pixels(1)
    np.testing.assert_allclose(np.asarray(vit(jnp.asarray(x)).pooler_output), hf_forward(hf_model, x)[1], atol=1e-4)


def test_jax_init_save_hf_roundtrip(tmp_path):
    """JAX init -> save_hf -> transformers loads with no missing/unexpected keys -> same outputs."""
    import torch
    from transformers import MLCDVisionModel

    cfg = mcfg.ViTConfig.from_hf(tiny_hf_config())
    vit = ViT(cfg, rngs=nnx.Rngs(3))
    hf.save_hf(vit, tmp_path, torch_state_dict=True)
    torch_model, info = MLCDVisionModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    x = _pixels()
    ref_last, ref_pool = hf_forward(torch_model.eval(), x)
    out = vit(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), ref_last, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.pooler_output), ref_pool, atol=1e-4)
    # The plain torch state dict has the same names and values.
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    hf_sd = torch_model.state_dict()
    assert set(sd) == set(hf_sd)
    for k in sd:
        np.testing.assert_array_equal(sd[k].numpy(), hf_sd[k].numpy())
    # And load_hf of our own export gives back identical parameters.
    again = hf.load_hf(tmp_path)
    for a, b in zip(jax.tree.leaves(nnx.state(vit, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_one_backbone_spec_grammar(hf_dir, tmp_path):
    """Every command's backbone string goes through backbones.parse: each form, the regions: prefix,
    and a one-line error naming exactly the forms the caller accepts."""
    from rice_jax import backbones, errors

    assert backbones.parse("ckpt:gs://b/run") == backbones.Spec("ckpt", "gs://b/run")
    assert backbones.parse("regions:ckpt:/r") == backbones.Spec("ckpt", "/r", regions=True)
    assert str(backbones.parse("regions:ckpt:/r")) == "regions:ckpt:/r"
    assert backbones.parse("transformers:/m/dino").scheme == "transformers"
    for bad, needle in [("/some/dir", "hf:DIR"), ("ckpt:", "ckpt:DIR"), ("regions:hf:/d", "regions:ckpt:RUN"),
                        ("foo:bar", "transformers:DIR")]:
        with pytest.raises(errors.InputError, match=needle):
            backbones.parse(bad)
    with pytest.raises(errors.InputError) as e:
        backbones.parse("transformers:/m", backbones.JAX_SCHEMES, what="--from")
    assert str(e.value).startswith("--from 'transformers:/m': use hf:DIR") and "transformers:DIR" not in str(e.value)
    with pytest.raises(errors.InputError, match="handcrafted, oracle, hf:DIR"):
        backbones.parse("x", what="--extractor", also=("handcrafted", "oracle"))
    with pytest.raises(errors.InputError, match="region features only"):
        backbones.load("transformers:/m")
    # preset: a fresh initialisation, reproducible from its seed; hf: the folder's weights.
    a, b = backbones.load("preset:vit_tiny", seed=1), backbones.load("preset:vit_tiny", seed=1)
    for x, y in zip(jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(errors.InputError, match="unknown backbone preset"):
        backbones.load("preset:nope")
    path, model = hf_dir
    ref_last, _ = hf_forward(model, _pixels())
    out = backbones.load(f"hf:{path}")(jnp.asarray(_pixels()))
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), ref_last, atol=1e-4)


def test_mismatched_checkpoint_error_lists_keys_and_shapes(hf_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    path, _ = hf_dir
    state = load_file(path / "model.safetensors")
    del state["encoder.layers.1.mlp.fc2.bias"]
    state["encoder.layers.0.mlp.fc1.weight"] = np.zeros((7, 64), np.float32)
    state["some.extra.tensor"] = np.zeros(3, np.float32)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(hf.CheckpointMismatchError) as e:
        hf.load_hf(tmp_path)
    msg = str(e.value)
    assert "encoder.layers.1.mlp.fc2.bias" in msg and "missing keys" in msg
    assert "some.extra.tensor" in msg and "unexpected keys" in msg
    assert "encoder.layers.0.mlp.fc1.weight" in msg and "(7, 64)" in msg


def test_corrupted_safetensors_and_missing_files(hf_dir, tmp_path):
    path, _ = hf_dir
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf.load_hf(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(Exception):
        hf.load_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_hf(tmp_path / "nope")


def test_config_hf_roundtrip_and_presets():
    hf_cfg = tiny_hf_config(image_size=84, layer_norm_eps=1e-6)
    cfg = mcfg.ViTConfig.from_hf(hf_cfg)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.patch_size, cfg.layer_norm_eps) == (64, 2, 4, 14, 1e-6)
    back = cfg.to_hf()
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
              "image_size", "layer_norm_eps"):
        assert getattr(back, k) == getattr(hf_cfg, k), k
    l560 = mcfg.get_preset("vit_l14_560")
    assert (l560.hidden_size, l560.intermediate_size, l560.num_layers, l560.num_heads, l560.image_size) == (1024, 4096, 24, 16, 560)
    n_params = sum(int(np.prod(v.shape)) for v in hf.vit_to_hf_state_abstract(hf._AbstractViT(l560)).values())
    assert 300e6 < n_params < 306e6  # RICE ViT-L/14-560: ~303M
    with pytest.raises(ValueError, match="vit_b16_224"):
        mcfg.get_preset("vit_huge")
    with pytest.raises(ValueError, match="remat_policy"):
        mcfg.ViTConfig(remat_policy="sometimes")


def test_non_multiple_of_patch_is_a_clear_error(hf_dir):
    vit = hf.load_hf(hf_dir[0])
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vit(jnp.zeros((1, 50, 56, 3)))


@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_attention_paths_agree_with_reference(impl):
    rng = np.random.default_rng(0)
    b, h, t, d = 2, 3, 11, 8
    q, k, v = (jnp.asarray(rng.standard_normal((b, h, t, d)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(rng.random((b, 1, t, t)) < 0.6) | jnp.eye(t, dtype=bool)
    for m in (None, mask):
        logits = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(d)
        if m is not None:
            logits = np.where(np.asarray(m), logits, -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ref = np.einsum("bhqk,bhkd->bhqd", p, v)
        np.testing.assert_allclose(np.asarray(attention(q, k, v, m, impl=impl)), ref, atol=2e-6)


@pytest.mark.parametrize("multiple", [2, 8])
def test_padded_fused_attention_equals_unpadded(multiple):
    """The cuDNN path's token padding (odd 1 + h*w token counts), run through XLA's fused kernel on
    CPU: padded keys invisible, padded queries dropped, values and gradients those of the einsum path."""
    from rice_jax.models.vit import _fused_attention, _pad_tokens

    rng = np.random.default_rng(1)
    b, h, t, d = 2, 3, 11, 8
    q, k, v = (jnp.asarray(rng.standard_normal((b, h, t, d)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(rng.random((b, 1, t, t)) < 0.5) | jnp.eye(t, dtype=bool)
    for m in (None, mask):
        def padded(q, k, v):
            qp, kp, vp, mp, lengths = _pad_tokens(q, k, v, m, multiple)
            assert qp.shape[2] % multiple == 0 and (lengths is None) == (m is not None)
            return _fused_attention(qp, kp, vp, mp, d ** -0.5, "xla", lengths)[:, :, :t]

        ref = lambda q, k, v: attention(q, k, v, m, impl="einsum")
        np.testing.assert_allclose(np.asarray(padded(q, k, v)), np.asarray(ref(q, k, v)), atol=2e-6)
        w = jnp.asarray(rng.standard_normal((b, h, t, d)), jnp.float32)
        g = jax.grad(lambda *a: jnp.sum(padded(*a) * w), argnums=(0, 1, 2))(q, k, v)
        g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums=(0, 1, 2))(q, k, v)
        for a, r in zip(g, g_ref):
            np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-5)


def _dot_flops(jaxpr) -> float:
    """2·(output size)·(contracted size) summed over every dot_general, nested jaxprs included."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            contracted = np.prod([eqn.invars[0].aval.shape[i] for i in lc])
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * contracted
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _dot_flops(inner)
    return total


@pytest.mark.parametrize("regions,embed_dim,seed", [(0, 0, "class"), (3, 0, "class"), (3, 24, "class"), (3, 0, "roi")])
def test_model_flops_equal_the_traced_matmuls(regions, embed_dim, seed):
    """perf.rice_train_flops (the MFU numerator) against the matmuls actually traced in the model's
    forward, counted from its jaxpr: equal to the FLOP, for the plain ViT, region tokens and a head."""
    from flax import nnx

    from rice_jax import perf
    from rice_jax.models.config import ViTConfig
    from rice_jax.models.rice import RICEConfig, RICEModel

    cfg = RICEConfig(backbone=ViTConfig(hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                                        patch_size=4, image_size=16), region_layers=2, embed_dim=embed_dim,
                     region_seed=seed)
    model = RICEModel(cfg, rngs=nnx.Rngs(0))
    b, px = 2, (16, 12)
    boxes = jnp.tile(jnp.asarray([[0.1, 0.1, 0.6, 0.7]]), (b, max(regions, 1), 1))[:, :regions]
    counted = _dot_flops(jax.make_jaxpr(lambda x: model(x, boxes if regions else None))(
        jnp.zeros((b, *px, 3))).jaxpr)
    assert perf.rice_train_flops(cfg, b, px, regions) == pytest.approx(3 * counted, rel=1e-12)
    # loss terms: rows x columns logits per image, forward and backward
    assert perf.rice_train_flops(cfg, b, px, regions, ((5, 7),)) - perf.rice_train_flops(cfg, b, px, regions) \
        == 3 * b * 2 * 5 * (embed_dim or 32) * 7


def test_materialized_residual_gradient_keeps_the_gradients(monkeypatch):
    """The CPU backward's residual-gradient materialisation (a conditional on the cotangent) changes
    where XLA stores the gradient, not the arithmetic: gradients agree with it switched off to float
    rounding (fusion boundaries move, so LLVM's FMA contraction may differ in the last bit), and its
    always-true predicate holds for NaN inputs too (it is built from the input's bits)."""
    from rice_jax.models import vit as vit_mod

    cfg = mcfg.ViTConfig(hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, patch_size=4, image_size=16)
    model = ViT(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 3)), jnp.float32)

    def grads(inp):
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(inp).last_hidden_state ** 2)
        return jax.jit(jax.grad(loss))(params)

    with_barrier = grads(x)
    assert "conditional" in jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x).pooler_output))).lower(
        params).as_text(dialect="hlo")
    monkeypatch.setattr(vit_mod, "materialize_grad", lambda t: t)
    plain = grads(x)
    for a, b in zip(jax.tree.leaves(with_barrier), jax.tree.leaves(plain)):
        scale = float(np.abs(np.asarray(b)).max()) or 1.0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6 * scale)
    np.testing.assert_array_equal(np.asarray(vit_mod._materialize_grad_fwd(jnp.full((2,), jnp.nan))[1]), True)


def test_attention_fully_masked_row_is_finite():
    q = k = v = jnp.ones((1, 1, 3, 4))
    mask = jnp.zeros((1, 1, 3, 3), bool)
    assert np.isfinite(np.asarray(attention(q, k, v, mask, impl="einsum"))).all()


def test_bf16_compute_close_to_fp32(hf_dir):
    path, _ = hf_dir
    f32 = hf.load_hf(path)
    bf16 = hf.load_hf(path, dtype="bfloat16")
    assert bf16.blocks[0].mlp.fc1_kernel[...].dtype == jnp.float32  # params stay fp32
    x = jnp.asarray(_pixels())
    a, b = f32(x).pooler_output, bf16(x).pooler_output
    assert b.dtype == jnp.bfloat16
    # Post-LN outputs are O(1); bf16 has ~3 significant digits over 2 blocks.
    assert float(jnp.max(jnp.abs(a - b.astype(jnp.float32)))) < 0.1
    cos = jnp.sum(a * b.astype(jnp.float32), -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b.astype(jnp.float32), axis=-1))
    assert float(jnp.min(cos)) > 0.999


def test_remat_same_values_and_grads(hf_dir):
    path, _ = hf_dir
    x = jnp.asarray(_pixels())

    def loss_and_grad(model):
        graphdef, params = nnx.split(model, nnx.Param)

        def f(p):
            return jnp.sum(nnx.merge(graphdef, p)(x).pooler_output ** 2)
        return jax.jit(jax.value_and_grad(f))(params)

    l0, g0 = loss_and_grad(hf.load_hf(path))
    l1, g1 = loss_and_grad(hf.load_hf(path, remat_policy="nothing_saveable"))
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_sharded_forward_matches_unsharded(hf_dir, mesh):
    path, _ = hf_dir
    vit = hf.load_hf(path)
    x = _pixels(8)
    ref = vit(jnp.asarray(x))
    graphdef, state = nnx.split(vit)
    state_sh = jax.device_put(state, sharding.tree_shardings(state, mesh))
    x_sh = jax.device_put(x, sharding.batch_sharding(mesh, 4))

    @jax.jit
    def fwd(state, x):
        out = nnx.merge(graphdef, state)(x)
        return out.last_hidden_state, out.pooler_output

    last, pool = fwd(state_sh, x_sh)
    assert last.sharding.spec[0] == sharding.ALL_AXES
    assert len(last.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(last), np.asarray(ref.last_hidden_state), atol=1e-5)
    np.testing.assert_allclose(np.asarray(pool), np.asarray(ref.pooler_output), atol=1e-5)


def test_auto_attention_on_gpu_sends_fp32_to_xla_not_cudnn(monkeypatch):
    """cuDNN's fused attention has no fp32 kernel (jax raises ValueError at trace time): on a GPU,
    "auto" sends fp32 inputs (the `tiny` config) to XLA's path, which gives the einsum's result."""
    from rice_jax.models import vit as vit_mod

    calls = []
    real = vit_mod._fused_attention
    monkeypatch.setattr(vit_mod.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(vit_mod, "_fused_attention", lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 2, 17, 8), jnp.float32) for i in range(3))
    mask = jnp.ones((2, 1, 17, 17), bool).at[:, :, :, 5:].set(False)
    out = vit_mod.attention(q, k, v, mask, impl="auto")
    assert calls == ["xla"]
    np.testing.assert_allclose(out, vit_mod.attention(q, k, v, mask, impl="einsum"), atol=1e-5)
