"""Orbax checkpoints: train state (params, optimiser, step, RNG) + Grain iterator + metadata, together.

One :class:`Checkpointer` per run. Saves are async and policy driven (every n
steps, keep k); ``force=True`` for the final / preemption save. Restore takes
an abstract target carrying the *current* shardings, so a checkpoint written
on one mesh restores onto another (e.g. 8 -> 4 devices).
"""
from __future__ import annotations

import datetime
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from rice_jax import distributed, errors, storage
from rice_jax.sharding import path_to_str as sharding_path

CKPT_SUBDIR = "checkpoints"
DAMAGED_SUBDIR = "damaged_checkpoints"   # beside CKPT_SUBDIR: unreadable checkpoints are moved here, never deleted
BACKBONE = ("params", "model", "backbone")


class CheckpointDamaged(errors.UserError, RuntimeError):
    """A checkpoint that cannot be read; the message names the step, its folder and the first error line."""


class CheckpointIncompatible(errors.InputError):
    """A readable checkpoint whose arrays do not fit this run's state (another config): never "damaged"."""


def _manager(directory, *, every: int = 1, keep: Optional[int] = None, async_save: bool = True,
             read_only: bool = False):
    import grain

    return ocp.CheckpointManager(
        storage.path(directory),
        options=ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                             enable_async_checkpointing=async_save, read_only=read_only,
                                             create=not read_only),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})


class Checkpointer:
    """Saves and restores one run's checkpoints (``WORKDIR/checkpoints``); any ``etils.epath`` scheme."""

    def __init__(self, workdir: storage.PathLike, *, every: int, keep: int, async_save: bool = True):
        self.workdir = storage.path(workdir)
        self.directory = self.workdir / CKPT_SUBDIR
        self.mngr = _manager(self.directory, every=every, keep=keep, async_save=async_save)

    def latest_step(self) -> Optional[int]:
        return self.mngr.latest_step()

    def reached_preemption(self, step: int) -> bool:
        """Whether every host has agreed to stop and save at ``step`` (JAX's preemption sync, via Orbax).

        Under ``jax.distributed`` a SIGTERM to any one host is propagated through the coordination
        service; all hosts return True at the same step (the largest step any host had reached, + 1),
        so they write the same checkpoint. Without a distributed runtime this is always False and the
        caller's own signal handler decides. Must be called at every step by every host."""
        return self.mngr.reached_preemption(step)

    def save(self, step: int, state, data_iter, meta: dict, *, force: bool = False) -> bool:
        import grain

        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.mngr.save(step, args=ocp.args.Composite(**items), force=force)

    def restore_meta(self, step: int) -> dict:
        return self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def check_layout(self, step: int, abstract_state) -> None:
        """Raise :class:`CheckpointIncompatible` if the saved state's tree or shapes differ from
        ``abstract_state`` (e.g. the config changed K or the backbone). Shardings may differ."""
        saved = self.mngr.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)
        want = {sharding_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract_state)}
        have = {sharding_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(saved)}
        diff = [f"{k}: saved {have.get(k)}, this run {want.get(k)}" for k in sorted(set(want) | set(have))
                if have.get(k) != want.get(k)]
        if diff:
            raise CheckpointIncompatible(
                f"checkpoint step {step} ({self.directory / str(step)}) does not fit this run's state "
                f"({len(diff)} arrays differ, e.g. {diff[0]}): resume with the config it was written with, "
                "or start in a new workdir (init_from=ckpt:... takes its backbone)")

    def restore(self, step: int, abstract_state, data_iter=None):
        """State onto the shardings of ``abstract_state``; the iterator (if given) in place."""
        import grain

        self.check_layout(step, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.mngr.restore(step, args=ocp.args.Composite(**items))["state"]

    def restore_newest_intact(self, restore_fn: Callable[[int], Any], *, strict: bool = False,
                              log: Callable[[str], None] = print) -> tuple[Optional[int], Any]:
        """``(step, restore_fn(step))`` for the newest checkpoint that reads back, ``(None, None)`` if none.

        A checkpoint that fails to restore on any host (truncated array file, partial copy from a
        bucket, missing metadata) is reported by step and folder, moved to ``WORKDIR/damaged_checkpoints``
        (kept for inspection, never deleted) and the next older one is tried: a run loses the steps
        since that checkpoint, not the run. ``strict=True`` raises :class:`CheckpointDamaged` instead.
        All hosts take the same decision (the outcome is agreed by an all-gather)."""
        for step in sorted(self.mngr.all_steps(), reverse=True):
            err = None
            try:
                result = restore_fn(step)
            except CheckpointIncompatible:
                raise  # a config change, not damage: never move a good checkpoint aside
            except Exception as e:  # noqa: BLE001 - any read failure makes this checkpoint unusable
                err, result = e, None
            if distributed.all_true(err is None):
                return step, result
            folder = self.directory / str(step)
            what = errors.first_line(err, 400) if err is not None else "another host could not read it"
            if strict:
                raise CheckpointDamaged(f"checkpoint step {step} ({folder}) cannot be read: {what}; rerun with "
                                        "--config.strict_restore=False to fall back to the newest intact one")
            moved = self._move_aside(step)
            log(f"[checkpoint] WARNING: checkpoint step {step} ({folder}) cannot be read: {what}. "
                f"Moved to {moved}; trying the next older checkpoint.")
        return None, None

    def _move_aside(self, step: int):
        dst = self.workdir / DAMAGED_SUBDIR / f"{step}-{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%S}"
        if jax.process_index() == 0:
            dst.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(dst)
        distributed.barrier(f"rice_jax_move_aside_{step}")
        self.mngr.reload()
        return dst

    def wait(self):
        self.mngr.wait_until_finished()

    def close(self):
        self.mngr.wait_until_finished()
        self.mngr.close()


def _find_dir(path: storage.PathLike):
    path = storage.path(path)
    if (path / CKPT_SUBDIR).is_dir():
        return path / CKPT_SUBDIR
    return path


def _open_read_only(path: storage.PathLike, step: Optional[int]):
    """(read-only manager, step, meta) of the checkpoint at ``step`` (default: the latest)."""
    from absl import logging as absl_logging

    # Orbax warns at every read-only open that a read-only manager does not save: true, and noise.
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        mngr = _manager(_find_dir(path), read_only=True, async_save=False)
    finally:
        absl_logging.set_verbosity(level)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise errors.MissingInput(f"{path}: no checkpoint found (expected {path}/{CKPT_SUBDIR}/<step>)")
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return mngr, step, meta


def read_raw(path: storage.PathLike, step: Optional[int] = None) -> tuple[dict, dict, int]:
    """(whole state as a pytree on this host's first device, meta, step): for inspection and tests.

    Reads *everything* (centres and optimiser moments included) onto one device; code that needs
    only the backbone uses :func:`restore_subtree`, which reads nothing else."""
    mngr, step, meta = _open_read_only(path, step)
    meta_state = mngr.item_metadata(step)["state"]
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # any topology -> this host's first device
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta_state)
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    mngr.close()
    return state, meta, step


