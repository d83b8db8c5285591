"""Region cluster discrimination: the (multi-label) margin softmax, dense or class-parallel.

For a row with positive set P and negative set N (all other classes, or the
PartialFC sample), with L2-normalised features and centres and ``c = cos θ``::

    L = log(1 + Σ_{p∈P} exp(−s·φ(c_p))) + log(1 + Σ_{n∈N} exp(s·c_n))

``φ(c) = cos(arccos(c) + m)`` (ArcFace) or ``c − m`` (CosFace). Objects have one
positive (their cluster), OCR regions up to M (their token ids); this is the
unified multi-label form of MLCD/RICE (docs/design.md §1), ``form="mlcd"``, the
paper's and the default.

``form="softmax"`` is the insightface / unicom PartialFC convention that users
migrating from those codebases have: per positive ``p`` a softmax cross-entropy
over ``{p} ∪ N`` with the margin on ``p``'s logit, ``−s·φ(c_p) + log(exp(s·φ(c_p))
+ Σ_{n∈N} exp(s·c_n))``, averaged over the row's positives (a single-label row is
their loss exactly). ``margin_grad="straight_through"`` is how they apply the
ArcFace margin (in place, under ``no_grad``): the value is ``φ(c)``, the gradient
that of ``c`` (none through ``arccos``); ``"exact"`` differentiates ``φ``.

Class-parallel (``mesh`` given): the centre matrix is sharded along K over
every mesh axis. Inside one ``jax.shard_map`` each device all-gathers the
features and labels (O(B·D + B·M) communication), scores only its own centre
shard, and the per-row max / sum of the negative term and the positive
cosines are combined with ``pmax``/``psum`` (O(B·M) scalars). No device ever
holds a ``[B, K]`` array: with PartialFC it holds ``[B, capacity]`` with
``capacity ≈ ρ·K/W``.

PartialFC (``sample_rate`` ρ < 1): each shard keeps every positive class of
the global batch that lives in it plus uniformly random other classes, up to
``n_sample = ⌈ρ·K/W⌉`` classes. Shapes are static, so a shard scores
``capacity = min(K/W, max(n_sample, max_positives_per_shard))`` gathered
centre rows, where ``max_positives_per_shard`` defaults to ``B·M`` — the
most distinct positives a batch can have — so positives are *never* dropped.
Slots beyond ``max(n_sample, #positives in the shard)`` are masked. Pass a
smaller ``max_positives_per_shard`` to cap the cost for huge batches; positives
beyond the cap are then dropped and counted in ``aux["positives_dropped"]``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rice_jax import errors
from rice_jax.batch import KIND_OBJECT, KIND_TEXT
from rice_jax.sharding import ALL_AXES, conform, has_explicit_axes

_COS_EPS = 1e-6  # clip cos away from ±1 so d/dc arccos(c) stays finite
MARGIN_TYPES = ("arcface", "cosface")
FORMS = ("mlcd", "softmax")                       # the loss's form (module docstring)
MARGIN_GRADS = ("exact", "straight_through")      # how the margin is differentiated


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The RICE objective of a training run. A training config's ``c.loss`` section is these fields.

    Names: the *object* term scores object regions against ``num_obj_classes`` (K) cluster centres,
    the *OCR* term scores text regions against ``num_ocr_classes`` (V) token centres, the *global*
    term scores the image against the object centres (MLCD's multi-label target)."""
    num_obj_classes: int = 0         # K object cluster centres; 0 = the dataset manifest's num_clusters
    num_ocr_classes: int = 0         # V OCR token centres; 0 = the dataset tokenizer's vocab_size
    scale: float = 64.0
    margin: float = 0.3
    margin_type: str = "arcface"     # or "cosface"
    form: str = "mlcd"               # "mlcd" (the paper's multi-label form) | "softmax" (insightface PartialFC)
    margin_grad: str = "exact"       # "exact" (through arccos) | "straight_through" (insightface's ArcFace)
    sample_rate: float = 0.1         # PartialFC rho (1.0 = all classes)
    object_weight: float = 1.0
    ocr_weight: float = 1.0
    global_weight: float = 0.0       # image-level (MLCD-style) term
    # Centre rows are padded to a multiple of lcm(this, device count): a checkpoint then restores
    # on any mesh whose device count divides this number (e.g. written on 8, resumed on 4).
    pad_classes_to: int = 512
    init_centers: str = ""           # "" = N(0, 0.01); or a centers.npy from rice_jax.labelling.clustering

    def __post_init__(self):
        if self.margin_type not in MARGIN_TYPES:
            raise errors.InputError(f"loss.margin_type must be one of {MARGIN_TYPES}, got {self.margin_type!r}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise errors.InputError(f"loss.sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.form not in FORMS:
            raise errors.InputError(f"loss.form must be one of {FORMS}, got {self.form!r}")
        if self.margin_grad not in MARGIN_GRADS:
            raise errors.InputError(f"loss.margin_grad must be one of {MARGIN_GRADS}, got {self.margin_grad!r}")
        weights = (self.object_weight, self.ocr_weight, self.global_weight)
        if min(weights) < 0 or not any(weights):
            raise errors.InputError(f"loss weights (object, ocr, global) = {weights}: all >= 0 and one > 0")
        if self.num_obj_classes < 0 or self.num_ocr_classes < 0:
            raise errors.InputError("loss.num_obj_classes / loss.num_ocr_classes must be >= 0 (0 = from the dataset)")

    @property
    def uses_regions(self) -> bool:
        """Whether the model runs region tokens: the one decision read by the train step, the FLOP
        count, the checkpoint's metadata (``region_layers``) and evaluation (through that metadata)."""
        return bool(self.object_weight or self.ocr_weight)

    def rice_loss_kwargs(self) -> dict:
        """The keyword arguments of :func:`rice_loss` this config sets (class counts come from the data)."""
        return dict(object_weight=self.object_weight, ocr_weight=self.ocr_weight, global_weight=self.global_weight,
                    scale=self.scale, margin=self.margin, margin_type=self.margin_type, sample_rate=self.sample_rate,
                    form=self.form, margin_grad=self.margin_grad)


def padded_num_classes(num_classes: int, num_shards: int) -> int:
    """K rounded up to a multiple of the device count (padded rows are masked)."""
    return -(-num_classes // num_shards) * num_shards


def validate_labels(labels, num_classes: int, name: str = "labels") -> None:
    """Raise a ValueError naming the first bad entry: labels must be −1 (pad) or in [0, K)."""
    labels = np.asarray(labels)
    bad = (labels < -1) | (labels >= num_classes)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name}{list(idx)} = {int(labels[idx])} is outside [-1, {num_classes}); "
            f"{int(bad.sum())} bad entries in total (K = {num_classes}: raise K or fix the labels)")


