"""Region layers and the RICE model: visibility rule, masks, invariance, brute-force reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rice_jax import sharding
from rice_jax.models import hf
from rice_jax.models.config import ViTConfig
from rice_jax.models.region import box_patch_visibility, region_attention_mask, roi_align
from rice_jax.models.rice import RICEConfig, RICEModel
from rice_jax.models.vit import ViT, apply_rope

CFG = ViTConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2, patch_size=8, image_size=32)
HW = (32, 48)  # 4 x 6 grid, non-square


def _model(region_layers=2, embed_dim=None, attend_cls=False, seed=0, region_rope="class"):
    cfg = RICEConfig(backbone=CFG, region_layers=region_layers, embed_dim=embed_dim, region_attend_cls=attend_cls,
                     region_rope=region_rope)
    return RICEModel(cfg, rngs=nnx.Rngs(seed))


def _inputs(b=2, n=4, seed=0):
    r = np.random.default_rng(seed)
    x = r.standard_normal((b, *HW, 3)).astype(np.float32)
    p0 = r.uniform(0, 0.6, (b, n, 2))
    p1 = p0 + r.uniform(0.1, 0.4, (b, n, 2))
    boxes = np.concatenate([p0, np.minimum(p1, 1.0)], -1).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(boxes)


def test_visibility_rule_explicit_cases():
    gh, gw = 4, 6
    boxes = jnp.asarray([[[0.0, 0.0, 1.0, 1.0],          # whole image
                          [0.0, 0.0, 0.5, 0.5],          # edges on cell boundaries
                          [0.40, 0.40, 0.41, 0.41],      # smaller than a patch
                          [0.2, 0.3, 0.2, 0.3],          # degenerate (a point)
                          [0.1, 0.1, 0.9, 0.9]]])        # padded
    valid = jnp.asarray([[True, True, True, True, False]])
    vis = np.asarray(box_patch_visibility(boxes, valid, gh, gw)).reshape(5, gh, gw)
    assert vis[0].all()
    expected = np.zeros((gh, gw), bool)
    expected[:2, :3] = True
    np.testing.assert_array_equal(vis[1], expected)
    # x in [2.4, 2.46] of 6 cols -> col 2; y in [1.6, 1.64] of 4 rows -> row 1
    assert vis[2].sum() == 1 and vis[2][1, 2]
    assert vis[3].sum() == 1 and vis[3][1, 1]  # centre (0.2*6=1.2 -> col 1, 0.3*4=1.2 -> row 1)
    assert not vis[4].any()


def test_attention_mask_structure():
    vis = jnp.asarray(np.random.default_rng(0).random((2, 3, 5)) < 0.5)
    m = np.asarray(region_attention_mask(vis, attend_cls=True))
    assert m.shape == (2, 1, 9, 9)
    assert m[:, 0, :6, :6].all() and not m[:, 0, :6, 6:].any()
    np.testing.assert_array_equal(m[:, 0, 6:, 1:6], np.asarray(vis))
    assert m[:, 0, 6:, 0].all()
    np.testing.assert_array_equal(m[0, 0, 6:, 6:], np.eye(3, dtype=bool))
    assert not np.asarray(region_attention_mask(vis))[:, 0, 6:, 0].any()


@pytest.mark.parametrize("with_regions", [False, True])
def test_image_path_is_the_plain_vit(with_regions):
    model = _model()
    x, boxes = _inputs()
    ref = model.backbone(x)
    out = model(x, boxes if with_regions else None)
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), np.asarray(ref.last_hidden_state), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.pooler_output), np.asarray(ref.pooler_output), atol=1e-6)
    assert out.region_embed.shape == ((2, 4, 32) if with_regions else (2, 0, 32))


@pytest.mark.parametrize("region_layers", [1, 3])
def test_hidden_states_are_the_plain_vits(region_layers):
    """With region tokens on, the per-block image tokens are still the plain ViT's (what extraction reads)."""
    model = _model(region_layers)
    x, boxes = _inputs()
    ref = model.backbone(x, output_hidden_states=True).hidden_states
    out = model(x, boxes, output_hidden_states=True).hidden_states
    assert len(out) == len(ref) == model.backbone.cfg.num_layers + 1
    for mine, theirs in zip(out, ref):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), atol=1e-6)


