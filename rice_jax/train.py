"""RICE pretraining: one train loop, read top to bottom.

    python -m rice_jax.train --config rice_jax/configs/rice.py:tiny --workdir DIR [--config.key=value ...]

Set-up -> mesh -> data -> model, centres and optimiser (initialised directly
sharded) -> restore (or init_from) -> jitted train step -> loop with metrics,
checkpoints and SIGTERM handling. Restarting the same command resumes from the
last checkpoint, data iterator included, bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from absl import flags, logging
from jax.sharding import NamedSharding, PartitionSpec as P

from rice_jax import backbones, checkpoint, cli, distributed, errors, losses, optim, perf, sharding, storage
from rice_jax import batch as batch_contract
from rice_jax.data import pipeline, records
from rice_jax.data.tokenizer import for_dataset as tokenizer_for_dataset
from rice_jax.models import config as mcfg
from rice_jax.models.rice import RICEConfig, RICEModel, config_from_settings

# ----------------------------------------------------------------------------- config checks
def validate_config(c, num_devices: int, manifest: dict) -> tuple[int, int]:
    """Derived checks with messages that say what to change. Returns (K, V)."""
    if not c.data.dir:
        raise errors.InputError("config.data.dir is empty: set --config.data.dir=DIR (a rice_jax region dataset)")
    if c.batch_size % num_devices:
        raise errors.InputError(f"config.batch_size={c.batch_size} is not divisible by the {num_devices} devices; "
                         f"use a multiple of {num_devices}")
    check_grad_accum(c, num_devices)
    if c.data.num_regions < 1:
        raise errors.InputError(f"config.data.num_regions={c.data.num_regions}: need N >= 1")
    if not c.stages:
        raise errors.InputError("config.stages is empty: give at least one (steps, image_size) pair")
    optim.stage_lr_multipliers(optim_config(c), c.stages)  # one per stage
    preset = mcfg.get_preset(c.model.backbone)
    for s in c.stages:
        if len(s) != 2 or s[0] < 1:
            raise errors.InputError(f"config.stages entry {s!r} must be (steps >= 1, image_size)")
        if s[1] % preset.patch_size:
            raise errors.InputError(f"stage image_size {s[1]} is not a multiple of patch size {preset.patch_size}")
    lc = loss_config(c)
    k = lc.num_obj_classes or (manifest.get("num_clusters") or 0)
    if (lc.object_weight or lc.global_weight) and k < 1:
        raise errors.InputError(f"{c.data.dir} has no cluster labels: run `python -m rice_jax.labelling.clustering --data "
                         f"{c.data.dir} --k K` first, or set config.loss.num_obj_classes")
    if lc.num_obj_classes and manifest.get("num_clusters") and lc.num_obj_classes < manifest["num_clusters"]:
        raise errors.InputError(f"config.loss.num_obj_classes={lc.num_obj_classes} < the dataset's "
                                f"{manifest['num_clusters']} clusters (K must be >= the largest label + 1)")
    v = lc.num_ocr_classes or ((manifest.get("tokenizer") or {}).get("vocab_size") or 0)
    if lc.ocr_weight and v < 1:
        raise errors.InputError(f"{c.data.dir} has no tokenizer: build one with `python -m rice_jax.data.tokenizer "
                         f"--data {c.data.dir}`, or set --config.loss.ocr_weight=0")
    return max(k, 1), max(v, 1)


# ----------------------------------------------------------------------------- model + optimiser
def build_model_config(c) -> RICEConfig:
    return config_from_settings(c.model)


def loss_config(c) -> losses.LossConfig:
    """``c.loss`` as the dataclass it is made from (checked on construction)."""
    return losses.LossConfig(**c.loss.to_dict())


def optim_config(c) -> optim.OptimConfig:
    """``c.optim`` as the dataclass it is made from (checked on construction)."""
    return optim.OptimConfig(**c.optim.to_dict())


@dataclasses.dataclass
class Setup:
    mesh: Any
    graphdef: Any
    tx: Any
    sched: Any
    state_shardings: Any
    abstract_state: Any
    num_obj_classes: int   # K real object centres (rows beyond are padding)
    num_ocr_classes: int   # V real OCR token centres


def abstract_setup(c, mesh, model_cfg: RICEConfig, num_obj_classes: int, num_ocr_classes: int):
    """The train state's shapes, dtypes and shardings and how to create it, without allocating
    anything: what :func:`init_state` materialises and what ``rice_jax.preflight.plan`` compiles for a
    TPU topology. Returns ``(create, setup)``."""
    tx, sched = optim.make_optimizer(optim_config(c), c.stages)
    e = model_cfg.embed_dim or model_cfg.backbone.hidden_size
    multiple = math.lcm(mesh.size, max(c.loss.pad_classes_to, 1))
    k_pad = losses.padded_num_classes(num_obj_classes, multiple)
    v_pad = losses.padded_num_classes(num_ocr_classes, multiple)

    def create():
        model = RICEModel(model_cfg, rngs=nnx.Rngs(c.seed))
        graphdef, mstate = nnx.split(model)
        key = jax.random.key(c.seed + 1)
        params = {
            "model": nnx.to_pure_dict(mstate),
            "centers_obj": 0.01 * jax.random.normal(jax.random.fold_in(key, 0), (k_pad, e), jnp.float32),
            "centers_ocr": 0.01 * jax.random.normal(jax.random.fold_in(key, 1), (v_pad, e), jnp.float32),
        }
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(jax.random.key(c.seed + 2)),
                "skipped_updates": jnp.zeros((), jnp.int32)}

    abstract = jax.eval_shape(create)
    shardings = sharding.tree_shardings(abstract, mesh, rules=tuple(tuple(r) for r in c.sharding_rules))
    graphdef = nnx.split(nnx.eval_shape(lambda: RICEModel(model_cfg, rngs=nnx.Rngs(0))))[0]
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return create, Setup(mesh, graphdef, tx, sched, shardings, abstract, num_obj_classes, num_ocr_classes)


def init_state(c, mesh, model_cfg: RICEConfig, num_obj_classes: int, num_ocr_classes: int, init_centers=None):
    """Model, centres and optimiser state created inside jit with their final shardings."""
    create, setup = abstract_setup(c, mesh, model_cfg, num_obj_classes, num_ocr_classes)
    state = jax.jit(create, out_shardings=setup.state_shardings)()
    if init_centers is not None:
        state["params"]["centers_obj"] = _put_centers(init_centers, state["params"]["centers_obj"])
    return state, setup


def _put_centers(centers: np.ndarray, target: jax.Array) -> jax.Array:
    """k-means centres (rows < K) into the padded, sharded centre matrix, shard by shard."""
    centers = np.asarray(centers, np.float32)
    if centers.shape[1] != target.shape[1] or centers.shape[0] > target.shape[0]:
        raise errors.InputError(f"init_centers {centers.shape} do not fit the centre matrix {target.shape} "
                         "(the extractor's dimension must equal the embedding size)")
    full = np.zeros(target.shape, np.float32)
    full[: centers.shape[0]] = centers * 0.01 * math.sqrt(target.shape[1])
    return jax.make_array_from_callback(target.shape, target.sharding, lambda idx: full[idx])


def apply_init_from(spec: str, state, model_cfg: RICEConfig):
    """Overwrite the backbone parameters from a :mod:`rice_jax.backbones` spec (params only).

    From a ``ckpt:`` run whose model had the same region parameters (``region_seed="roi"``) those
    are taken too, so a second labelling round continues the region tokens it re-clustered with;
    the training head and the centres always start fresh (the labels changed)."""
    if spec:
        target = state["params"]["model"]["backbone"]
        state["params"]["model"]["backbone"] = backbones.load_params_into(spec, target)
        source = backbones.parse(spec)
        seed = state["params"]["model"].get("region_seed")
        if source.scheme == "ckpt" and seed is not None and checkpoint.read_meta(source.where).get("region_seed") == "roi":
            abstract = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=t.sharding), seed)
            state["params"]["model"]["region_seed"], _, _ = checkpoint.restore_subtree(
                source.where, abstract, keys=("params", "model", "region_seed"))
    return state


# ----------------------------------------------------------------------------- the step
def check_grad_accum(c, num_devices: int) -> int:
    """``config.grad_accum_steps`` checked against the batch and the devices; returns it."""
    n = int(c.get("grad_accum_steps", 1) or 1)
    if n < 1 or c.batch_size % (n * num_devices):
        raise errors.InputError(f"config.grad_accum_steps={n}: batch_size {c.batch_size} must split into {n} microbatches "
                         f"that each spread evenly over the {num_devices} devices (a multiple of {n * num_devices})")
    return n


def split_microbatches(x: jax.Array, n: int, mesh) -> jax.Array:
    """``[B, ...]`` -> ``[n, B/n, ...]``, microbatch j = rows j, j+n, j+2n, ...

    Strided rather than contiguous so that every device's own rows split evenly into the n
    microbatches: each microbatch stays spread over all devices and no row moves."""
    y = jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
    spec = P(None, sharding.ALL_AXES, *([None] * (x.ndim - 1)))
    if sharding.has_explicit_axes(mesh):
        return jax.sharding.reshard(y, spec)
    return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))


def make_train_step(c, setup: Setup):
    mesh, graphdef, tx = setup.mesh, setup.graphdef, setup.tx
    accum = check_grad_accum(c, mesh.size)
    loss_cfg = loss_config(c)
    region_losses = loss_cfg.uses_regions

    def forward(model_params, image, boxes, region_valid):
        model = nnx.merge(graphdef, model_params)
        image = batch_contract.model_pixels(image)   # uint8 crossed to the device; normalised here
        if region_losses:
            out = model(image, boxes, region_valid)
            return out.region_embed, out.global_embed
        out = model(image)
        return None, out.global_embed

    if sharding.has_explicit_axes(mesh):
        # Explicit mesh: the model's layers are written for compiler-propagated (Auto) shardings, so
        # the forward runs in Auto mode inside the step and hands back batch-sharded embeddings; the
        # class-parallel loss (shard_map), the gradients and the optimiser stay explicit.
        batch_spec = lambda nd: P(sharding.ALL_AXES, *([None] * (nd - 1)))
        forward = jax.sharding.auto_axes(
            forward, out_sharding=(batch_spec(3) if region_losses else None, batch_spec(2)))

    def train_step(state, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

        def loss_fn(params, mb, key):
            region_embed, global_embed = forward(params["model"], mb["image"], mb["boxes"], mb["region_valid"])
            return losses.rice_loss(
                region_embed, global_embed, mb["region_valid"], mb["region_kind"], mb["labels"],
                params["centers_obj"], params["centers_ocr"], rng=key, mesh=mesh,
                num_obj_classes=setup.num_obj_classes, num_ocr_classes=setup.num_ocr_classes,
                **loss_cfg.rice_loss_kwargs())

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if accum == 1:
            (loss, metrics), grads = grad_fn(state["params"], batch, rng)
        else:
            # Microbatches in a scan: the update is the mean of their gradients (each microbatch's
            # loss a mean over its own rows), metrics their means; PartialFC draws per microbatch.
            micro = {k: split_microbatches(batch[k], accum, mesh) for k in batch_contract.TRAIN_KEYS if k != "image_ok"}

            def body(acc, xs):
                mb, j = xs
                (_, m), g = grad_fn(state["params"], mb, jax.random.fold_in(rng, j))
                return jax.tree.map(lambda a, b: a + b.astype(a.dtype) / accum, acc, g), m

            zeros = jax.tree.map(jnp.zeros_like, state["params"])
            grads, stacked = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
            metrics = jax.tree.map(lambda v: jnp.mean(v, axis=0), stacked)
            loss = metrics["loss"]
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {
            "params": keep(new_params, state["params"]), "opt_state": keep(new_opt, state["opt_state"]),
            "step": state["step"] + 1, "rng": state["rng"],
            "skipped_updates": state["skipped_updates"] + (~finite).astype(jnp.int32),
        }
        metrics = dict(metrics, grad_norm=grad_norm, lr=setup.sched(state["step"]), update_skipped=~finite,
                       skipped_records=jnp.sum(~batch["image_ok"]))
        return new_state, metrics

    batch_sh = {k: sharding.batch_sharding(mesh, len(shape))
                for k, (shape, _) in batch_contract.train_shapes(1, 1, 1, 1).items()}
    step = jax.jit(train_step, in_shardings=(setup.state_shardings, batch_sh),
                   out_shardings=(setup.state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    return (_InMesh(step, mesh) if sharding.has_explicit_axes(mesh) else step), batch_sh


class _InMesh:
    """A jitted function traced inside ``jax.set_mesh(mesh)``: Explicit-axis code (``auto_axes``,
    ``reshard``) reads the mesh from that context. ``lower`` and calls behave as the jitted function's."""

    def __init__(self, fn, mesh):
        self.fn, self.mesh = fn, mesh

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.fn.lower(*args)

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.fn(*args)