def l2_normalize(x, axis: int = -1):
    """``x`` scaled to unit length along ``axis``, in float32; zero rows stay zero.

    The method's one L2 normalisation: every cosine in it (the loss's features and centres, k-means'
    features and centres, the stored teacher features, the kNN probe) is between these unit vectors.
    A NumPy array stays a NumPy array on the host (feature rows at clustering scale never visit a
    device); anything else is traced, where ``rsqrt(max(|x|², eps))`` keeps the gradient finite for
    all-zero (padded) rows."""
    if isinstance(x, np.ndarray):
        x = x.astype(np.float32, copy=False)
        return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)
    x = jnp.asarray(x).astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), 1e-24))


def margin_positive(cos: jax.Array, margin: float, margin_type: str, margin_grad: str = "exact") -> jax.Array:
    """``φ(cos)``; with ``margin_grad="straight_through"`` its value with the gradient of ``cos``."""
    if margin_grad == "straight_through":
        return cos + jax.lax.stop_gradient(margin_positive(cos, margin, margin_type) - cos)
    if margin_grad != "exact":
        raise ValueError(f"margin_grad must be one of {MARGIN_GRADS}, got {margin_grad!r}")
    if margin_type == "arcface":
        c = jnp.clip(cos, -1.0 + _COS_EPS, 1.0 - _COS_EPS)
        return jnp.cos(jnp.arccos(c) + margin)
    if margin_type == "cosface":
        return cos - margin
    raise ValueError(f"margin_type must be 'arcface' or 'cosface', got {margin_type!r}")


