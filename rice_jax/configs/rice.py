r"""RICE pretraining configs: ``--config rice_jax/configs/rice.py:VARIANT[,objective=mlcd][,runlocal]``.

    python -m rice_jax.train --config rice_jax/configs/rice.py:tiny --workdir /tmp/rice_tiny
    python -m rice_jax.train --config rice_jax/configs/rice.py:l14_336 --workdir gs://... \
        --config.init_from=hf:/ckpt/rice-vit-large-patch14-560 --config.optim.lr=1e-4

Variants: ``tiny`` (CPU, minutes), ``b16``, ``l14_336``, ``l14_560``. Arguments:
``objective=mlcd`` for the global-only ablation (same model and data, region
losses off, image-level multi-label cluster target instead); ``runlocal`` runs
the variant's real model, loss, optimiser, stages and mesh code for a few steps
on a CPU (big_vision's habit): batch, image size, step counts and depth are cut
to what two cores can do — width, heads, patch size, region layers, loss and
schedule shape are the variant's own.

``c.data`` is :class:`rice_jax.data.pipeline.PipelineConfig`'s fields, ``c.loss``
:class:`rice_jax.losses.LossConfig`'s, ``c.optim`` :class:`rice_jax.optim.OptimConfig`'s and
``c.model`` :func:`rice_jax.models.rice.settings_defaults` — built from those dataclasses,
so each field and its default exist in one place; this file only states where a
variant departs from them. The dict is locked: an unknown key or a value of the
wrong type fails at start-up; ``rice_jax.train.validate_config`` adds the
derived checks.
"""
import dataclasses

import ml_collections

from rice_jax import errors, losses, optim, sharding
from rice_jax.data import pipeline
from rice_jax.models import rice as rice_model

VARIANTS = ("tiny", "b16", "l14_336", "l14_560")


def _parse(arg):
    variant, objective, runlocal = "tiny", "rice", False
    for i, part in enumerate((arg or "tiny").split(",")):
        if "=" in part:
            k, v = part.split("=", 1)
            if k == "objective":
                objective = v
            elif k == "variant":
                variant = v
            else:
                raise errors.InputError(f"unknown config argument {k!r} (use variant=..., objective=..., runlocal)")
        elif part == "runlocal":
            runlocal = True
        elif i == 0:
            variant = part
        else:
            raise errors.InputError(f"cannot parse config argument {part!r}")
    if variant not in VARIANTS:
        raise errors.InputError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    if objective not in ("rice", "mlcd"):
        raise errors.InputError(f"objective must be 'rice' or 'mlcd', got {objective!r}")
    return variant, objective, runlocal


def _section(dataclass_type, exclude=(), **extra) -> ml_collections.ConfigDict:
    """A config section holding a dataclass's fields with their defaults (plus ``extra`` keys).

    A field that takes either of two types (``workers: int | str = "auto"``) gets an untyped entry:
    a ConfigDict entry otherwise keeps its default's type, so ``c.data.workers = 8`` would be refused
    (on the command line, ``--config.data.workers=8`` then arrives as the int 8)."""
    fields = {f.name: (ml_collections.FieldReference(f.default, field_type=object) if "|" in str(f.type) else f.default)
              for f in dataclasses.fields(dataclass_type) if f.name not in exclude}
    return ml_collections.ConfigDict({**extra, **fields})


