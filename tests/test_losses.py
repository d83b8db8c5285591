"""Margin-softmax loss: numpy reference parity, class-parallel parity, PartialFC properties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rice_jax import losses
from rice_jax.sharding import make_mesh
from tests.loss_reference import reference_loss


def make_problem(b=16, k=37, d=24, m=3, seed=0, multi=True):
    r = np.random.default_rng(seed)
    f = r.standard_normal((b, d)).astype(np.float32)
    c = r.standard_normal((k, d)).astype(np.float32)
    labels = np.full((b, m), -1, np.int32)
    for i in range(b):
        if i % 5 == 4:
            continue  # a row with no positive: ignored
        n = r.integers(1, m + 1) if multi else 1
        labels[i, :n] = r.integers(0, k, n)
    if multi:
        labels[0, :2] = [5, 5]  # duplicate label counts once
    return f, c, labels


def _grads(fn, f, c, labels, **kw):
    def loss(f, c):
        return fn(f, c, labels, **kw)[0]
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(jnp.asarray(f), jnp.asarray(c))


def assert_close(a, b, rel=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.max(np.abs(b)), 1e-12)
    assert np.max(np.abs(a - b)) <= rel * scale, f"max diff {np.max(np.abs(a - b))} vs scale {scale}"


@pytest.mark.parametrize("margin_type", ["arcface", "cosface"])
@pytest.mark.parametrize("multi", [False, True])
def test_dense_matches_numpy_reference(margin_type, multi):
    f, c, labels = make_problem(multi=multi)
    (loss, (gf, gc)) = _grads(losses.margin_softmax_loss, f, c, labels, margin_type=margin_type)
    ref, rgf, rgc = reference_loss(f, c, labels, margin_type=margin_type)
    assert abs(float(loss) - ref) <= 1e-5 * abs(ref)
    assert_close(gf, rgf)
    assert_close(gc, rgc)


def test_aux_diagnostics_dense():
    f, c, labels = make_problem()
    _, aux = losses.margin_softmax_loss(jnp.asarray(f), jnp.asarray(c), jnp.asarray(labels))
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    cn = c / np.linalg.norm(c, axis=1, keepdims=True)
    pos = [(i, int(l)) for i in range(len(f)) for l in sorted({x for x in labels[i] if x >= 0})]
    assert int(aux["num_rows"]) == sum((labels >= 0).any(1))
    np.testing.assert_allclose(float(aux["pos_cos_mean"]), np.mean([fn[i] @ cn[l] for i, l in pos]), rtol=1e-5)
    assert int(aux["num_sampled"]) == c.shape[0]


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
@pytest.mark.parametrize("shape", [(1, 8), (2, 4)])
@pytest.mark.parametrize("k", [64, 1003])
def test_class_parallel_matches_dense(shape, k, axis_type):
    mesh = make_mesh(*shape, axis_type=axis_type)
    f, c, labels = make_problem(b=16, k=k, d=32, m=4, seed=k)
    l0, (gf0, gc0) = _grads(losses.margin_softmax_loss, f, c, labels)
    l1, (gf1, gc1) = _grads(losses.margin_softmax_loss, f, c, labels, mesh=mesh)
    ref, rgf, rgc = reference_loss(f, c, labels)
    assert abs(float(l1) - float(l0)) <= 1e-5 * abs(float(l0))
    assert abs(float(l1) - ref) <= 1e-5 * abs(ref)
    assert_close(gf1, gf0)
    assert_close(gc1, gc0)
    assert_close(gc1, rgc)
    assert gc1.shape == c.shape


@pytest.mark.parametrize("context,rate", [(False, 0.5), (True, 1.0)])
def test_explicit_mesh_any_k_with_or_without_set_mesh(context, rate):
    """The public loss on an Explicit mesh at K = 1003 (not a multiple of the 8 devices), called
    eagerly and under jit, inside ``jax.set_mesh`` or not, sampled (rho = 0.5) or not: same loss and
    gradient as an Auto mesh. (Eager calls on a mesh trace op by op: two cases, not all four.)"""
    import contextlib

    f, c, labels = make_problem(b=16, k=1003, d=32, m=4, seed=3)
    kw = dict(labels=jnp.asarray(labels), sample_rate=rate, rng=jax.random.key(7))
    auto, explicit = make_mesh(axis_type="auto"), make_mesh(axis_type="explicit")
    fn = lambda f, c, mesh: losses.margin_softmax_loss(f, c, kw["labels"], mesh=mesh, sample_rate=rate, rng=kw["rng"])
    ref_loss, (ref_gf, ref_gc) = _grads(lambda f, c, l, **_: fn(f, c, auto), f, c, labels)
    with jax.set_mesh(explicit) if context else contextlib.nullcontext():
        eager_loss, _ = fn(jnp.asarray(f), jnp.asarray(c), explicit)
        grads = jax.jit(jax.value_and_grad(lambda f, c: fn(f, c, explicit)[0], argnums=(0, 1)))
        loss, (gf, gc) = grads(jnp.asarray(f), jnp.asarray(c))
        # Eager autodiff, with the context mesh and without it (its own branch in the loss), both
        # arguments, aux carried out (integer counts among it).
        (eager_vg, eager_aux), (eager_gf, eager_gc) = jax.value_and_grad(
            lambda f, c: fn(f, c, explicit), argnums=(0, 1), has_aux=True)(jnp.asarray(f), jnp.asarray(c))
        assert_close(eager_gf, ref_gf)
        assert_close(eager_gc, ref_gc)
        assert int(eager_aux["num_rows"]) == int((labels >= 0).any(1).sum())
        if not context:   # the gradients live where the inputs did (one device), usable by the caller
            assert eager_gc.sharding.device_set == jnp.asarray(c).sharding.device_set
            _ = np.asarray(eager_gc - jnp.asarray(c))
    for value in (eager_loss, loss, eager_vg):
        assert abs(float(value) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert gc.shape == c.shape
    assert_close(gf, ref_gf)
    assert_close(gc, ref_gc)


def test_class_parallel_with_prepadded_centers():
    mesh = make_mesh(1, 8)
    f, c, labels = make_problem(b=8, k=21, d=16, m=2)
    c_pad = np.concatenate([c, np.random.default_rng(9).standard_normal((3, 16)).astype(np.float32)])
    l_pad, _ = losses.margin_softmax_loss(jnp.asarray(f), jnp.asarray(c_pad), jnp.asarray(labels),
                                          mesh=mesh, num_classes=21)
    ref, _, _ = reference_loss(f, c, labels)
    assert abs(float(l_pad) - ref) <= 1e-5 * abs(ref)


def _sampled(f, c, labels, rate, seed, mesh=None, **kw):
    return losses.margin_softmax_loss(jnp.asarray(f), jnp.asarray(c), jnp.asarray(labels), sample_rate=rate,
                                      rng=jax.random.key(seed), mesh=mesh, **kw)


@pytest.mark.parametrize("use_mesh", [False, "auto", "explicit"])
def test_sampled_loss_bounded_by_full_and_keeps_positives(use_mesh):
    mesh = make_mesh(2, 4, axis_type=use_mesh) if use_mesh else None
    f, c, labels = make_problem(b=16, k=400, d=16, m=3)
    full, _ = losses.margin_softmax_loss(jnp.asarray(f), jnp.asarray(c), jnp.asarray(labels), mesh=mesh)
    n_pos = len({int(x) for x in labels.ravel() if x >= 0})
    # One compiled function for the five draws (eager shard_map re-traces every call: 150 s -> seconds).
    sampled = jax.jit(lambda f, c, labels, key: losses.margin_softmax_loss(f, c, labels, sample_rate=0.1, rng=key,
                                                                            mesh=mesh))
    for seed in range(5):
        loss, aux = sampled(jnp.asarray(f), jnp.asarray(c), jnp.asarray(labels), jax.random.key(seed))
        assert float(loss) <= float(full) + 1e-4
        assert int(aux["num_positive_classes"]) == n_pos
        assert int(aux["num_positive_classes_sampled"]) == n_pos
        assert int(aux["positives_dropped"]) == 0
        assert int(aux["num_sampled"]) >= 40  # ceil(0.1*400) overall (per shard at least ceil(40/8))


def test_sampled_loss_equals_reference_on_the_sampled_set():
    """Scoring only the gathered subset gives exactly the loss over that negative set."""
    f, c, labels = make_problem(b=12, k=300, d=16, m=2, seed=3)
    rng = jax.random.key(7)
    loss, _ = losses.margin_softmax_loss(jnp.asarray(f), jnp.asarray(c), jnp.asarray(labels),
                                         sample_rate=0.1, rng=rng)
    lab = np.where(labels >= 0, labels, 300)
    n_sample = 30
    idx, active, _ = losses.sample_classes(jnp.asarray(lab), jnp.ones(300, bool), jax.random.fold_in(rng, 0),
                                           n_sample, min(300, max(n_sample, labels.size)))
    chosen = np.asarray(idx)[np.asarray(active)]
    ref, _, _ = reference_loss(f, c, labels, negatives=[chosen] * len(f))
    assert abs(float(loss) - ref) <= 1e-5 * abs(ref)


def test_small_positive_cap_drops_and_counts():
    f, c, labels = make_problem(b=16, k=400, d=16, m=3)
    n_pos = len({int(x) for x in labels.ravel() if x >= 0})
    loss, aux = _sampled(f, c, labels, 0.01, 0, max_positives_per_shard=4)
    assert int(aux["positives_dropped"]) == n_pos - 4
    assert np.isfinite(float(loss))


def test_negative_sampling_is_uniform():
    """Chi-square over many draws: each non-positive class is picked equally often."""
    from scipy import stats

    k, n_sample, draws = 50, 10, 4000
    lab = jnp.asarray([[3, 17, k], [17, 40, k]])  # positives {3, 17, 40}; k = padding
    keys = jax.random.split(jax.random.key(0), draws)

    @jax.jit
    @jax.vmap
    def pick(key):
        idx, active, _ = losses.sample_classes(lab, jnp.ones(k, bool), key, n_sample, n_sample)
        return jnp.zeros(k, jnp.int32).at[idx].add(active.astype(jnp.int32))

    counts = np.asarray(pick(keys)).sum(0)
    assert (counts[[3, 17, 40]] == draws).all()  # positives always in
    neg = np.delete(counts, [3, 17, 40])
    expected = draws * (n_sample - 3) / (k - 3)
    assert neg.sum() == draws * (n_sample - 3)
    chi2 = float(((neg - expected) ** 2 / expected).sum())
    assert stats.chi2.sf(chi2, df=len(neg) - 1) > 1e-3, chi2


def test_compiled_flops_scale_with_sample_rate():
    b, k, d = 32, 20000, 64
    f = jax.ShapeDtypeStruct((b, d), jnp.float32)
    c = jax.ShapeDtypeStruct((k, d), jnp.float32)
    lab = jax.ShapeDtypeStruct((b, 1), jnp.int32)

    def flops(rate):
        fn = jax.jit(jax.grad(lambda f, c, l: losses.margin_softmax_loss(
            f, c, l, sample_rate=rate, rng=jax.random.key(0))[0], argnums=(0, 1)))
        ca = fn.lower(f, c, lab).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return ca["flops"]

    ratio = flops(0.1) / flops(1.0)
    assert 0.05 < ratio < 0.2, ratio


def test_bf16_inputs_close_to_fp32():
    f, c, labels = make_problem(b=16, k=64, d=32)
    l32, _ = losses.margin_softmax_loss(jnp.asarray(f), jnp.asarray(c), jnp.asarray(labels))
    l16, aux = losses.margin_softmax_loss(jnp.asarray(f, jnp.bfloat16), jnp.asarray(c, jnp.bfloat16),
                                          jnp.asarray(labels))
    assert l16.dtype == jnp.float32
    # bf16 rounds cosines by ~4e-3 relative; times s=64 this moves logits by ~0.1.
    assert abs(float(l16) - float(l32)) < 0.02 * abs(float(l32))


def test_label_errors_are_clear():
    f, c, labels = make_problem(k=10)
    labels[3, 1] = 10
    with pytest.raises(ValueError, match=r"labels\[3, 1\] = 10 is outside \[-1, 10\)"):
        losses.margin_softmax_loss(jnp.asarray(f), jnp.asarray(c), jnp.asarray(labels), check_labels=True)
    labels[3, 1] = -2
    with pytest.raises(ValueError, match="outside"):
        losses.validate_labels(labels, 10)
    with pytest.raises(ValueError, match="rng"):
        losses.margin_softmax_loss(jnp.asarray(f), jnp.asarray(c), jnp.asarray(labels), sample_rate=0.5)


def test_rice_loss_combines_object_and_ocr_and_ignores_padding():
    r = np.random.default_rng(0)
    b, n, m, e, k, v = 4, 5, 3, 16, 30, 20
    emb = r.standard_normal((b, n, e)).astype(np.float32)
    valid = r.random((b, n)) < 0.8
    kind = (r.random((b, n)) < 0.4).astype(np.int32)
    labels = np.full((b, n, m), -1, np.int32)
    for i in range(b):
        for j in range(n):
            if kind[i, j] == 0:
                labels[i, j, 0] = r.integers(0, k)
            else:
                labels[i, j, : r.integers(1, m + 1)] = r.integers(0, v, m)[: 1]
    c_obj = r.standard_normal((k, e)).astype(np.float32)
    c_ocr = r.standard_normal((v, e)).astype(np.float32)
    total, met = losses.rice_loss(jnp.asarray(emb), None, jnp.asarray(valid), jnp.asarray(kind), jnp.asarray(labels),
                                  jnp.asarray(c_obj), jnp.asarray(c_ocr))
    obj = valid & (kind == 0)
    ocr = valid & (kind == 1)
    ref_obj, _, _ = reference_loss(emb[obj], c_obj, labels[obj][:, :1])
    ref_ocr, _, _ = reference_loss(emb[ocr], c_ocr, labels[ocr])
    np.testing.assert_allclose(float(met["loss_object"]), ref_obj, rtol=1e-5)
    np.testing.assert_allclose(float(met["loss_ocr"]), ref_ocr, rtol=1e-5)
    np.testing.assert_allclose(float(total), ref_obj + ref_ocr, rtol=1e-5)
    # Padded regions: no gradient, and their content does not matter.
    g = jax.grad(lambda x: losses.rice_loss(x, None, jnp.asarray(valid), jnp.asarray(kind), jnp.asarray(labels),
                                            jnp.asarray(c_obj), jnp.asarray(c_ocr))[0])(jnp.asarray(emb))
    assert np.all(np.asarray(g)[~valid] == 0)
    emb2 = emb.copy()
    emb2[~valid] = 1e3
    t2, _ = losses.rice_loss(jnp.asarray(emb2), None, jnp.asarray(valid), jnp.asarray(kind), jnp.asarray(labels),
                             jnp.asarray(c_obj), jnp.asarray(c_ocr))
    assert float(t2) == float(total)


def test_global_only_objective_needs_no_region_embedding():
    """rice_loss derives the image-level labels itself: the clusters of the valid object regions."""
    r = np.random.default_rng(4)
    b, n, m, e, k = 6, 5, 3, 16, 9
    g = r.standard_normal((b, e)).astype(np.float32)
    valid = r.random((b, n)) < 0.8
    kind = (r.random((b, n)) < 0.3).astype(np.int32)
    labels = r.integers(0, k, (b, n, m)).astype(np.int32)
    c_obj = r.standard_normal((k, e)).astype(np.float32)
    total, met = losses.rice_loss(None, jnp.asarray(g), jnp.asarray(valid), jnp.asarray(kind), jnp.asarray(labels),
                                  jnp.asarray(c_obj), jnp.zeros((4, e)), object_weight=0.0, ocr_weight=0.0,
                                  global_weight=1.0)
    want = np.full((b, n), -1, np.int32)
    for i in range(b):
        seen = sorted({int(labels[i, j, 0]) for j in range(n) if valid[i, j] and kind[i, j] == 0})
        want[i, : len(seen)] = seen
    ref, _, _ = reference_loss(g, c_obj, want)
    np.testing.assert_allclose(float(total), ref, rtol=1e-5)
    assert "loss_object" not in met and "loss_ocr" not in met
    with pytest.raises(ValueError, match="need region_embed"):
        losses.rice_loss(None, jnp.asarray(g), jnp.asarray(valid), jnp.asarray(kind), jnp.asarray(labels),
                         jnp.asarray(c_obj), jnp.zeros((4, e)))


def _partial_fc_sample(labels, k, rate, rng, shards):
    """The class ids the loss scores at ``rate`` on ``shards`` centre shards: each shard's positives
    plus its draw (``sample_classes`` with the shard's key), as ``margin_softmax_loss`` makes them."""
    import math

    k_shard = -(-k // shards)
    n_sample = max(1, math.ceil(rate * k / shards))
    capacity = min(k_shard, max(n_sample, labels.size))
    chosen = []
    for s in range(shards):
        local = np.where((labels >= s * k_shard) & (labels < (s + 1) * k_shard), labels - s * k_shard, k_shard)
        valid = np.arange(k_shard) + s * k_shard < k
        idx, active, _ = losses.sample_classes(jnp.asarray(local), jnp.asarray(valid), jax.random.fold_in(rng, s),
                                               n_sample, capacity)
        chosen += (np.asarray(idx)[np.asarray(active)] + s * k_shard).tolist()
    return chosen


@pytest.mark.parametrize("rate", [1.0, 0.2])
@pytest.mark.parametrize("use_mesh", [False, "auto", "explicit"])
def test_softmax_straight_through_is_insightface_partial_fc(use_mesh, rate):
    """``form="softmax"`` + ``margin_grad="straight_through"`` on single-label rows is the
    insightface / unicom PartialFC loss (an independent reference written from their description):
    loss and both gradients, dense and class-parallel, at rho = 1 and on the same sampled set at rho < 1."""
    from tests.loss_reference import partial_fc_reference

    mesh = make_mesh(2, 4, axis_type=use_mesh) if use_mesh else None
    f, c, labels = make_problem(b=16, k=203, d=24, m=1, seed=11, multi=False)
    rng = jax.random.key(5)
    kw = dict(form="softmax", margin_grad="straight_through", sample_rate=rate, rng=rng, mesh=mesh, scale=64.0,
              margin=0.3)
    loss, (gf, gc) = _grads(losses.margin_softmax_loss, f, c, labels, **kw)
    sampled = None if rate == 1.0 else _partial_fc_sample(labels, 203, rate, rng, mesh.size if mesh else 1)
    ref, rgf, rgc = partial_fc_reference(f, c, labels, scale=64.0, margin=0.3, sampled=sampled)
    assert abs(float(loss) - ref) <= 1e-5 * abs(ref)
    assert_close(gf, rgf, rel=2e-5)
    assert_close(gc, rgc, rel=2e-5)


def test_loss_forms_differ_as_documented():
    """The two forms and margin gradients on the same single-label rows: straight-through changes
    only the gradient; each form equals its own numpy reference and they differ from each other; a
    multi-label row in the softmax form averages its positives' cross-entropies."""
    from tests.loss_reference import partial_fc_reference

    f, c, labels = make_problem(b=8, k=31, d=16, m=1, seed=2, multi=False)
    run = lambda **kw: _grads(losses.margin_softmax_loss, f, c, labels, **kw)
    exact, (gf_exact, _) = run(form="softmax")
    st, (gf_st, _) = run(form="softmax", margin_grad="straight_through")
    assert abs(float(exact) - float(st)) <= 1e-6 * abs(float(st))
    assert np.abs(np.asarray(gf_exact) - np.asarray(gf_st)).max() > 1e-3
    mlcd, _ = run()
    assert abs(float(mlcd) - float(exact)) > 1e-3 * abs(float(exact))
    assert abs(float(mlcd) - reference_loss(f, c, labels)[0]) <= 1e-5 * abs(float(mlcd))
    assert abs(float(st) - partial_fc_reference(f, c, labels)[0]) <= 1e-5 * abs(float(st))
    # Two positives in one row: the mean of each positive's cross-entropy over {p} ∪ negatives.
    two = np.full((8, 2), -1, np.int32)
    two[:, 0], two[0, 1] = labels[:, 0], (labels[0, 0] + 1) % 31
    got, _ = losses.margin_softmax_loss(jnp.asarray(f), jnp.asarray(c), jnp.asarray(two), form="softmax")
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    cn = c / np.linalg.norm(c, axis=1, keepdims=True)
    cos = fn @ cn.T
    rows = []
    for i in range(8):
        pos = sorted({int(x) for x in two[i] if x >= 0})
        if not pos:           # a row without a label is left out
            continue
        neg = [j for j in range(31) if j not in pos]
        ces = []
        for p in pos:
            z = 64.0 * np.cos(np.arccos(cos[i, p]) + 0.3)
            ces.append(np.logaddexp(z, np.log(np.exp(64.0 * cos[i, neg]).sum())) - z)
        rows.append(np.mean(ces))
    assert abs(float(got) - np.mean(rows)) <= 1e-5 * abs(np.mean(rows))
    with pytest.raises(ValueError, match="form"):
        losses.margin_softmax_loss(jnp.asarray(f), jnp.asarray(c), jnp.asarray(two), form="arcface")