def _brute_force_regions(model: RICEModel, x, boxes, valid):
    """Per image, per region: run the region blocks by explicit gather of the visible tokens."""
    vit = model.backbone
    grid = vit.grid(x.shape[1], x.shape[2])
    gh, gw = grid
    t = gh * gw
    tokens = vit.embed(x)
    cos_img, sin_img = vit.rope(gh, gw)
    states = []
    for i in range(vit.cfg.num_layers):
        if i >= model.first_region_block:
            states.append(tokens)
        tokens = vit.run_block(i, tokens, cos_img, sin_img)
    cos_img, sin_img = np.asarray(cos_img), np.asarray(sin_img)
    vis = np.asarray(box_patch_visibility(boxes, valid, gh, gw))
    out = np.zeros((x.shape[0], boxes.shape[1], model.cfg.embed_dim or vit.cfg.hidden_size), np.float32)
    h, dh = vit.cfg.num_heads, vit.cfg.head_dim
    for b in range(x.shape[0]):
        for l in range(boxes.shape[1]):
            idx = 1 + np.nonzero(vis[b, l])[0]
            r = states[0][b, 0]
            if model.cfg.region_rope == "box":   # the query sits at the box centre, in patch units
                x0, y0, x1, y1 = np.asarray(boxes[b, l], np.float64)
                spatial = vit.cfg.head_dim // 2
                inv = 1.0 / vit.cfg.rope_theta ** (np.arange(0, spatial, 2) / spatial)
                ang = np.concatenate([((y0 + y1) / 2 * gh - 0.5) * inv, ((x0 + x1) / 2 * gw - 0.5) * inv])
                r_cos, r_sin = np.cos(ang)[None].astype(np.float32), np.sin(ang)[None].astype(np.float32)
            else:
                r_cos, r_sin = cos_img[:1], sin_img[:1]
            for j, s in enumerate(states):
                blk = vit.blocks[model.first_region_block + j]
                toks = jnp.concatenate([s[b, idx], r[None]], 0)               # [V+1, D]
                cos = jnp.asarray(np.concatenate([cos_img[idx], r_cos]))
                sin = jnp.asarray(np.concatenate([sin_img[idx], r_sin]))
                hn = blk.norm1(toks)
                qkv = jnp.einsum("td,dshk->shtk", hn, blk.attn.qkv_kernel[...]) + blk.attn.qkv_bias[...][:, :, None]
                q = apply_rope(qkv[0][None], cos, sin)[0][:, -1:]             # region query only
                k = apply_rope(qkv[1][None], cos, sin)[0]
                logits = jnp.einsum("hqd,hkd->hqk", q, k) / np.sqrt(dh)
                o = jnp.einsum("hqk,hkd->hqd", jax.nn.softmax(logits, -1), qkv[2])[:, 0]   # [H, Dh]
                r = r + jnp.einsum("hk,hkd->d", o, blk.attn.out_kernel[...]) + blk.attn.out_bias[...]
                r = r + blk.mlp(blk.norm2(r[None]))[0]
            out[b, l] = np.asarray(model._project(vit.post_norm(r[None]))[0])
    return out


@pytest.mark.parametrize("region_layers,embed_dim,region_rope", [(2, None, "class"), (1, 16, "class"),
                                                                   (3, None, "class"), (2, None, "box")])
def test_matches_brute_force_reference(region_layers, embed_dim, region_rope):
    model = _model(region_layers, embed_dim, region_rope=region_rope)
    x, boxes = _inputs()
    valid = jnp.ones(boxes.shape[:2], bool)
    out = model(x, boxes, valid)
    ref = _brute_force_regions(model, x, boxes, valid)
    np.testing.assert_allclose(np.asarray(out.region_embed), ref, atol=2e-5)


def test_region_token_sees_only_its_box():
    """Perturbing patch tokens outside box l at the input of the last block leaves region l unchanged.

    (Earlier region blocks mix all patches through the image path, so the exact
    invariance holds w.r.t. the input of the block the region token reads.)
    """
    model = _model(region_layers=2)
    vit = model.backbone
    x, boxes = _inputs(b=1, n=3)
    valid = jnp.ones((1, 3), bool)
    grid = vit.grid(*HW)
    tokens = vit.embed(x)
    cos, sin = vit.rope(*grid)
    for i in range(vit.cfg.num_layers - 1):
        tokens = vit.run_block(i, tokens, cos, sin)
    _, r0 = model.region_blocks(tokens, grid, boxes, valid, start=vit.cfg.num_layers - 1)
    vis = np.asarray(box_patch_visibility(boxes, valid, *grid))[0]
    for l in range(3):
        outside = np.nonzero(~vis[l])[0]
        inside = np.nonzero(vis[l])[0]
        noise = np.zeros(tokens.shape, np.float32)
        noise[0, 1 + outside] = np.random.default_rng(l).standard_normal((len(outside), tokens.shape[-1]))
        _, r1 = model.region_blocks(tokens + noise, grid, boxes, valid, start=vit.cfg.num_layers - 1)
        np.testing.assert_allclose(np.asarray(r1[0, l]), np.asarray(r0[0, l]), atol=1e-6)
        noise = np.zeros(tokens.shape, np.float32)
        noise[0, 1 + inside[0]] = np.random.default_rng(9).standard_normal(tokens.shape[-1])  # not a constant: LN removes those
        _, r2 = model.region_blocks(tokens + noise, grid, boxes, valid, start=vit.cfg.num_layers - 1)
        assert np.max(np.abs(np.asarray(r2[0, l] - r0[0, l]))) > 1e-3