def to_global_batch(local: dict, batch_sh: dict) -> dict:
    """Per-process numpy batch -> global jax arrays (each process holds its own slice)."""
    return {k: jax.make_array_from_process_local_data(batch_sh[k], np.asarray(local[k])) for k in batch_contract.TRAIN_KEYS}


# ----------------------------------------------------------------------------- metrics
class MetricWriter:
    """``metrics.jsonl`` (always) + TensorBoard event files (tensorboardX) in the workdir, any scheme.

    tensorboardX and appends need a local file: for a remote workdir both are written to a local
    spool (:class:`storage.Mirror`, seeded with the run's existing ``metrics.jsonl`` so a resumed run
    continues it) and copied up every ``sync_every_s`` seconds and at checkpoints and close."""

    def __init__(self, workdir, enabled: bool, sync_every_s: float = 60.0):
        self.enabled = enabled
        if not enabled:
            return
        self.mirror = storage.Mirror(workdir, seed=("metrics.jsonl",), every_s=sync_every_s)
        self.jsonl = open(os.path.join(self.mirror.local, "metrics.jsonl"), "a")
        from tensorboardX import SummaryWriter  # the loop's logging deps: not in the planner's .venv-plan

        self.tb = SummaryWriter(os.path.join(self.mirror.local, "tensorboard"))

    def write(self, step: int, scalars: dict):
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, step)
        self.mirror.maybe_sync()

    def sync(self):
        if self.enabled:
            self.tb.flush()
            self.mirror.sync()

    def close(self):
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
            self.mirror.close()