def dedupe_labels(labels: jax.Array) -> jax.Array:
    """Repeated ids within a row become −1, so each positive counts once."""
    m = labels.shape[-1]
    earlier = jnp.tril(jnp.ones((m, m), bool), k=-1)  # [m, m'] True where m' < m
    dup = jnp.any((labels[..., :, None] == labels[..., None, :]) & earlier, axis=-1)
    return jnp.where(dup, -1, labels)


def _log1p_sum_exp(z: jax.Array, mask: jax.Array, reduce_max=None, reduce_sum=None) -> jax.Array:
    """Per row ``log(1 + Σ_{mask} exp(z))``, stable, optionally reduced across shards.

    The shift ``m = max(0, max z)`` is a constant for autodiff (stop_gradient);
    the "1" is ``exp(0 − m)``.
    """
    local_max = jax.lax.stop_gradient(jnp.max(jnp.where(mask, z, -jnp.inf), axis=-1))
    if reduce_max is not None:
        local_max = reduce_max(local_max)
    m = jnp.maximum(local_max, 0.0)
    s = jnp.sum(jnp.exp(jnp.where(mask, z - m[:, None], -jnp.inf)), axis=-1)
    if reduce_sum is not None:
        s = reduce_sum(s)
    return m + jnp.log(jnp.exp(-m) + s)


def _log_sum_exp_masked(z: jax.Array, mask: jax.Array, reduce_max=None, reduce_sum=None) -> jax.Array:
    """Per row ``log Σ_{mask} exp(z)`` (−inf for an empty mask), stable, optionally across shards."""
    local_max = jax.lax.stop_gradient(jnp.max(jnp.where(mask, z, -jnp.inf), axis=-1))
    if reduce_max is not None:
        local_max = reduce_max(local_max)
    m = jnp.where(jnp.isfinite(local_max), local_max, 0.0)
    s = jnp.sum(jnp.exp(jnp.where(mask, z - m[:, None], -jnp.inf)), axis=-1)
    if reduce_sum is not None:
        s = reduce_sum(s)
    return jnp.where(s > 0, m + jnp.log(jnp.where(s > 0, s, 1.0)), -jnp.inf)


def sample_classes(labels_local: jax.Array, valid_rows: jax.Array, rng: jax.Array, n_sample: int, capacity: int):
    """PartialFC selection inside one shard of ``k`` classes.

    ``labels_local [B, M]``: shard-local class ids, or ``k`` when the label is not
    in this shard / padding. Returns ``(idx [capacity], active [capacity],
    is_pos_class [k])``: all positives rank first, then a uniformly random
    subset of the other valid classes; ``active`` marks the first
    ``max(n_sample, #positives)`` slots (clipped to the valid classes).
    """
    k = valid_rows.shape[0]
    is_pos = jnp.zeros((k,), bool).at[labels_local.reshape(-1)].set(True, mode="drop")
    u = jax.random.uniform(rng, (k,))
    score = jnp.where(is_pos, 2.0 + u, jnp.where(valid_rows, u, -1.0))
    _, idx = jax.lax.top_k(score, capacity)
    n_active = jnp.minimum(jnp.maximum(n_sample, jnp.sum(is_pos)), jnp.sum(valid_rows))
    active = jnp.arange(capacity) < n_active
    return idx, active, is_pos


