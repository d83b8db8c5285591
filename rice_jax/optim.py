"""The optimiser of a training run: AdamW with per-stage warm-up + cosine schedules.

A training config's ``c.optim`` section is :class:`OptimConfig`'s fields; :func:`make_optimizer`
turns it and the resolution stages into an optax transformation (backbone and centre matrices
as two parameter groups, the centres at their own learning-rate multiple).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import optax

from rice_jax import errors, sharding


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    centers_lr_mult: float = 1.0      # separate learning rate for the centre matrices
    weight_decay: float = 0.2
    warmup_steps: int = 500           # per stage (capped at the stage's length)
    stage_lr_mults: tuple = ()        # peak lr multiplier per stage; () = 1, then 0.1 for each later stage (paper)
    b1: float = 0.9
    b2: float = 0.98
    grad_clip: float = 1.0            # global norm; 0 = off

    def __post_init__(self):
        if self.lr <= 0 or self.centers_lr_mult < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise errors.InputError(f"optim: lr must be > 0 and centers_lr_mult, weight_decay, grad_clip >= 0; got "
                                    f"{self.lr}, {self.centers_lr_mult}, {self.weight_decay}, {self.grad_clip}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise errors.InputError(f"optim.b1/b2 must be in [0, 1), got {self.b1}, {self.b2}")


def decay_mask(params) -> Any:
    """No weight decay on norms, biases and the class / rotary embeddings."""
    def keep(path, _):
        p = sharding.path_to_str(path)
        leaf = p.rsplit("/", 1)[-1]
        return not (leaf in ("scale", "bias", "class_embedding", "class_pos_emb") or leaf.endswith("_bias")
                    or "norm" in p)
    return jax.tree_util.tree_map_with_path(keep, params)


def stage_lr_multipliers(cfg: OptimConfig, stages: Sequence) -> tuple[float, ...]:
    """One learning-rate multiplier per stage: ``stage_lr_mults``, or the paper's default
    (1 for the first stage, 0.1 for every later, higher-resolution one)."""
    mults = tuple(float(m) for m in cfg.stage_lr_mults) or (1.0,) + (0.1,) * (len(stages) - 1)
    if len(mults) != len(stages):
        raise errors.InputError(f"config.optim.stage_lr_mults has {len(mults)} entries for {len(stages)} stages; "
                                "give one per stage or () for the paper's 1, 0.1, 0.1, ...")
    return mults


def make_schedule(cfg: OptimConfig, stages: Sequence):
    """Learning rate per global step: each ``(steps, image_size)`` stage runs its own warm-up + cosine
    decay, peaking at ``lr x stage multiplier`` (the paper continues at higher resolution with lr / 10,
    a fresh schedule)."""
    scheds, boundaries, start = [], [], 0
    for (steps, _), mult in zip(stages, stage_lr_multipliers(cfg, stages)):
        warmup = max(min(cfg.warmup_steps, steps - 1), 1)
        scheds.append(optax.warmup_cosine_decay_schedule(0.0, cfg.lr * mult, warmup, max(steps, warmup + 1),
                                                         end_value=0.0))
        boundaries.append(start)
        start += steps
    return optax.join_schedules(scheds, boundaries[1:])


def make_optimizer(cfg: OptimConfig, stages: Sequence):
    """``(optax transformation, schedule)``; parameters named ``centers_*`` form the centre group."""
    sched = make_schedule(cfg, stages)

    def adamw(mult):
        return optax.adamw(lambda s: sched(s) * mult, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                           mask=decay_mask)

    tx = optax.multi_transform({"backbone": adamw(1.0), "centers": adamw(cfg.centers_lr_mult)},
                               lambda params: {k: ("centers" if k.startswith("centers_") else "backbone") for k in params})
    if cfg.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx, sched