# ----------------------------------------------------------------------------- main loop
def stage_bounds(c) -> np.ndarray:
    """Global step at which each stage starts, plus the total: ``[0, s0, s0+s1, ...]``."""
    return np.cumsum([0] + [s[0] for s in c.stages])


def stage_at(c, step: int) -> int:
    """The stage that runs global step ``step`` (the last stage once training is complete)."""
    bounds = stage_bounds(c)
    return int(min(np.searchsorted(bounds, step, side="right") - 1, len(c.stages) - 1))


def _open_data(c, is_main: bool) -> records.RecordSource:
    """The process's one record source, built before anything is compiled (every stage's pipeline
    reads through it): a damaged shard stops the run naming it or, when the config allows it, is left
    out — printed, and kept in ``source.skipped`` so the summary and metrics count it."""
    # raises DamagedShardError naming the first damaged shard unless skip_damaged_shards
    source = records.RecordSource(c.data.dir, skip_damaged=c.data.skip_damaged_shards, check=c.data.shard_check)
    damaged = source.skipped
    if damaged and is_main:
        lost = sum(s.expected for s in damaged)
        print(f"[train] WARNING: skipping {len(damaged)} damaged shard(s), {lost} records "
              "(config.data.skip_damaged_shards=True):", flush=True)
        for s in damaged:
            print(f"[train]   {s.path}: {s.problem}", flush=True)
    return source


