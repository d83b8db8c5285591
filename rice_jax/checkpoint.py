"""Orbax checkpoints: train state (params, optimiser, step, RNG) + Grain iterator + metadata, together.

One :class:`Checkpointer` per run. Saves are async and policy driven (every n
steps, keep k); ``force=True`` for the final / preemption save. Restore takes
an abstract target carrying the *current* shardings, so a checkpoint written
on one mesh restores onto another (e.g. 8 -> 4 devices).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

CKPT_SUBDIR = "checkpoints"


def _manager(directory, *, every: int = 1, keep: Optional[int] = None, async_save: bool = True,
             read_only: bool = False):
    import grain

    return ocp.CheckpointManager(
        Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                             enable_async_checkpointing=async_save, read_only=read_only,
                                             create=not read_only),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})


class Checkpointer:
    def __init__(self, workdir: str | os.PathLike, *, every: int, keep: int, async_save: bool = True):
        self.directory = Path(workdir) / CKPT_SUBDIR
        self.mngr = _manager(self.directory, every=every, keep=keep, async_save=async_save)

    def latest_step(self) -> Optional[int]:
        return self.mngr.latest_step()

    def save(self, step: int, state, data_iter, meta: dict, *, force: bool = False) -> bool:
        import grain

        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.mngr.save(step, args=ocp.args.Composite(**items), force=force)

    def restore_meta(self, step: int) -> dict:
        return self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state, data_iter=None):
        """State onto the shardings of ``abstract_state``; the iterator (if given) in place."""
        import grain

        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.mngr.restore(step, args=ocp.args.Composite(**items))["state"]

    def wait(self):
        self.mngr.wait_until_finished()

    def close(self):
        self.mngr.wait_until_finished()
        self.mngr.close()


def _find_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if (path / CKPT_SUBDIR).is_dir():
        return path / CKPT_SUBDIR
    return path


def _open_read_only(path: str | os.PathLike, step: Optional[int]):
    """(read-only manager, step, meta) of the checkpoint at ``step`` (default: the latest)."""
    mngr = _manager(_find_dir(path), read_only=True, async_save=False)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{path}: no checkpoint found")
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return mngr, step, meta


def read_raw(path: str | os.PathLike, step: Optional[int] = None) -> tuple[dict, dict, int]:
    """(state as numpy pytree, meta, step) of a checkpoint, without building anything."""
    mngr, step, meta = _open_read_only(path, step)
    meta_state = mngr.item_metadata(step)["state"]
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # any topology -> this host's first device
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta_state)
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    mngr.close()
    return state, meta, step


def read_meta(path: str | os.PathLike, step: Optional[int] = None) -> dict:
    """The JSON metadata of a checkpoint (backbone config, K, V, objective, region layers), no arrays."""
    mngr, _, meta = _open_read_only(path, step)
    mngr.close()
    return meta


def load_into(abstract_pure: dict, restored: Any, where: str) -> dict:
    """Fill a pure-dict parameter tree from a restored tree whose dict keys may have become strings."""
    def walk(a, r, path):
        if isinstance(a, dict):
            if not isinstance(r, dict):
                raise ValueError(f"{where}: expected a mapping at {path or '/'}")
            rk = {str(k): v for k, v in r.items()}
            missing = [k for k in a if str(k) not in rk]
            if missing:
                raise ValueError(f"{where}: checkpoint lacks {[f'{path}/{m}' for m in missing][:10]}")
            return {k: walk(v, rk[str(k)], f"{path}/{k}") for k, v in a.items()}
        arr = np.asarray(r)
        if tuple(arr.shape) != tuple(a.shape):
            raise ValueError(f"{where}: {path} has shape {arr.shape}, model expects {tuple(a.shape)}")
        return arr.astype(a.dtype)
    return walk(abstract_pure, restored, "")


def load_backbone(path: str | os.PathLike, step: Optional[int] = None, **runtime):
    """The ViT backbone of a training checkpoint (params only), e.g. for export or clustering."""
    from flax import nnx

    from rice_jax.models.config import ViTConfig
    from rice_jax.models.vit import ViT

    state, meta, step = read_raw(path, step)
    cfg = ViTConfig(**{**meta["backbone"], **runtime})
    vit = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))
    gdef, abstract = nnx.split(vit)
    pure = load_into(nnx.to_pure_dict(abstract), state["params"]["model"]["backbone"], f"{path}@{step}")
    nnx.replace_by_pure_dict(abstract, pure)
    return nnx.merge(gdef, abstract)


def dump_meta(meta: dict) -> dict:
    """JSON-safe copy of the metadata."""
    return json.loads(json.dumps(meta, default=str))
