"""Shared test fixtures-as-functions: tiny random HF MLCD models saved locally."""
from __future__ import annotations

import numpy as np


def tiny_hf_config(**kw):
    from transformers import MLCDVisionConfig

    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                patch_size=14, image_size=56)
    base.update(kw)
    return MLCDVisionConfig(**base)


def save_random_hf_model(path, seed: int = 0, **kw):
    """A randomly initialised ``transformers.MLCDVisionModel`` saved to ``path``."""
    import torch
    from transformers import MLCDVisionModel

    torch.manual_seed(seed)
    model = MLCDVisionModel(tiny_hf_config(**kw)).eval()
    # HF initialises biases/LN to constants; randomise them so the mapping of
    # every tensor is actually tested.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(path))
    return model


def hf_forward(model, pixels_nhwc: np.ndarray):
    import torch

    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2))))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def synthetic_dataset(path, num_images: int, *, seed: int, num_shards: int, vocab_size: int, clusters: int = 0):
    """A synthetic region dataset with its OCR tokenizer (and cluster labels when ``clusters`` > 0)."""
    from rice_jax.labelling import clustering
    from rice_jax.data import synthetic, tokenizer

    synthetic.build(str(path), num_images, seed=seed, num_shards=num_shards)
    tokenizer.build_for_dataset(path, vocab_size=vocab_size)
    if clusters:
        clustering.run(path, clusters, chunk=256, log=lambda s: None)
    return path
