"""Region mining throughput on this machine: images/s per proposer and for OCR, and the projected
cost of mining the paper's 400M images.

Inputs: crops of the photos scikit-learn ships (427 x 640, the size class of LAION/COYO images
after the paper's >= 336 px filter) with shapes and words drawn on them, and the quickstart's
synthetic images (96-128 px). SAM is timed with randomly initialised weights of the real
architectures (``SamConfig()`` = ViT-B image encoder at 1024 px): the compute does not depend on
the weights, and no download is allowed here. Thresholds are off for SAM so post-processing
sees every mask (its worst case).

    python -m benchmarks.mining            # a few minutes
    python -m benchmarks.mining --smoke
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from benchmarks.common import report

PAPER_IMAGES = 400e6


def _photo_images(n: int, size=(640, 427)) -> list[np.ndarray]:
    from PIL import Image, ImageDraw, ImageFont
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = Image.fromarray(photos[i % 2]).resize(size)
        d = ImageDraw.Draw(img)
        for _ in range(3):
            s = int(rng.integers(60, 160))
            x, y = int(rng.integers(0, size[0] - s)), int(rng.integers(0, size[1] - s))
            d.ellipse([x, y, x + s, y + s], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        d.text((20, 20), "region mining", font=ImageFont.load_default(size=36), fill=(10, 10, 10),
               stroke_width=3, stroke_fill=(250, 250, 250))
        out.append(np.asarray(img))
    return out


def _synthetic_images(n: int) -> list[np.ndarray]:
    from rice_jax.data import synthetic

    return [np.asarray(synthetic.render_image(np.random.default_rng([9, i]))[0]) for i in range(n)]


def _rate(fn, images) -> dict:
    fn(images[0])                                   # load / warm up outside the timing
    t = time.perf_counter()
    n_out = 0
    for im in images:
        out = fn(im)
        n_out += len(out[0]) if isinstance(out, tuple) else len(out)
    s = time.perf_counter() - t
    return {"images": len(images), "seconds": s, "images_per_s": len(images) / s,
            "regions_per_image": n_out / len(images)}


def _sam(tmp: str, points: int, smoke: bool):
    import torch
    from transformers import SamConfig, SamModel

    from rice_jax.data import proposals

    torch.manual_seed(0)
    cfg = SamConfig() if not smoke else SamConfig(vision_config=dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=256, output_channels=32, mlp_dim=64,
        window_size=4, global_attn_indexes=[1], num_pos_feats=16),
        prompt_encoder_config=dict(hidden_size=32, image_size=256, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32))
    SamModel(cfg).eval().save_pretrained(tmp)
    return proposals.parse(f"sam:{tmp},points={points},iou=0,stability=0")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    from rice_jax.data import coco, ocr, proposals

    n_photo, n_syn, n_sam = (2, 4, 1) if a.smoke else (12, 64, 2)
    photos, syn = _photo_images(n_photo), _synthetic_images(n_syn)
    rows = {}
    felz = proposals.parse("felzenszwalb")
    rows["felzenszwalb_photo"] = _rate(felz, photos)
    rows["felzenszwalb_synthetic"] = _rate(felz, syn)
    engine = ocr.parse("rapidocr")
    stats = coco.ImportStats()
    rows["rapidocr_photo"] = _rate(lambda im: engine(im, "x", stats), photos)
    rows["rapidocr_synthetic"] = _rate(lambda im: engine(im, "x", stats), syn)
    with tempfile.TemporaryDirectory() as tmp:
        for pts in ((16,) if a.smoke else (16, 32)):  # smoke: the plumbing once
            rows[f"sam_vit_b_points{pts}_photo"] = _rate(_sam(tmp, pts, a.smoke), photos[:n_sam])
    for k, v in rows.items():
        print(f"[mining bench] {k}: {v['images_per_s']:.3g} images/s ({v['regions_per_image']:.1f} regions/image)",
              flush=True)
    cores = os.cpu_count()
    # Projection: per-image seconds measured here (all cores of this machine) x 400M images,
    # expressed in core-hours so it scales to any CPU fleet.
    per_core_h = {k: PAPER_IMAGES / v["images_per_s"] * cores / 3600 for k, v in rows.items() if "photo" in k}
    projection = {
        "paper_images": PAPER_IMAGES, "cores_here": cores,
        "core_hours": per_core_h,
        "felzenszwalb_plus_rapidocr_core_hours": per_core_h["felzenszwalb_photo"] + per_core_h["rapidocr_photo"],
        "assumption": f"the throughput measured here on {cores} CPU cores scales linearly with cores (units are "
                      "independent; no shared state); images of the photos' size (427 x 640)",
    }
    return report("mining" if not a.smoke else "mining_smoke",
                  {"methods": rows, "projection": projection, "sam_weights": "random (architecture cost only)"},
                  write=not a.smoke)


if __name__ == "__main__":
    main()