def make_stage_iter(c, tokenizer, source: Optional[records.RecordSource] = None):
    """``stage_iter(i, workers=None)``: a fresh Grain iterator of this process's batches for stage ``i``,
    read by ``workers`` Grain worker processes — by default ``stage_iter.workers``, what
    ``data.workers`` resolves to on this host. A resumed stage passes its checkpoint's count instead:
    the iterator's saved state is per worker."""
    per_process_batch = c.batch_size // jax.process_count()

    def stage_iter(stage_idx: int, workers=None):
        pcfg = pipeline.config_from_section(c.data, image_size=c.stages[stage_idx][1], batch_size=per_process_batch,
                                            seed=c.seed * 1000 + stage_idx,
                                            workers=stage_iter.workers if workers is None else workers)
        return iter(pipeline.make_dataset(c.data.dir, pcfg, tokenizer=tokenizer, source=source))
    stage_iter.workers = pipeline.resolve_workers(c.data.workers)
    return stage_iter


def compile_step(train_step, state, batch):
    """Ahead-of-time compile for this batch shape (one per stage: the image size changes)."""
    return train_step.lower(state, batch).compile()


def restore_or_init(c, ckpt, setup, state, model_cfg, stage_iter, log):
    """``(start step, state, data iterator, its worker processes)``: the newest intact checkpoint
    (iterator included when it was written in the same stage, read by as many workers as wrote it),
    else a fresh start with ``init_from`` applied."""
    def restore(step: int):
        stage = stage_at(c, step)
        meta = ckpt.restore_meta(step)
        same_stage = meta.get("stage") == stage
        workers = int(meta.get("data_workers", stage_iter.workers)) if same_stage else stage_iter.workers
        if workers != stage_iter.workers:
            log(f"[train] reading with {workers} data worker(s) as the checkpoint was written (data.workers "
                f"gives {stage_iter.workers} here): Grain's saved iterator state is per worker")
        it = stage_iter(stage, workers)
        return ckpt.restore(step, setup.abstract_state, it if same_stage else None), it, workers

    start, restored = ckpt.restore_newest_intact(restore, strict=c.strict_restore, log=log)
    if start is None:
        return 0, apply_init_from(c.init_from, state, model_cfg), stage_iter(0), stage_iter.workers
    log(f"[train] resumed from step {start} (stage {stage_at(c, start)})")
    return (start, *restored)