def _scored_classes(centers, local, valid_rows, rng, shard, n_sample, capacity, psum):
    """The classes one shard scores: all of its classes (``capacity`` None) or the PartialFC subset.

    Returns ``(normalised centres [width, D], active [width], slot of each label [B, M] (width =
    not scored), number of active classes, None or (positive classes, positive classes sampled))``.
    """
    k = centers.shape[0]
    if capacity is None:  # exact: every class of the shard
        return l2_normalize(centers), valid_rows, local, jnp.sum(valid_rows), None
    key = jax.random.fold_in(rng, shard)
    idx, active, is_pos_class = sample_classes(local, valid_rows, key, n_sample, capacity)
    c_s = l2_normalize(jnp.take(centers, idx, axis=0))
    slot_of = jnp.full((k + 1,), capacity, jnp.int32).at[idx].set(jnp.arange(capacity, dtype=jnp.int32))
    slot_of = jnp.where(jnp.arange(k + 1) < k, slot_of, capacity)
    pos_slot = slot_of[local]
    # Positives pushed beyond the capacity (only with a small max_positives_per_shard).
    pos_slot = jnp.where(pos_slot < capacity, pos_slot, capacity)
    sampled_pos = jnp.zeros((capacity,), bool).at[pos_slot.reshape(-1)].set(True, mode="drop") & active
    return c_s, active, pos_slot, jnp.sum(active), (psum(jnp.sum(is_pos_class)), psum(jnp.sum(sampled_pos)))


def _diagnostics(cos, neg_mask, pos_cos, pos_valid, has_pos, n_active, pmax, psum) -> dict:
    """Gradient-free row statistics. Top-1: the best-scoring class among those scored (all classes
    at rho = 1, the PartialFC sample otherwise) is one of the row's positives."""
    cos_ng = jax.lax.stop_gradient(cos)
    neg_max = pmax(jnp.max(jnp.where(neg_mask, cos_ng, -2.0), axis=-1))
    neg_sum = psum(jnp.sum(jnp.where(neg_mask, cos_ng, 0.0), axis=-1))
    neg_cnt = psum(jnp.sum(neg_mask, axis=-1))
    pos_max = jnp.max(jnp.where(pos_valid, jax.lax.stop_gradient(pos_cos), -2.0), axis=-1)
    rows = has_pos & jnp.any(pos_valid, axis=-1)
    n_eval = jnp.maximum(jnp.sum(rows), 1)
    n_pos = jnp.sum(pos_valid)
    return {
        "pos_cos_mean": jnp.sum(jnp.where(pos_valid, pos_cos, 0.0)) / jnp.maximum(n_pos, 1),
        "neg_cos_mean": jnp.sum(jnp.where(rows, neg_sum / jnp.maximum(neg_cnt, 1), 0.0)) / n_eval,
        "top1_acc": jnp.sum(rows & (pos_max > neg_max)) / n_eval,
        "num_rows": jnp.sum(has_pos),
        "num_sampled": psum(n_active),
    }