def get_config(arg=None):
    variant, objective, runlocal = _parse(arg)
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.seed = 0
    c.init_from = ""             # "" | "hf:DIR" (local HF MLCDVisionModel) | "ckpt:DIR" (our checkpoint, params only)

    # ---- Data: PipelineConfig fields (+ dir); image size, batch and seed are set per stage --------
    c.data = _section(pipeline.PipelineConfig, exclude=pipeline.PER_STAGE_FIELDS, dir="")
    c.data.num_regions = 10      # N region tokens per image (paper: 10)
    c.data.max_labels = 10       # M token ids per OCR region (paper: 10)
    c.data.min_box_size = 8.0    # training drops boxes under 8 output px (the pipeline's generic default is 4)

    # ---- Model: RICEConfig fields, the backbone preset name and the ViT runtime fields -------------
    c.model = ml_collections.ConfigDict(rice_model.settings_defaults())
    c.model.backbone = "vit_b16_224"   # a rice_jax.models.config preset

    # ---- Objective: rice_jax.losses.LossConfig fields ------------------------------------
    c.loss = _section(losses.LossConfig)

    # ---- Optimiser: rice_jax.optim.OptimConfig fields -----------------------------------------
    c.optim = _section(optim.OptimConfig)

    # ---- Schedule --------------------------------------------------------------------
    c.batch_size = 32768               # global
    c.grad_accum_steps = 1             # microbatches per update: batch_size / grad_accum_steps rows in memory at once
    c.stages = ((400_000, 224),)       # resolution schedule: (steps, image_size) stages run in order

    # ---- Mesh and parameter layout ---------------------------------------------------------
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                   # -1 = all remaining devices
    c.mesh.fsdp = 1
    c.mesh.dcn_data = 1                # slices of a multi-slice job: the data axis spans them, fsdp stays inside one
    c.mesh.axis_type = "auto"          # "auto" or "explicit" (JAX sharding-in-types); same results
    # (regex on the parameter path, tactic) pairs, first match wins; tactics: class_parallel, fsdp,
    # replicate. A layout change is an edit here (or --config.sharding_rules=...).
    c.sharding_rules = sharding.DEFAULT_RULES

    # ---- Checkpoints and logging -----------------------------------------------------
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.strict_restore = False           # True: an unreadable newest checkpoint stops the run (else: older, loudly)
    c.async_checkpointing = True
    c.log_every = 10
    c.peak_flops = 0.0                 # per device, for MFU; 0 = measure a matmul at start-up
    c.progress_bar = True

    if variant == "tiny":
        # Retuned from measurements (README, "Why the first quickstart learned nothing"):
        # ~1800 steps x 32 images of the redesigned synthetic data fit the quickstart's five
        # minutes on 2 cores; lr 2e-3 beat 1e-3 there (oracle labels, held-out region probe
        # 0.50 vs 0.39), a warm-up of 100 steps.
        c.model.backbone = "vit_tiny"
        # Region tokens start from their box's RoIAlign samples: with the paper's class-state start a
        # 4-block, 64-wide ViT's region tokens never learn to read (OCR loss flat at ~6, word
        # classification 0.07 after 1,500 steps); from RoIAlign the OCR loss falls 6.9 -> 2.9 in
        # 3,000 steps and region tokens name held-out words at 0.83 (benchmarks/reading.py, docs/results.md).
        c.model.region_seed = "roi"
        c.data.num_regions = 6
        c.data.max_labels = 4
        c.batch_size = 32
        c.stages = ((1800, 64),)
        c.optim.lr = 2e-3
        c.optim.weight_decay = 0.05
        c.optim.warmup_steps = 100
        c.loss.sample_rate = 0.5
        c.loss.scale = 16.0            # few, easy classes: a smaller scale keeps early gradients useful
        c.loss.margin = 0.2
        c.checkpoint_every = 300
        c.log_every = 10
    elif variant == "b16":
        c.model.backbone = "vit_b16_224"
        # Sized with rice_jax.preflight.plan (README "Sizing for TPU slices"): at the paper's global batch of
        # 32K, K = 1M, bf16 with this remat policy fits a v5p-1024 slice (512 chips) at 224 px
        # (55 GiB of 95 per chip) and 512 px (64 GiB); 256 v5e chips do not fit it at all.
        c.model.dtype = "bfloat16"
        c.model.remat_policy = "dots_with_no_batch_dims_saveable"
        c.stages = ((400_000, 224), (30_000, 512))
    elif variant in ("l14_336", "l14_560"):
        c.model.backbone = "vit_l14_336" if variant == "l14_336" else "vit_l14_560"
        # Sized with rice_jax.preflight.plan: batch 32K, K = 1M on 512 v5p chips fits at 224 px (56 GiB),
        # 336 px (88 GiB) and 560 px (94.6 of 95 GiB: no headroom; prefer a larger slice there).
        c.model.dtype = "bfloat16"
        c.model.remat_policy = "dots_with_no_batch_dims_saveable"
        res = 336 if variant == "l14_336" else 560
        # Paper: ViT-L/14 at 224, then continued at higher resolution with lr / 10 (stage_lr_mults default).
        c.stages = ((400_000, 224), (30_000, res))

    if objective == "mlcd":  # no c.objective field: the loss weights are the one record of it
        c.loss.object_weight = 0.0
        c.loss.ocr_weight = 0.0
        c.loss.global_weight = 1.0

    c.runlocal = runlocal
    if runlocal:
        _shrink_for_cpu(c)
    c.lock()
    return c


def _shrink_for_cpu(c) -> None:
    """A few real steps of the variant on a CPU: every stage (each at 4 patches per side, so the
    resolution switch and its lr multiplier still happen), 8 images per step, fp32, the first
    ``region_layers + 2`` blocks of the backbone (the region blocks and plain blocks before them)."""
    patch = rice_model.get_preset(c.model.backbone).patch_size
    c.stages = tuple((3, patch * (4 + 2 * i)) for i in range(len(c.stages)))
    c.batch_size = 8
    c.optim.warmup_steps = 1
    c.model.dtype = "float32"          # XLA:CPU runs bf16 matmuls far slower than fp32
    c.model.num_layers = c.model.region_layers + 2
    c.checkpoint_every = 3
    c.log_every = 1
    c.progress_bar = False