def _nest(keys: tuple[str, ...], leaf: Any) -> dict:
    for k in reversed(keys):
        leaf = {k: leaf}
    return leaf


def restore_subtree(path: storage.PathLike, abstract: Any, keys: tuple[str, ...] = BACKBONE,
                    step: Optional[int] = None) -> tuple[Any, dict, int]:
    """(the ``state[keys...]`` subtree, meta, step), read straight into ``abstract``'s shardings.

    Orbax partial restore: arrays outside the subtree (centre matrices, optimiser moments, the
    data iterator) are neither read from storage nor allocated. ``abstract`` is a pytree of
    ``jax.ShapeDtypeStruct`` with ``sharding`` (e.g. the live backbone's shardings), whose
    structure matches the saved subtree; dict keys are matched as strings (Orbax stores them so) and
    returned as ``abstract`` has them."""
    mngr, step, meta = _open_read_only(path, step)
    saved = mngr.item_metadata(step)["state"]
    sub = getattr(saved, "tree", saved)  # Orbax's TreeMetadata wraps the nested dict
    for k in keys:
        if not isinstance(sub, dict) or k not in sub:
            mngr.close()
            raise errors.InputError(f"{path}@{step}: checkpoint has no {'/'.join(keys)} (is it a rice_jax train checkpoint?)")
        sub = sub[k]
    target = _match_keys(abstract, sub, f"{path}@{step}", "")
    item = _nest(keys, target)
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    handler = ocp.PyTreeCheckpointHandler()
    ckpt = ocp.Checkpointer(handler)
    out = ckpt.restore(mngr.directory / str(step) / "state", args=args)
    ckpt.close()
    mngr.close()
    for k in keys:
        out = out[k]
    return _unmatch_keys(abstract, out), meta, step


def _match_keys(abstract: Any, saved: Any, where: str, path: str) -> Any:
    """``abstract`` re-keyed with the saved tree's (string) keys; shape mismatches and gaps named."""
    if isinstance(abstract, dict):
        if not isinstance(saved, dict):
            raise errors.InputError(f"{where}: expected a mapping at {path or '/'}")
        by_str = {str(k): k for k in saved}
        missing = [k for k in abstract if str(k) not in by_str]
        if missing:
            raise errors.InputError(f"{where}: checkpoint lacks {[f'{path}/{m}' for m in missing][:10]}")
        return {by_str[str(k)]: _match_keys(v, saved[by_str[str(k)]], where, f"{path}/{k}") for k, v in abstract.items()}
    if tuple(saved.shape) != tuple(abstract.shape):
        raise errors.InputError(f"{where}: {path} has shape {tuple(saved.shape)}, model expects {tuple(abstract.shape)}")
    return abstract


def _unmatch_keys(abstract: Any, restored: Any) -> Any:
    """The restored subtree with ``abstract``'s own key types back (int layer indices, etc.)."""
    if isinstance(abstract, dict):
        by_str = {str(k): v for k, v in restored.items()}
        return {k: _unmatch_keys(v, by_str[str(k)]) for k, v in abstract.items()}
    return restored


def read_meta(path: storage.PathLike, step: Optional[int] = None) -> dict:
    """The JSON metadata of a checkpoint (backbone config, K, V, objective, region layers), no arrays."""
    mngr, _, meta = _open_read_only(path, step)
    mngr.close()
    return meta


def load_into(abstract_pure: dict, restored: Any, where: str) -> dict:
    """Fill a pure-dict parameter tree from a restored tree whose dict keys may have become strings."""
    def walk(a, r, path):
        if isinstance(a, dict):
            if not isinstance(r, dict):
                raise errors.InputError(f"{where}: expected a mapping at {path or '/'}")
            rk = {str(k): v for k, v in r.items()}
            missing = [k for k in a if str(k) not in rk]
            if missing:
                raise errors.InputError(f"{where}: checkpoint lacks {[f'{path}/{m}' for m in missing][:10]}")
            return {k: walk(v, rk[str(k)], f"{path}/{k}") for k, v in a.items()}
        arr = np.asarray(r)
        if tuple(arr.shape) != tuple(a.shape):
            raise errors.InputError(f"{where}: {path} has shape {arr.shape}, model expects {tuple(a.shape)}")
        return arr.astype(a.dtype)
    return walk(abstract_pure, restored, "")