@pytest.mark.parametrize("region_rope", ["class", "box"])
def test_box_rotary_positions_make_a_region_token_translation_invariant(region_rope):
    """One block, run on the region tokens only: patch tokens are then position-free pixel embeddings,
    so a word moved by whole patches (box moved with it) must give the same region token exactly
    when the region query sits at its box centre — and not when it sits at the class position."""
    cfg = RICEConfig(backbone=CFG.replace(num_layers=1), region_layers=1, region_rope=region_rope)
    model = RICEModel(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    word = rng.standard_normal((8, 16, 3)).astype(np.float32)         # one patch tall, two wide
    images = np.zeros((2, *HW, 3), np.float32)
    images[0, 8:16, 8:24] = word                                      # patches (1, 1..2)
    images[1, 16:24, 24:40] = word                                    # patches (2, 3..4)
    boxes = jnp.asarray([[[8 / 48, 8 / 32, 24 / 48, 16 / 32]], [[24 / 48, 16 / 32, 40 / 48, 24 / 32]]])
    r = np.asarray(model(jnp.asarray(images), boxes, jnp.ones((2, 1), bool)).region_hidden)[:, 0]
    if region_rope == "box":
        np.testing.assert_allclose(r[0], r[1], atol=1e-5)
    else:
        assert np.abs(r[0] - r[1]).max() > 1e-3


def test_roi_align_matches_bilinear_reference():
    from scipy.ndimage import map_coordinates

    rng = np.random.default_rng(0)
    gh, gw, d = 4, 6, 3
    tokens = rng.standard_normal((2, gh * gw, d)).astype(np.float32)
    _, boxes = _inputs(n=5)
    out = np.asarray(roi_align(jnp.asarray(tokens), boxes, gh, gw, 2, 3))
    grid, boxes = tokens.reshape(2, gh, gw, d), np.asarray(boxes)
    for b, n, i, j in np.ndindex(2, 5, 2, 3):
        x0, y0, x1, y1 = boxes[b, n]
        y = np.clip((y0 + (y1 - y0) * (i + 0.5) / 2) * gh - 0.5, 0, gh - 1)
        x = np.clip((x0 + (x1 - x0) * (j + 0.5) / 3) * gw - 0.5, 0, gw - 1)
        ref = [map_coordinates(grid[b, :, :, k], [[y], [x]], order=1, mode="nearest")[0] for k in range(d)]
        np.testing.assert_allclose(out[b, n, i, j], ref, atol=1e-5)
    # A box whose samples fall on patch centres reads those patches exactly.
    exact = np.asarray(roi_align(jnp.asarray(tokens), jnp.asarray([[[0.0, 0.0, 1.0, 1.0]]] * 2), gh, gw, gh, gw))
    np.testing.assert_allclose(exact.reshape(2, gh * gw, d), tokens, atol=1e-6)


def test_padded_regions_finite_and_do_not_affect_valid_ones():
    model = _model()
    x, boxes = _inputs(n=4)
    valid = jnp.asarray([[True, True, False, False], [True, False, True, False]])
    out = model(x, boxes, valid)
    assert np.isfinite(np.asarray(out.region_embed)).all()
    boxes2 = np.asarray(boxes).copy()
    boxes2[~np.asarray(valid)] = [0.0, 0.0, 1.0, 1.0]
    out2 = model(x, jnp.asarray(boxes2), valid)
    v = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(out2.region_embed)[v], np.asarray(out.region_embed)[v], atol=1e-6)
    # A valid region with the same box gives the same embedding, whatever its slot.
    out3 = model(x, boxes[:, :1], valid[:, :1])
    np.testing.assert_allclose(np.asarray(out3.region_embed)[:, 0], np.asarray(out.region_embed)[:, 0], atol=1e-5)


def test_whole_image_and_sub_patch_boxes_match_reference():
    model = _model(region_layers=2)
    x, _ = _inputs(b=1, n=3)
    boxes = jnp.asarray([[[0.0, 0.0, 1.0, 1.0], [0.51, 0.26, 0.52, 0.27], [0.9, 0.0, 1.0, 1.0]]])
    valid = jnp.ones((1, 3), bool)
    out = model(x, boxes, valid)
    np.testing.assert_allclose(np.asarray(out.region_embed), _brute_force_regions(model, x, boxes, valid), atol=2e-5)


def test_export_writes_only_the_backbone(tmp_path):
    model = _model(embed_dim=16)
    hf.save_hf(model, tmp_path)
    from safetensors.numpy import load_file

    keys = set(load_file(tmp_path / "model.safetensors"))
    assert not any("head" in k for k in keys)
    again = hf.load_hf(tmp_path)
    x, _ = _inputs(1)
    np.testing.assert_allclose(np.asarray(again(x).pooler_output), np.asarray(model.backbone(x).pooler_output), atol=1e-6)


def test_sharded_jit_forward(mesh):
    model = _model(embed_dim=16)
    x, boxes = _inputs(b=8, n=3)
    valid = jnp.ones((8, 3), bool)
    ref = model(x, boxes, valid)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.tree_shardings(state, mesh))

    @jax.jit
    def fwd(state, x, boxes, valid):
        out = nnx.merge(graphdef, state)(x, boxes, valid)
        return out.global_embed, out.region_embed

    args = [jax.device_put(a, sharding.batch_sharding(mesh, a.ndim)) for a in (x, boxes, valid)]
    g, r = fwd(state, *args)
    assert len(r.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(r), np.asarray(ref.region_embed), atol=1e-5)
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref.global_embed), atol=1e-5)
