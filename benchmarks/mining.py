"""Region mining throughput on this machine: images/s per proposer and for OCR, and the projected
cost of mining the paper's 400M images; and what the scale paths cost: a whole ``mine --tar
--preset paper`` run (tar streaming + decoding + records), indexing PaddleOCR results once (then
one seek per image), and the tokenizer trained on a sample of records. SAM is timed on the CPU
and, where torch sees one, on the GPU (the whole point grid in one decoder call, masks -> boxes
on the device).

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
import json
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


def _sam(tmp: str, points: int, smoke: bool, device: str = "cpu"):
    import torch
    from transformers import SamConfig, SamModel

    from rice_jax.mining import proposals

    torch.manual_seed(0)
    cfg = SamConfig() if not smoke else SamConfig(vision_config=dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=256, output_channels=32, mlp_dim=64,
        window_size=4, global_attn_indexes=[1], num_pos_feats=16),
        prompt_encoder_config=dict(hidden_size=32, image_size=256, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32))
    SamModel(cfg).eval().save_pretrained(tmp)
    return proposals.parse(f"sam:{tmp},points={points},iou=0,stability=0,device={device}")


def _end_to_end(tmp: str, photos: list[np.ndarray], workers: int) -> dict:
    """``mine --tar ... --preset paper`` over web-dataset tars of the photos (captions + json carried):
    tar streaming, decoding, Felzenszwalb + RapidOCR, record writing, in a pool of ``workers``."""
    import io
    import json
    import tarfile

    from PIL import Image

    from rice_jax.mining import mine

    per_tar = max(1, len(photos) // 2)
    for t in range(2):
        with tarfile.open(os.path.join(tmp, f"{t:05d}.tar"), "w") as tf:
            for i, im in enumerate(photos[t * per_tar:(t + 1) * per_tar]):
                buf = io.BytesIO()
                Image.fromarray(im).save(buf, format="JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("txt", b"a caption"),
                                  ("json", json.dumps({"url": "https://example.com/x.jpg", "width": 640}).encode())):
                    info = tarfile.TarInfo(f"{t}{i:04d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    t0 = time.perf_counter()
    m = mine.mine(os.path.join(tmp, "out"), tar=os.path.join(tmp, "*.tar"), workers=workers,
                  settings=mine.preset_settings("paper", proposals="felzenszwalb", ocr="rapidocr"), show_progress=False)
    s = time.perf_counter() - t0
    return {"images": m["num_images"], "seconds": s, "images_per_s": m["num_images"] / s, "workers": workers,
            "regions_per_image": (m["num_object_regions"] + m["num_text_regions"]) / max(1, m["num_images"]),
            "objects_per_image": m["num_object_regions"] / max(1, m["num_images"])}


def _paddle_index(tmp: str, lines: int) -> dict:
    """Index a PaddleOCR JSON-lines results file once, then look images up at random (one seek each)."""
    import json

    from rice_jax.data import coco
    from rice_jax.mining import ocr

    path = os.path.join(tmp, "ocr.jsonl")
    with open(path, "w") as f:
        for i in range(lines):
            f.write(json.dumps({"input_path": f"/data/{i:09d}.jpg", "rec_texts": ["word", "two"],
                                "rec_scores": [0.9, 0.8], "rec_polys": [[[1, 1], [9, 1], [9, 5], [1, 5]]] * 2}) + "\n")
    t0 = time.perf_counter()
    eng = ocr.PaddleResults(path, index_dir=os.path.join(tmp, "idx")).prepare()
    index_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    keys = [f"{i:09d}.jpg" for i in rng.integers(0, lines, 2000)]
    stats, img = coco.ImportStats(), np.zeros((8, 8, 3), np.uint8)
    t0 = time.perf_counter()
    for k in keys:
        eng(img, k, stats)
    look_s = time.perf_counter() - t0
    return {"lines": lines, "index_s": index_s, "index_lines_per_s": lines / index_s,
            "lookups_per_s": len(keys) / look_s, "file_mib": os.path.getsize(path) / 2 ** 20}


def _tokenizer_sample(tmp: str, n: int) -> dict:
    """Train the tokenizer on a sample of a synthetic dataset's records (bytes read, images never decoded)."""
    from rice_jax.data import synthetic, tokenizer

    data = os.path.join(tmp, "tok")
    synthetic.build(data, n, seed=0, num_shards=4)
    t0 = time.perf_counter()
    tokenizer.build_for_dataset(data, vocab_size=256, sample=n // 2, seed=0, show_progress=False)
    s = time.perf_counter() - t0
    return {"records_read": n // 2, "seconds": s, "records_per_s": n // 2 / s}


def max_side_decode(smoke: bool = False) -> dict:
    """What ``mine --max-side`` saves training: the pipeline's decode (JPEG draft on, as trained) of
    web-sized originals against the same images stored at the side, per training image size.
    Originals: the bundled photos upscaled to 2048 x 1365 and 1024 x 683, JPEG q92."""
    import io

    from PIL import Image

    from benchmarks.common import timeit
    from rice_jax.data import pipeline, records
    from rice_jax.mining.mine import reencode

    photos = _photo_images(2)
    rows = []
    for side in ((1024,) if smoke else (2048, 1024)):
        for max_side in ((512,) if smoke else (512, 768)):
            for train_size in ((224,) if smoke else (224, 336)):
                if max_side >= side:
                    continue
                recs = {}
                for name in ("original", "stored"):
                    items = []
                    for p in photos:
                        big = np.asarray(Image.fromarray(p).resize((side, side * 2 // 3), Image.LANCZOS))
                        buf = io.BytesIO()
                        Image.fromarray(big).save(buf, "JPEG", quality=92)
                        data, (w, h) = (buf.getvalue(), big.shape[1::-1]) if name == "original" else \
                            reencode(big, max_side)
                        items.append(records.RegionRecord.new(data, "jpeg", h, w, "x", np.zeros((0, 4)),
                                                              np.zeros(0, np.int8)))
                    recs[name] = items
                t = {k: timeit(lambda v=v: [pipeline.decode_image(r, (train_size, train_size)) for r in v],
                               warmup=1, repeats=3 if smoke else 7)["median_s"] / len(v) for k, v in recs.items()}
                rows.append({"source_side": side, "max_side": max_side, "train_size": train_size,
                             "decode_ms_original": 1e3 * t["original"], "decode_ms_stored": 1e3 * t["stored"],
                             "speedup": t["original"] / t["stored"],
                             "bytes_original": int(np.mean([len(r.image) for r in recs["original"]])),
                             "bytes_stored": int(np.mean([len(r.image) for r in recs["stored"]]))})
                print(json.dumps(rows[-1]), flush=True)
    return report("mining_max_side" if not smoke else "mining_max_side_smoke", {"rows": rows}, write=not smoke)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--max-side", action="store_true", help="only the --max-side decode measurement")
    a = ap.parse_args(argv)
    if a.max_side:
        return max_side_decode(a.smoke)
    from rice_jax.data import coco
    from rice_jax.mining import ocr, proposals

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
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        for dev in devices:
            for pts in ((16,) if a.smoke else (16, 32)):  # smoke: the plumbing once
                sam = _sam(tmp, pts, a.smoke, dev)
                key = f"sam_vit_b_points{pts}_photo" + ("" if dev == "cpu" else f"_{dev}")
                rows[key] = {**_rate(sam, photos[:n_sam] if dev == "cpu" else photos), "device": dev,
                             "points_per_batch": sam.batch}
    scale = {}
    with tempfile.TemporaryDirectory() as tmp:
        scale["mine_tar_paper_preset"] = _end_to_end(tmp, photos, workers=min(2, os.cpu_count()))
    with tempfile.TemporaryDirectory() as tmp:
        scale["paddle_index"] = _paddle_index(tmp, 2000 if a.smoke else 200_000)
    with tempfile.TemporaryDirectory() as tmp:
        scale["tokenizer_sample"] = _tokenizer_sample(tmp, 64 if a.smoke else 2000)
    for k, v in scale.items():
        print(f"[mining bench] {k}: {v}", flush=True)
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
        "paddle_index_hours_50M": 50e6 / scale["paddle_index"]["index_lines_per_s"] / 3600,
        "paper_preset_regions_400M": PAPER_IMAGES * scale["mine_tar_paper_preset"]["regions_per_image"],
    }
    return report("mining" if not a.smoke else "mining_smoke",
                  {"methods": rows, "scale": scale, "projection": projection, "gpu": devices[1:] or None,
                   "sam_weights": "random (architecture cost only)"},
                  write=not a.smoke)


if __name__ == "__main__":
    main()
