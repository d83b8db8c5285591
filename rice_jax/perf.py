"""The one definition of peak FLOP/s and MFU used by training metrics and benchmarks.

Peak = the best rate of a dense ``n x n`` matmul on one device of the current
backend, measured in the same process (5 repeats, best kept), in the model's
compute dtype. A datasheet number would flatter nobody on a CPU and would be
wrong under power caps; measuring it where the step runs makes an MFU in
``metrics.jsonl`` and one in a benchmark JSON the same quantity.
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp

from rice_jax import errors


def peak_flops(n: int = 2048, dtype: str = "float32", repeats: int = 5) -> float:
    """Best measured dense matmul rate of one device (FLOP/s)."""
    x = jnp.ones((n, n), jnp.dtype(dtype))
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def block_flops(tokens: int, hidden: int, intermediate: int) -> float:
    """Matmul FLOPs of one transformer block's forward over ``tokens``: q/k/v/out projections and
    the MLP, then q·k and p·v."""
    return 2 * tokens * hidden * (4 * hidden + 2 * intermediate) + 4 * tokens * tokens * hidden


def vision_forward_flops(cfg, image_hw: tuple[int, int], prefix_tokens: int = 1) -> float:
    """Matmul FLOPs of one image through a plain vision tower (a :class:`~rice_jax.models.config.ViTConfig`
    or a teacher's :class:`~rice_jax.models.teachers.TeacherConfig`) with ``prefix_tokens`` class
    tokens (MLCD, CLIP: 1; SigLIP: 0): patch embedding + every block; extraction projections use it."""
    p = cfg.patch_size
    patches = (image_hw[0] // p) * (image_hw[1] // p)
    return (2 * patches * p * p * cfg.num_channels * cfg.hidden_size
            + cfg.num_layers * block_flops(patches + prefix_tokens, cfg.hidden_size, cfg.intermediate_size))


def rice_train_flops(cfg, batch: int, image_hw: tuple[int, int], num_regions: int,
                     loss_terms: tuple[tuple[int, int], ...] = ()) -> float:
    """Model FLOPs of one RICE train step (forward + backward = 3x the forward's matmul FLOPs).

    The numerator of an MFU that means the same on every backend: XLA's ``cost_analysis`` leaves
    out the matmuls it hands to cuBLAS/cuDNN on GPU (an l14_336 step "cost" 4.5 TFLOP there, 8x
    under this count) and counts remat recomputation elsewhere, while this counts the model's own work once, as
    MaxText and the PaLM MFU definition do. ``cfg`` is a :class:`~rice_jax.models.rice.RICEConfig`;
    ``loss_terms`` are ``(rows per image, centre columns scored)`` per margin-softmax term (with
    PartialFC the columns are ⌈ρ·K⌉). Elementwise work (norms, GELU, softmax, RoPE) is left out.
    """
    v = cfg.backbone
    d, f, p = v.hidden_size, v.intermediate_size, v.patch_size
    gh, gw = image_hw[0] // p, image_hw[1] // p
    t = 1 + gh * gw
    block = lambda s: block_flops(s, d, f)
    k = cfg.region_layers if num_regions else 0
    fwd = 2 * (t - 1) * p * p * v.num_channels * d + (v.num_layers - k) * block(t) + k * block(t + num_regions)
    if k and getattr(cfg, "region_seed", "class") == "roi":   # the learned projection of the RoIAlign samples
        from rice_jax.models.rice import ROI_SEED_GRID

        fwd += 2 * num_regions * (ROI_SEED_GRID[0] * ROI_SEED_GRID[1] * d) * d
    e = cfg.embed_dim or d
    if e != d:
        fwd += 2 * (1 + num_regions) * d * e
    fwd += sum(2 * rows * e * cols for rows, cols in loss_terms)
    return 3.0 * batch * fwd


def machine_peak(per_device: float) -> float:
    """Peak of all devices together. CPU-emulated devices share the host's cores, so there the
    machine's peak is the one measurement, not ``n`` of them."""
    if jax.devices()[0].platform == "cpu":
        return per_device
    return per_device * jax.device_count()


def mfu(flops_per_step: float, step_time_s: float, peak_per_device: float) -> float:
    """Model FLOPs utilisation of a whole (all-device) step."""
    if not flops_per_step or step_time_s <= 0:
        return 0.0
    return flops_per_step / step_time_s / machine_peak(peak_per_device)


# Datasheet figures of accelerators a plan targets (``rice_jax.preflight.plan``), where nothing can be
# measured because the chip is not here: bf16 dense peak per chip (FLOP/s), HBM per chip (bytes)
# and the chips one host drives in a multi-host slice or node (the input pipeline's unit of demand,
# ``rice_jax.preflight.bench``). Sources: Google Cloud TPU system-architecture pages (v4, v5e, v5p, v6e
# Trillium, Ironwood tpu7x; multi-host slices use 4-chip hosts) and NVIDIA's H100 / H200 SXM
# datasheets (dense, no sparsity; 8 GPUs per HGX node).
CHIPS = {
    "v4": {"bf16_flops": 275e12, "hbm_bytes": 32 * 2**30, "chips_per_host": 4},
    "v5e": {"bf16_flops": 197e12, "hbm_bytes": 16 * 2**30, "chips_per_host": 4},
    "v5p": {"bf16_flops": 459e12, "hbm_bytes": 95 * 2**30, "chips_per_host": 4},
    "v6e": {"bf16_flops": 918e12, "hbm_bytes": 32 * 2**30, "chips_per_host": 4},
    "tpu7x": {"bf16_flops": 2307e12, "hbm_bytes": 192 * 2**30, "chips_per_host": 4},
    "h100": {"bf16_flops": 989e12, "hbm_bytes": 80 * 2**30, "chips_per_host": 8},
    "h200": {"bf16_flops": 989e12, "hbm_bytes": 141 * 2**30, "chips_per_host": 8},
}


def chip(name: str) -> dict:
    """Datasheet figures of a target chip (``v5p``, ``v5e``, ... or ``h100``); a clear error otherwise."""
    key = name.lower().split(":")[0]
    if key not in CHIPS:
        raise errors.InputError(f"unknown chip {name!r}: known {sorted(CHIPS)}")
    return CHIPS[key]


# ----------------------------------------------------------------------------- a training config's cost
CLIP_VOCAB = 49408   # V when neither a flag nor the config sets it: a CLIP-sized BPE vocabulary


def ocr_classes(c, given: int = 0) -> int:
    """V for a projection: ``given`` (a flag), else the config's ``loss.num_ocr_classes``, else :data:`CLIP_VOCAB`."""
    return given or c.loss.num_ocr_classes or CLIP_VOCAB


def model_flops(c, num_obj_classes: int, num_ocr_classes: int, batch_size: int, image_hw: tuple[int, int]) -> float:
    """The MFU numerator of one step of training config ``c``: :func:`rice_train_flops` for its model
    and batch. Region tokens only when the loss uses them (the global-only objective runs the plain
    ViT); each margin-softmax term scores ⌈ρ·K⌉ centres per row (PartialFC), K of its own bank.
    Built from the config alone (no model, no compile): the trainer, the planner and the input
    bench all count with it."""
    from rice_jax.losses import LossConfig
    from rice_jax.models.rice import config_from_settings

    lc = LossConfig(**c.loss.to_dict())
    rho = min(float(lc.sample_rate), 1.0)
    regions = c.data.num_regions if lc.uses_regions else 0
    terms = []
    if lc.object_weight:
        terms.append((regions, math.ceil(rho * num_obj_classes)))
    if lc.ocr_weight:
        terms.append((regions, math.ceil(rho * num_ocr_classes)))
    if lc.global_weight:
        terms.append((1, math.ceil(rho * num_obj_classes)))
    return rice_train_flops(config_from_settings(c.model), batch_size, image_hw, regions, tuple(terms))


def project(c, num_obj_classes: int, num_ocr_classes: int, image_size: int, devices: int, peak_per_device: float,
            mfu: float) -> dict:
    """Step time and throughput at an assumed MFU: :func:`model_flops` (the numerator every MFU in
    this project uses) over ``devices x peak x mfu``. Not the compiler's FLOP count: that includes
    remat recomputation, and with gradient accumulation it counts one microbatch (the cost analysis
    sees a scan body once)."""
    model = model_flops(c, num_obj_classes, num_ocr_classes, c.batch_size, (image_size, image_size))
    step = model / (devices * peak_per_device * mfu)
    return {"mfu_assumed": mfu, "model_flops_per_step": model, "step_time_s": step, "images_per_s": c.batch_size / step}


def xla_cost_flops(compiled, num_devices: int | None = None) -> float:
    """XLA's own FLOP count of a compiled step, over ``num_devices`` (default: this process's
    devices; the planner passes its topology's): a diagnostic beside :func:`model_flops`. It counts
    remat recomputation and elementwise work, sees a scan body once, and on GPU misses the matmuls
    handed to cuBLAS/cuDNN, so it is not the MFU numerator."""
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        per_device = float(ca.get("flops", 0.0))  # the SPMD partition's
    except Exception:  # noqa: BLE001 - a diagnostic, never a reason to stop
        return 0.0
    return per_device * (num_devices or jax.device_count())
