"""The one backbone spec grammar, and the loader of the JAX backbones it names.

Every command that takes a backbone (training's ``init_from``, clustering's ``--extractor``,
evaluation's and downstream's ``--backbone``, export's ``--from``) takes the same string, parsed
here and nowhere else (:func:`parse`):

- ``hf:DIR``   a Hugging Face ``MLCDVisionModel`` folder (local or any epath scheme); a CLIP or
  SigLIP folder (``config.json``'s ``model_type``) gives that teacher tower in JAX
  (:mod:`rice_jax.models.teachers`, for clustering: it is no RICE backbone to train or export);
- ``ckpt:DIR`` a rice_jax training workdir or checkpoint folder: only the backbone
  subtree is read (Orbax partial restore), never the centres or optimiser state;
- ``hub:ID``   a hub model id, downloaded first — the only network access in the
  project, and only when a user writes it;
- ``preset:NAME`` a fresh initialisation of a preset architecture (``models.config.PRESETS``);
- ``transformers:DIR`` any Hugging Face vision encoder run in PyTorch (DINOv2, SigLIP 2, ...):
  region features only (:class:`rice_jax.labelling.features.TransformersRegionFeatures`), no JAX
  model to train or export;
- ``regions:SPEC`` (``regions:ckpt:RUN``) the trained RICE model of a run whose loss trained region
  tokens, region parameters included: what a second labelling round reads. An error if it has none.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from rice_jax import checkpoint, errors
from rice_jax.models import hf
from rice_jax.models.config import ViTConfig, get_preset
from rice_jax.models.vit import ViT

SCHEMES = {
    "hf": "hf:DIR (Hugging Face MLCDVisionModel, CLIP or SigLIP folder)",
    "ckpt": "ckpt:DIR (rice_jax training run)",
    "hub": "hub:ID (downloads)",
    "preset": "preset:NAME (fresh initialisation)",
    "transformers": "transformers:DIR (any Hugging Face vision encoder, in PyTorch)",
}
JAX_SCHEMES = ("hf", "ckpt", "hub", "preset")   # what :func:`load` returns a JAX model for
REGIONS = "regions:"


@dataclasses.dataclass(frozen=True)
class Spec:
    """A parsed backbone spec. ``regions``: the ``regions:`` prefix (the run's region tokens, required)."""
    scheme: str
    where: str
    regions: bool = False

    def __str__(self) -> str:
        return f"{REGIONS if self.regions else ''}{self.scheme}:{self.where}"


def parse(spec: str, schemes=tuple(SCHEMES), *, what: str = "backbone", also: tuple[str, ...] = ()) -> Spec:
    """``"ckpt:/runs/a"`` -> ``Spec("ckpt", "/runs/a")``; a one-line error naming the forms ``schemes``
    allows (and the command's own words ``also``, e.g. clustering's ``handcrafted``) for anything else."""
    text = str(spec)
    regions = text.startswith(REGIONS)
    scheme, sep, where = text.removeprefix(REGIONS).partition(":")
    forms = ", ".join([*also, *(SCHEMES[s] for s in schemes)])
    if not sep or scheme not in schemes or not where:
        raise errors.InputError(f"{what} {text!r}: use {forms}")
    if regions and scheme != "ckpt":
        raise errors.InputError(f"{what} {text!r}: 'regions:' reads a training run's region tokens, so it takes "
                                "a run (regions:ckpt:RUN)")
    return Spec(scheme, where, regions)


def load(spec: str, *, regions: bool = False, seed: int = 0, **runtime):
    """The JAX model of ``spec`` on this host's first device. ``runtime``: ViT runtime options (dtype, ...);
    ``seed``: the initialisation of ``preset:NAME``.

    ``regions``: for a ``ckpt:`` run whose loss trained region tokens, the whole
    :class:`~rice_jax.models.rice.RICEModel` instead (backbone, region settings and region
    parameters as trained), so its region tokens can be read; anything else is the ViT. The
    ``regions:`` prefix asks for that model and is an error for a run without region tokens."""
    s = parse(spec, JAX_SCHEMES + ("transformers",))
    if s.scheme == "transformers":
        raise errors.InputError(f"backbone {spec!r}: a PyTorch encoder gives region features only (clustering "
                                "--extractor, downstream --backbone); here use one of "
                                + ", ".join(SCHEMES[k] for k in JAX_SCHEMES))
    if s.scheme == "preset":
        return ViT(get_preset(s.where, **runtime), rngs=nnx.Rngs(seed))
    if s.scheme == "ckpt":
        if s.regions or (regions and checkpoint.read_meta(s.where).get("region_layers", 0)):
            return load_checkpoint_rice(s.where, **runtime)
        return load_checkpoint_backbone(s.where, **runtime)
    return hf.load_hf(s.where, from_hub=s.scheme == "hub", **runtime)


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
    s = parse(spec, ("hf", "ckpt", "hub"), what="init_from")
    if s.scheme == "ckpt":
        abstract = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=t.sharding), target)
        restored, _, _ = checkpoint.restore_subtree(s.where, abstract)
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
