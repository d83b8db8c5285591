"""The one way to name and load a pretrained backbone: ``hf:DIR``, ``ckpt:DIR`` or ``hub:ID``.

Training (``init_from``), clustering (``--extractor``), evaluation and export all
take the same spec string:

- ``hf:DIR``   a Hugging Face ``MLCDVisionModel`` folder (local or any epath scheme); a CLIP or
  SigLIP folder (``config.json``'s ``model_type``) gives that teacher tower in JAX
  (:mod:`rice_jax.models.teachers`, for clustering: it is no RICE backbone to train or export);
- ``ckpt:DIR`` a rice_jax training workdir or checkpoint folder: only the backbone
  subtree is read (Orbax partial restore), never the centres or optimiser state;
- ``hub:ID``   a hub model id, downloaded first — the only network access in the
  project, and only when a user writes it.
"""
from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from rice_jax import checkpoint, errors
from rice_jax.models import hf
from rice_jax.models.config import ViTConfig
from rice_jax.models.vit import ViT

SCHEMES = ("hf", "ckpt", "hub")


def parse(spec: str) -> tuple[str, str]:
    """``"ckpt:/runs/a"`` -> ``("ckpt", "/runs/a")``; a one-line error for anything else."""
    scheme, sep, where = str(spec).partition(":")
    if not sep or scheme not in SCHEMES or not where:
        raise errors.InputError(f"backbone {spec!r}: use hf:DIR (Hugging Face MLCDVisionModel folder), ckpt:DIR "
                         "(rice_jax training run) or hub:ID (downloads)")
    return scheme, where


def load(spec: str, *, regions: bool = False, **runtime):
    """The ViT of ``spec`` on this host's first device. ``runtime``: ViT runtime options (dtype, ...).

    ``regions``: for a ``ckpt:`` run whose loss trained region tokens, the whole
    :class:`~rice_jax.models.rice.RICEModel` instead (backbone, region settings and region
    parameters as trained), so its region tokens can be read; anything else is the ViT."""
    scheme, where = parse(spec)
    if scheme == "ckpt":
        if regions and checkpoint.read_meta(where).get("region_layers", 0):
            return load_checkpoint_rice(where, **runtime)
        return load_checkpoint_backbone(where, **runtime)
    return hf.load_hf(where, from_hub=scheme == "hub", **runtime)


def region_config(meta: dict, backbone: ViTConfig):
    """The region settings a checkpoint's metadata records, as a model config (training heads off:
    readers take the post-LN region tokens). Checkpoints from before ``region_rope`` /
    ``region_seed`` existed ran the paper's design, which is each setting's default."""
    from rice_jax.models.rice import RICEConfig

    return RICEConfig(backbone=backbone, region_layers=int(meta["region_layers"]),
                      region_rope=meta.get("region_rope", "class"), region_seed=meta.get("region_seed", "class"))


def load_checkpoint_rice(path, step=None, **runtime):
    """The RICE model of a training checkpoint that ran region tokens: its backbone plus the region
    parameters (``region_seed``) read by partial restore; the training head and centres are not read."""
    from rice_jax.models.rice import RICEModel

    meta = checkpoint.read_meta(path, step)
    if not meta.get("region_layers", 0):
        raise errors.InputError(f"{path}: this run trained no region tokens (region_layers 0); load its backbone")
    vit = load_checkpoint_backbone(path, step, **runtime)
    model = RICEModel(region_config(meta, vit.cfg), rngs=nnx.Rngs(0), backbone=vit)
    if model.region_seed is not None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        state = nnx.state(model.region_seed)
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), nnx.to_pure_dict(state))
        restored, _, _ = checkpoint.restore_subtree(path, target, keys=("params", "model", "region_seed"), step=step)
        nnx.replace_by_pure_dict(state, restored)
        nnx.update(model.region_seed, state)
    return model


def load_params_into(spec: str, target: Any) -> Any:
    """Backbone parameters of ``spec`` as a pure dict shaped and sharded like ``target`` (live arrays).

    ``ckpt:`` restores straight into ``target``'s shardings (FSDP included) without reading
    anything else; ``hf:``/``hub:`` weights are read on the host and placed shard by shard."""
    scheme, where = parse(spec)
    if scheme == "ckpt":
        abstract = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=t.sharding), target)
        restored, _, _ = checkpoint.restore_subtree(where, abstract)
        return restored
    src = nnx.to_pure_dict(nnx.state(load(spec)))
    loaded = checkpoint.load_into(jax.tree.map(lambda x: x, target), src, spec)
    return jax.tree.map(lambda t, v: jax.make_array_from_callback(t.shape, t.sharding, lambda idx: v[idx]),
                        target, loaded)


def load_checkpoint_backbone(path, step=None, **runtime) -> ViT:
    """The ViT backbone of a rice_jax training checkpoint (params only, nothing else is read)."""
    meta = checkpoint.read_meta(path, step)
    cfg = ViTConfig(**{**meta["backbone"], **runtime})
    vit = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))
    gdef, abstract = nnx.split(vit)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    pure = nnx.to_pure_dict(abstract)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), pure)
    restored, _, _ = checkpoint.restore_subtree(path, target, step=step)
    nnx.replace_by_pure_dict(abstract, restored)
    return nnx.merge(gdef, abstract)