def _shard_loss(features, labels, centers, rng, *, axis, num_classes, n_sample, capacity,
                scale, margin, margin_type, form="mlcd", margin_grad="exact"):
    """Loss on one centre shard (or on all centres when ``axis`` is None)."""
    if axis is not None:
        features = jax.lax.all_gather(features, axis, tiled=True)
        labels = jax.lax.all_gather(labels, axis, tiled=True)
        shard = jax.lax.axis_index(axis)
        psum = functools.partial(jax.lax.psum, axis_name=axis)
        pmax = functools.partial(jax.lax.pmax, axis_name=axis)
    else:
        shard, psum, pmax = 0, (lambda x: x), (lambda x: x)
    k = centers.shape[0]
    b = features.shape[0]
    f = l2_normalize(features)
    labels = dedupe_labels(labels.astype(jnp.int32))
    has_pos = jnp.any(labels >= 0, axis=-1)

    offset = shard * k
    local = labels - offset
    in_shard = (labels >= 0) & (local >= 0) & (local < k)
    local = jnp.where(in_shard, local, k)  # k = "not here": dropped by scatters, clipped by gathers
    valid_rows = jnp.arange(k) + offset < num_classes

    # Positive cosines: each label lives in exactly one shard, so a psum assembles them.
    c_pos = l2_normalize(jnp.take(centers, jnp.minimum(local, k - 1), axis=0))
    pos_cos = psum(jnp.where(in_shard, jnp.einsum("bd,bmd->bm", f, c_pos), 0.0))

    c_s, active, pos_slot, n_active, sampled = _scored_classes(centers, local, valid_rows, rng, shard,
                                                               n_sample, capacity, psum)
    width = c_s.shape[0]

    cos = f @ c_s.T  # [B, width]: the only B x classes array, and only for this shard's subset
    is_pos_bj = jnp.zeros((b, width), bool).at[jnp.arange(b)[:, None], pos_slot].set(True, mode="drop")
    neg_mask = active[None, :] & ~is_pos_bj
    pos_valid = labels >= 0
    if capacity is not None:  # a dropped positive cannot be scored consistently: leave it out
        pos_valid = pos_valid & psum(jnp.where(in_shard, (pos_slot < capacity).astype(jnp.int32), 0)).astype(bool)
    z_pos = scale * margin_positive(pos_cos, margin, margin_type, margin_grad)
    if form == "mlcd":
        neg_term = _log1p_sum_exp(scale * cos, neg_mask, reduce_max=pmax, reduce_sum=psum)
        per_row = _log1p_sum_exp(-z_pos, pos_valid) + neg_term
    else:   # softmax cross-entropy per positive over {p} ∪ negatives, averaged over the row's positives
        lse_neg = _log_sum_exp_masked(scale * cos, neg_mask, reduce_max=pmax, reduce_sum=psum)
        ce = jnp.logaddexp(z_pos, lse_neg[:, None]) - z_pos
        n_pos = jnp.sum(pos_valid, axis=-1)
        per_row = jnp.sum(jnp.where(pos_valid, ce, 0.0), axis=-1) / jnp.maximum(n_pos, 1)
    per_row = jnp.where(has_pos, per_row, 0.0)
    n_rows = jnp.sum(has_pos)
    loss = jnp.sum(per_row) / jnp.maximum(n_rows, 1)
    aux = _diagnostics(cos, neg_mask, pos_cos, pos_valid, has_pos, n_active, pmax, psum)
    if sampled is not None:
        n_pos_total, n_pos_sampled = sampled
        aux["num_positive_classes"] = n_pos_total
        aux["num_positive_classes_sampled"] = n_pos_sampled
        aux["positives_dropped"] = n_pos_total - n_pos_sampled
    return loss, aux


