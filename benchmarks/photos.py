"""Region records made of real photographs, offline: the input pipeline's realistic benchmark set.

The synthetic generator draws small flat-colour PNGs that decode far faster than the JPEG photos a
pretraining run reads (LAION/COYO images are JPEGs of a few hundred KB). This module builds records
from the colour photos that scikit-learn and scikit-image ship inside their wheels (no download):
each record is a random crop of one of them, resized to a typical web size (640 x 480 or
1024 x 768 by default) and JPEG-encoded, so every record is a distinct JPEG with photo statistics,
with N random object boxes.

    python -m benchmarks.photos --out DIR --num-images 1024 [--size 640x480 --size 1024x768]
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from rice_jax import cli, errors
from rice_jax.data import records

# Colour photographs bundled with the two libraries (file names inside their packages).
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "hubble_deep_field.jpg", "retina.jpg")


def bundled_photos() -> list[Image.Image]:
    """The bundled colour photos as RGB images (those present in the installed versions)."""
    import sklearn.datasets

    folders = [(Path(sklearn.datasets.__file__).parent / "images", SKLEARN_PHOTOS)]
    try:
        import skimage.data

        folders.append((Path(skimage.data.__file__).parent, SKIMAGE_PHOTOS))
    except ImportError:
        pass
    out = []
    for folder, names in folders:
        for name in names:
            if (folder / name).exists():
                out.append(Image.open(folder / name).convert("RGB"))
    if not out:
        raise errors.MissingInput("no bundled photos found (scikit-learn's sklearn/datasets/images/*.jpg)")
    return out


def photo_records(num_images: int, sizes: Sequence[tuple[int, int]] = ((640, 480), (1024, 768)), *,
                  regions: int = 10, quality: int = 90, seed: int = 0,
                  photos: Sequence[Image.Image] | None = None) -> Iterator[records.RegionRecord]:
    """``num_images`` records: a random crop (40-100 % of the side, any position) of a random bundled
    photo, resized to one of ``sizes`` (cycled: equal shares), JPEG at ``quality``, with ``regions``
    random object boxes (at least 1/8 of the short side). Each box's cluster and category are the
    index of the photo its crop came from (a weak label, but a real one), so the records train as
    they are — ``--config.loss.num_obj_classes`` = the number of bundled photos — for runs that
    measure throughput on JPEGs (``data_wait_fraction``) without a clustering step first.
    ``photos``: the source images (default: :func:`bundled_photos`)."""
    photos = bundled_photos() if photos is None else photos
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        w, h = sizes[i % len(sizes)]
        which = int(rng.integers(len(photos)))
        src = photos[which]
        sw, sh = src.size
        scale = rng.uniform(0.4, 1.0)
        cw, ch = max(16, int(sw * scale)), max(16, int(sw * scale * h / w))
        cw, ch = min(cw, sw), min(ch, sh)
        x0, y0 = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
        img = src.resize((w, h), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        short = min(w, h)
        lo = rng.uniform(0, 1, (regions, 2)) * [w - short / 8, h - short / 8]
        size = rng.uniform(short / 8, short / 2, (regions, 2))
        boxes = np.concatenate([lo, np.minimum(lo + size, [w, h])], 1)
        yield records.RegionRecord.new(buf.getvalue(), "jpeg", h, w, f"photo-{i:06d}", boxes,
                                       np.full(regions, records.KIND_OBJECT), cluster=np.full(regions, which),
                                       category=np.full(regions, which))


def build(out: str, num_images: int, sizes: Sequence[tuple[int, int]] = ((640, 480), (1024, 768)), *,
          regions: int = 10, num_shards: int = 4, seed: int = 0) -> dict:
    """Write ``num_images`` photo records as a region dataset at ``out``; returns its manifest."""
    photos = bundled_photos()
    return records.write_records(photo_records(num_images, sizes, regions=regions, seed=seed, photos=photos), out,
                                 num_shards=num_shards,
                                 manifest_extra={"source": {"generator": "benchmarks.photos",
                                                            "sizes": [list(s) for s in sizes], "seed": seed,
                                                            "photos": len(photos)}})


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: use WIDTHxHEIGHT, e.g. 640x480") from None
    return w, h


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-images", type=int, default=1024)
    ap.add_argument("--size", type=_size, action="append", help="WIDTHxHEIGHT (repeatable; default 640x480, 1024x768)")
    ap.add_argument("--regions", type=int, default=10)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    m = build(a.out, a.num_images, a.size or ((640, 480), (1024, 768)), regions=a.regions, num_shards=a.shards,
              seed=a.seed)
    print(f"[photos] {sum(m['shard_counts'])} photo records in {a.out}")


if __name__ == "__main__":
    cli.run(main)