class Preemption:
    """When to stop for a preemption notice. One process handles SIGTERM itself; under
    ``jax.distributed``, JAX's preemption service owns SIGTERM and every host agrees on the step
    (``Checkpointer.reached_preemption``), so all of them save the same checkpoint."""

    def __init__(self, ckpt):
        self.ckpt, self.stopped = ckpt, False
        self.agreed = jax.process_count() > 1
        self._flag = False
        # Signal handlers can only be installed from the main thread (not e.g. a test runner thread).
        self._prev = (signal.signal(signal.SIGTERM, lambda *_: setattr(self, "_flag", True))
                      if not self.agreed and _in_main_thread() else None)

    def reached(self, step: int) -> bool:
        """Call at every step on every host."""
        hit = self.ckpt.reached_preemption(step) if self.agreed else self._flag
        self.stopped = self.stopped or hit
        return hit

    def close(self):
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)


def train(c, workdir: str | os.PathLike, *, stop_after: Optional[int] = None) -> dict:
    """Run (or resume) training; returns ``summary.json``'s content plus ``history`` (this run's logged
    metrics, as in ``metrics.jsonl``). ``stop_after``: return early after that many steps (tests).

    ``workdir`` may be local or any ``etils.epath`` scheme (``gs://bucket/run``): checkpoints,
    metrics, TensorBoard events, ``config.json`` and ``summary.json`` all go there."""
    workdir = storage.path(workdir)
    started, startup_s = time.perf_counter(), None
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    manifest = records.read_manifest(c.data.dir) if c.data.dir else {}
    num_obj_classes, num_ocr_classes = validate_config(c, jax.device_count(), manifest)
    loss_cfg = loss_config(c)
    source = _open_data(c, is_main)
    damaged_shards = source.skipped
    mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, axis_type=c.mesh.axis_type, dcn_data=c.mesh.dcn_data)
    model_cfg = build_model_config(c)
    total_steps = int(stage_bounds(c)[-1])
    if is_main:
        storage.write_text_atomic(workdir / "config.json", c.to_json_best_effort(indent=2))
        print(f"[train] {jax.process_count()} process(es), {jax.device_count()} devices, mesh {dict(mesh.shape)}; "
              f"K={num_obj_classes} V={num_ocr_classes}; {total_steps} steps", flush=True)

    # ---- Model, centres, optimiser (sharded at creation) --------------------------
    init_centers = np.load(loss_cfg.init_centers) if loss_cfg.init_centers else None
    state, setup = init_state(c, mesh, model_cfg, num_obj_classes, num_ocr_classes, init_centers)
    train_step, batch_sh = make_train_step(c, setup)
    ckpt = checkpoint.Checkpointer(workdir, every=c.checkpoint_every, keep=c.keep_checkpoints,
                                   async_save=c.async_checkpointing)
    # What a reader of the checkpoint needs: region_layers is 0 when the loss never ran region tokens.
    meta_base = {"backbone": dataclasses.asdict(model_cfg.backbone), "num_obj_classes": num_obj_classes,
                 "num_ocr_classes": num_ocr_classes, "uses_regions": loss_cfg.uses_regions,
                 "region_layers": model_cfg.region_layers if loss_cfg.uses_regions else 0,
                 "region_rope": model_cfg.region_rope, "region_seed": model_cfg.region_seed}

    tokenizer = tokenizer_for_dataset(c.data.dir, manifest)
    stage_iter = make_stage_iter(c, tokenizer, source)
    log = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)
    start, state, data_iter, data_workers = restore_or_init(c, ckpt, setup, state, model_cfg, stage_iter, log)
    stage = stage_at(c, start)
    preemption = Preemption(ckpt)

    # ---- Loop ---------------------------------------------------------------------
    peak = c.peak_flops or perf.peak_flops(dtype=c.model.dtype)
    writer = MetricWriter(workdir, is_main)
    flops_per_step = None
    bar = None
    if is_main and c.progress_bar:
        from tqdm import tqdm  # as tensorboardX above: the planner imports this module without it

        bar = tqdm(total=total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    history = []
    step = start
    last = time.perf_counter()
    steps_this_run = 0
    data_wait = 0.0                  # seconds spent in next(data_iter) since the last log line
    skipped_shard_records = float(sum(s.expected for s in damaged_shards))
    compiled = None  # one ahead-of-time compile per stage (image size)
    while step < total_steps:
        if stage_at(c, step) != stage:
            stage, data_iter, compiled = stage_at(c, step), stage_iter(stage_at(c, step)), None
            data_workers = stage_iter.workers
        t0 = time.perf_counter()
        local = next(data_iter)
        batch = to_global_batch(local, batch_sh)
        data_wait += time.perf_counter() - t0
        if compiled is None:
            compiled = compile_step(train_step, state, batch)
            flops_per_step = perf.model_flops(c, setup.num_obj_classes, setup.num_ocr_classes, c.batch_size,
                                         tuple(batch["image"].shape[1:3]))
        state, metrics = compiled(state, batch)
        step += 1
        steps_this_run += 1
        if started is not None:   # once: start-up = shard checks, restore, first batch, compile, one step
            jax.block_until_ready(metrics)
            startup_s = time.perf_counter() - started
            if is_main:
                print(f"[train] first step done {startup_s:.1f} s after start", flush=True)
            started = None
        if step % c.log_every == 0 or step == total_steps:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            dt = (now - last) / max(steps_this_run, 1)
            # The share of the interval the loop spent waiting for batches (every step's wait, not the
            # last one's): 0 when the input pipeline keeps ahead of the step.
            m.update(images_per_s=c.batch_size / dt, step_time_s=dt,
                     data_wait_fraction=data_wait / max(now - last, 1e-9),
                     mfu=perf.mfu(flops_per_step, dt, peak),
                     skipped_updates_total=float(state["skipped_updates"]), stage=stage)
            if damaged_shards:
                m.update(skipped_shards=float(len(damaged_shards)), skipped_shard_records=skipped_shard_records)
            writer.write(step, m)
            history.append({"step": step, **m})
            if bar is not None:
                bar.set_postfix(loss=f"{m['loss']:.3f}", img_s=f"{m['images_per_s']:.0f}")
            last, steps_this_run, data_wait = now, 0, 0.0
        if bar is not None:
            bar.update(1)
        preempt = preemption.reached(step)
        meta = dict(meta_base, stage=stage, step=step, data_workers=data_workers)
        if ckpt.save(step, state, data_iter, meta, force=(step == total_steps or preempt)):
            writer.sync()
        if preempt:
            ckpt.wait()
            print(f"\n[train] process {jax.process_index()}: preemption (SIGTERM): checkpoint written at step {step}; "
                  "exiting", flush=True)
            break
        if stop_after is not None and step - start >= stop_after:
            break
    ckpt.close()
    writer.close()
    if bar is not None:
        bar.close()
    preemption.close()
    # summary.json is the run's outcome; the per-step metrics live once, in metrics.jsonl.
    summary = {"start_step": start, "end_step": step, "last_metrics": history[-1] if history else None,
               "metrics_file": "metrics.jsonl", "startup_s": startup_s, "peak_flops_per_device": peak, "flops_per_step": flops_per_step,
               "preempted": preemption.stopped, "skipped_shards": [s.path for s in damaged_shards]}
    if is_main:
        storage.write_text_atomic(workdir / "summary.json", json.dumps(summary, indent=2))
    return dict(summary, history=history)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    distributed.join(distributed.absl_args())
    train(cli.absl_config("config"), flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.define_config_flag()
    flags.DEFINE_string("workdir", None, "checkpoints, metrics and logs go here")
    distributed.define_absl_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run_absl(main)