def margin_softmax_loss(features: jax.Array, centers: jax.Array, labels: jax.Array, *,
                        scale: float = 64.0, margin: float = 0.3, margin_type: str = "arcface",
                        form: str = "mlcd", margin_grad: str = "exact",
                        sample_rate: float = 1.0, rng: Optional[jax.Array] = None,
                        mesh: Optional[Mesh] = None, num_classes: Optional[int] = None,
                        max_positives_per_shard: Optional[int] = None, check_labels: bool = False):
    """Multi-label margin softmax. Returns ``(loss, aux)``.

    Args:
      features: ``[B, D]`` embeddings (any float dtype; math is fp32).
      centers: ``[K, D]`` class centres; with a mesh, rows may already be padded
        to a multiple of the device count (pass ``num_classes`` = the real K).
      labels: ``[B, M]`` int32 class ids, −1 = padding. Rows without any
        positive are ignored; the loss is the mean over the others.
      form: ``"mlcd"`` (the paper's multi-label form) or ``"softmax"`` (insightface PartialFC's
        cross-entropy; module docstring).
      margin_grad: ``"exact"`` or ``"straight_through"`` (the margin's value, ``cos``'s gradient).
      sample_rate: PartialFC ρ; 1.0 = exact (all classes). Needs ``rng`` if < 1.
      mesh: class-parallel over all mesh axes when given, dense otherwise.
      num_classes: number of real classes (rows ≥ it are padding); default K.
      max_positives_per_shard: static cap on positives kept per shard under
        sampling; default ``B·M`` (never drops one).
      check_labels: validate label range (eagerly for concrete labels, via a
        host callback under jit).

    ``aux``: ``pos_cos_mean`` (mean cosine to the positive centres), ``neg_cos_mean``
    (mean cosine to the scored negatives, averaged per row), ``top1_acc`` (share of
    rows whose best-scoring class among the scored ones is a positive — all classes
    at ``sample_rate`` 1, the PartialFC sample otherwise), ``num_rows``, ``num_sampled`` and, with
    sampling, ``num_positive_classes``, ``num_positive_classes_sampled``,
    ``positives_dropped``.
    """
    if features.ndim != 2 or centers.ndim != 2 or labels.ndim != 2:
        raise ValueError(f"expected features [B,D], centers [K,D], labels [B,M]; got "
                         f"{features.shape}, {centers.shape}, {labels.shape}")
    if features.shape[1] != centers.shape[1] or features.shape[0] != labels.shape[0]:
        raise ValueError(f"shape mismatch: features {features.shape}, centers {centers.shape}, labels {labels.shape}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if form not in FORMS or margin_grad not in MARGIN_GRADS:
        raise ValueError(f"form {form!r} / margin_grad {margin_grad!r}: choose from {FORMS} / {MARGIN_GRADS}")
    num_classes = int(num_classes if num_classes is not None else centers.shape[0])
    if num_classes > centers.shape[0]:
        raise ValueError(f"num_classes {num_classes} > centre rows {centers.shape[0]}")
    if check_labels:
        if isinstance(labels, jax.core.Tracer):
            jax.debug.callback(lambda l: validate_labels(l, num_classes), labels)
        else:
            validate_labels(labels, num_classes)

    staged = functools.partial(_margin_softmax_on_mesh, scale=scale, margin=margin, margin_type=margin_type,
                               form=form, margin_grad=margin_grad, sample_rate=sample_rate, mesh=mesh,
                               num_classes=num_classes, max_positives_per_shard=max_positives_per_shard)
    if mesh is None or not has_explicit_axes(mesh) or jax.sharding.get_abstract_mesh() == mesh.abstract_mesh:
        return staged(features, centers, labels, rng)
    # Explicit axes and no (or another) context mesh: shardings are part of the types and reshard /
    # shard_map read the mesh from the context, which ``jax.set_mesh`` sets only outside any trace.
    # Inside a trace (a jit, or a grad) the abstract mesh is enough once the inputs are placed on the
    # mesh, so the same call works with or without ``jax.set_mesh``.
    if all(not isinstance(a, jax.core.Tracer) for a in (features, centers, labels)):
        with jax.set_mesh(mesh):
            return staged(features, centers, labels, rng)
    if not any(isinstance(a, jax.core.Tracer) and _under_jit(a) for a in (features, centers, labels)):
        return _eager_autodiff_on_mesh(mesh, staged, features, centers, labels, rng)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return jax.jit(staged)(features, centers, labels, rng)


def _eager_autodiff_on_mesh(mesh: Mesh, loss_fn, features, centers, labels, rng):
    """``loss_fn(features, centers, labels, rng)`` under eager autodiff (``jax.grad`` outside any jit
    and mesh context) on an Explicit mesh: forward and backward each run inside ``jax.set_mesh``
    on concrete arrays committed to the mesh, and values and gradients come back to the devices the
    inputs were on. (Staging the call into a jit under the abstract mesh instead leaves the
    backward pass without devices: grad seeds a one-device cotangent for a mesh-typed loss.)"""
    rep = NamedSharding(mesh, P())
    homes = (_home_sharding(features), _home_sharding(centers))
    put = lambda tree, where: jax.tree.map(
        lambda x: x if getattr(x, "dtype", None) == jax.dtypes.float0 else jax.device_put(x, where), tree)
    labels, rng = jax.device_put(labels, rep), None if rng is None else jax.device_put(rng, rep)
    run = lambda f, c: loss_fn(f, c, labels, rng)

    @jax.custom_vjp
    def call(f, c):
        with jax.set_mesh(mesh):
            return put(run(put(f, rep), put(c, rep)), homes[0])

    def fwd(f, c):
        with jax.set_mesh(mesh):
            out, vjp = jax.vjp(run, put(f, rep), put(c, rep))
        return put(out, homes[0]), vjp

    def bwd(vjp, ct):
        with jax.set_mesh(mesh):
            gf, gc = vjp(put(ct, rep))
        return put(gf, homes[0]), put(gc, homes[1])

    call.defvjp(fwd, bwd)
    return call(features, centers)


def _home_sharding(x) -> jax.sharding.Sharding:
    """Where a value lives: the sharding of a concrete array, or of the primal under an eager autodiff
    tracer; device 0 when it has none (a numpy array)."""
    while isinstance(x, jax.core.Tracer):
        x = getattr(x, "primal", getattr(x, "val", None))
    sh = getattr(x, "sharding", None)
    return sh if sh is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _under_jit(x) -> bool:
    """``x`` is being staged into a jaxpr (jit, scan, shard_map), not evaluated eagerly: it is, or an
    autodiff / batching tracer wraps (``primal``, ``val``), a jaxpr tracer."""
    from jax.interpreters import partial_eval as pe

    while isinstance(x, jax.core.Tracer):
        if isinstance(x, pe.DynamicJaxprTracer):
            return True
        x = getattr(x, "primal", getattr(x, "val", None))
    return False


def _margin_softmax_on_mesh(features, centers, labels, rng, *, scale, margin, margin_type, form, margin_grad,
                            sample_rate, mesh, num_classes, max_positives_per_shard):
    num_shards = 1 if mesh is None else mesh.size
    k_pad = padded_num_classes(centers.shape[0], num_shards)
    if k_pad != centers.shape[0]:
        # Pad K up to a multiple of the devices (padded rows are masked; the gradient is sliced back).
        # Rows that do not divide over the devices cannot be sharded along K, so on an Explicit mesh
        # the pad runs on a replicated copy (an Auto mesh lets the compiler choose).
        if mesh is not None:
            centers = conform(centers, mesh, P())
        centers = jnp.pad(centers, ((0, k_pad - centers.shape[0]), (0, 0)))
    k_shard = k_pad // num_shards
    b, m = labels.shape

    if sample_rate < 1.0:
        if rng is None:
            raise ValueError("sample_rate < 1 needs an rng key")
        n_sample = max(1, math.ceil(sample_rate * num_classes / num_shards))
        pos_bound = b * m if max_positives_per_shard is None else int(max_positives_per_shard)
        capacity = min(k_shard, max(n_sample, pos_bound))
    else:
        n_sample, capacity = k_shard, None
        rng = jax.random.key(0) if rng is None else rng

    kw = dict(num_classes=num_classes, n_sample=n_sample, capacity=capacity,
              scale=float(scale), margin=float(margin), margin_type=margin_type, form=form, margin_grad=margin_grad)
    if mesh is None:
        return _shard_loss(features, labels, centers, rng, axis=None, **kw)

    if b % num_shards:
        raise ValueError(f"batch rows {b} not divisible by the {num_shards} devices of the mesh")
    in_specs = (P(ALL_AXES, None), P(ALL_AXES, None), P(ALL_AXES, None), P())
    fn = jax.shard_map(functools.partial(_shard_loss, axis=ALL_AXES, **kw), mesh=mesh,
                       in_specs=in_specs, out_specs=P(), check_vma=False)
    # Works on Auto and Explicit meshes: on Explicit ones the inputs are resharded to in_specs first.
    args = [conform(x, mesh, s) for x, s in zip((features, labels, centers, rng), in_specs)]
    return fn(*args)


def mean_pairwise_cosine(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cosine over pairs ``i != j`` of the rows of ``x [R, D]`` where ``mask [R]``.

    ``(‖Σ f_i‖² − n) / (n(n−1))`` for unit rows ``f_i``: O(R·D), so it is cheap even
    for the region embeddings of a 32K-image batch. Near 1 = the embeddings have
    collapsed onto one direction; near 0 = spread out. No gradient.
    """
    f = jnp.where(mask[:, None], l2_normalize(jax.lax.stop_gradient(x)), 0.0)
    n = jnp.sum(mask).astype(jnp.float32)
    total = jnp.sum(f, axis=0)
    return (jnp.sum(total * total) - n) / jnp.maximum(n * (n - 1.0), 1.0)


def image_labels(region_valid: jax.Array, region_kind: jax.Array, labels: jax.Array) -> jax.Array:
    """Image-level multi-label target ``[B, N]`` (MLCD-style): the clusters of the image's valid object
    regions (column 0 of their labels), −1 elsewhere; repeated clusters count once."""
    return jnp.where(region_valid & (region_kind == KIND_OBJECT), labels[..., 0], -1)


def rice_loss(region_embed: Optional[jax.Array], global_embed: Optional[jax.Array], region_valid: jax.Array,
              region_kind: jax.Array, labels: jax.Array, centers_obj: jax.Array, centers_ocr: jax.Array, *,
              object_weight: float = 1.0, ocr_weight: float = 1.0, global_weight: float = 0.0,
              rng: Optional[jax.Array] = None, num_obj_classes: Optional[int] = None,
              num_ocr_classes: Optional[int] = None, **loss_kw):
    """The RICE objective: mean object-region loss + mean OCR-region loss (+ optional image term).

    This function owns what the batch's labels mean. ``labels [B,N,M]`` (−1 pad) per region slot,
    ``region_kind [B,N]`` (``KIND_OBJECT`` 0 / ``KIND_TEXT`` 1), ``region_valid [B,N]``:

    - object region: its k-means cluster in column 0 — one positive among ``centers_obj [K,E]``;
    - text region: the token ids of its transcript in all M columns — every one a positive among
      ``centers_ocr [V,E]``;
    - image (``global_weight`` > 0): the clusters of its valid object regions
      (:func:`image_labels`), multi-label against ``centers_obj`` on ``global_embed [B,E]``.

    ``region_embed [B,N,E]`` may be None when both region weights are 0 (the global-only
    objective needs no region tokens); padded regions contribute nothing.
    """
    if (object_weight or ocr_weight) and region_embed is None:
        raise ValueError("object/OCR weights > 0 need region_embed [B, N, E]")
    if global_weight and global_embed is None:
        raise ValueError("global_weight > 0 needs global_embed [B, E]")
    rngs = jax.random.split(rng if rng is not None else jax.random.key(0), 3)
    total, metrics = 0.0, {}
    if object_weight or ocr_weight:
        b, n, e = region_embed.shape
        flat = region_embed.reshape(b * n, e)
        valid = region_valid.reshape(b * n)
        kind = region_kind.reshape(b * n)
        lab = labels.reshape(b * n, -1)
        is_obj, is_ocr = valid & (kind == KIND_OBJECT), valid & (kind == KIND_TEXT)
    # (name, weight, features, centres, labels, rows that count, rng, real class count) per term.
    terms = []
    if object_weight:
        terms.append(("object", object_weight, flat, centers_obj, jnp.where(is_obj[:, None], lab[:, :1], -1),
                      is_obj, rngs[0], num_obj_classes))
    if ocr_weight:
        terms.append(("ocr", ocr_weight, flat, centers_ocr, jnp.where(is_ocr[:, None], lab, -1), is_ocr, rngs[1],
                      num_ocr_classes))
    if global_weight:
        img = image_labels(region_valid, region_kind, labels)
        terms.append(("global", global_weight, global_embed, centers_obj, img, jnp.any(img >= 0, axis=-1), rngs[2],
                      num_obj_classes))
    for name, weight, x, centers, term_labels, rows, key, k in terms:
        loss, aux = margin_softmax_loss(x, centers, term_labels, rng=key, num_classes=k, **loss_kw)
        total = total + weight * loss
        metrics[f"loss_{name}"] = loss
        metrics.update({f"{name}/{a}": v for a, v in aux.items()})
        metrics[f"{name}/pairwise_cos"] = mean_pairwise_cosine(x, rows)
    metrics["loss"] = total
    return total, metrics
