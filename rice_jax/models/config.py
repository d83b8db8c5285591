"""Backbone configuration: the MLCD/RICE ViT sizes, and conversion to/from HF.

Architecture fields mirror ``transformers.MLCDVisionConfig`` so a checkpoint
round-trips; the runtime fields (compute dtype, remat, attention path) are
ours and are not written to an HF ``config.json``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from rice_jax import errors

REMAT_POLICIES = (
    "none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
    "everything_saveable",
)
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")
# ViTConfig fields that are ours and not part of a checkpoint: a config may set them on any preset.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat_policy", "attention_impl")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    patch_size: int = 16
    # Nominal pretraining resolution. The model runs on any H x W that is a
    # multiple of patch_size: 2D RoPE has no size-dependent parameters.
    image_size: int = 224
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    # Runtime options (not part of the checkpoint).
    dtype: str = "float32"          # compute dtype, e.g. "bfloat16"
    param_dtype: str = "float32"
    remat_policy: str = "none"      # name of a jax.checkpoint_policies entry, or "none"
    attention_impl: str = "auto"    # "auto" picks the fastest correct path per backend

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise errors.InputError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise errors.InputError(f"head_dim {self.head_dim} must be a multiple of 4 for the 2D rotary embedding")
        if self.remat_policy not in REMAT_POLICIES:
            raise errors.InputError(f"remat_policy {self.remat_policy!r} not in {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise errors.InputError(f"attention_impl {self.attention_impl!r} not in {ATTENTION_IMPLS}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **kw) -> "ViTConfig":
        return dataclasses.replace(self, **kw)

    # ---- Hugging Face conversion -------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """Fields of an HF ``MLCDVisionConfig`` (``config.json``)."""
        return {
            "architectures": ["MLCDVisionModel"],
            "model_type": "mlcd_vision_model",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_groups": 1,
            "num_channels": self.num_channels,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_act": "gelu",
            "layer_norm_eps": self.layer_norm_eps,
            "attention_dropout": 0.0,
            "initializer_range": self.initializer_range,
            "initializer_factor": self.initializer_factor,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "axial"},
            "dtype": "float32",
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **runtime) -> "ViTConfig":
        if "vision_config" in d:  # a composite (e.g. CLIP-style) config wrapping the vision tower
            d = d["vision_config"]
        act = d.get("hidden_act", "gelu")
        if act != "gelu":
            raise errors.InputError(f"hidden_act {act!r} unsupported: MLCD uses exact 'gelu'")
        if d.get("num_key_value_groups", 1) != 1:
            raise errors.InputError("num_key_value_groups != 1 is not used by MLCD/RICE checkpoints")
        rope = d.get("rope_parameters") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        image_size = d.get("image_size", 224)
        patch = d.get("patch_size", 14)
        if isinstance(image_size, (list, tuple)):
            image_size = image_size[0]
        if isinstance(patch, (list, tuple)):
            if patch[0] != patch[1]:
                raise errors.InputError(f"non-square patches {patch} unsupported")
            patch = patch[0]
        return cls(
            hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
            patch_size=patch, image_size=image_size, num_channels=d.get("num_channels", 3),
            layer_norm_eps=d.get("layer_norm_eps", 1e-5), rope_theta=float(theta),
            initializer_range=d.get("initializer_range", 0.02),
            initializer_factor=d.get("initializer_factor", 1.0), **runtime,
        )

    @classmethod
    def from_hf(cls, hf_config, **runtime) -> "ViTConfig":
        """From a ``transformers.MLCDVisionConfig`` object."""
        return cls.from_hf_dict(hf_config.to_dict(), **runtime)

    def to_hf(self):
        from transformers import MLCDVisionConfig  # dev/export dependency only
        d = {k: v for k, v in self.to_hf_dict().items() if k not in ("architectures", "model_type", "dtype")}
        return MLCDVisionConfig(**d)


_L = dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, patch_size=14)
PRESETS: dict[str, ViTConfig] = {
    # Released/described MLCD & RICE sizes.
    "vit_b16_224": ViTConfig(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
                             patch_size=16, image_size=224),
    "vit_l14_336": ViTConfig(**_L, image_size=336),
    "vit_l14_560": ViTConfig(**_L, image_size=560),  # DeepGlint-AI/rice-vit-large-patch14-560
    "vit_bigg14_448": ViTConfig(hidden_size=1664, intermediate_size=8192, num_layers=48, num_heads=16,
                                patch_size=14, image_size=448),
    # CPU-sized models for tests and the quickstart.
    "vit_tiny": ViTConfig(hidden_size=64, intermediate_size=256, num_layers=4, num_heads=4,
                          patch_size=8, image_size=64),
    "vit_small": ViTConfig(hidden_size=192, intermediate_size=768, num_layers=6, num_heads=3,
                           patch_size=16, image_size=128),
}


def get_preset(name: str, **overrides) -> ViTConfig:
    if name not in PRESETS:
        raise errors.InputError(f"unknown backbone preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
