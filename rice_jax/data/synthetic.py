"""Deterministic synthetic region dataset: the embedded default data of the quickstart and tests.

Each image has a noisy, cluttered background, one to four objects and a few
rendered words. An object's category is (shape, texture): 4 shapes x 3
textures = 12 categories; its colours are drawn at random from one palette
shared by all categories, so colour says nothing about the category — shape
and texture must be seen. Words come from a fixed vocabulary and are rendered
with Pillow's scalable built-in font in several sizes and colours; each
becomes a text region with its transcript.

The defaults (:class:`GeneratorConfig`) are sized for the ``tiny`` model that
trains at 64 px with 8-px patches (README, "Why the first quickstart learned
nothing"): objects span 3-6 patches there, texture periods stay >= 3 px after
the resize, objects do not occlude each other, patterned textures put the
darker colour in the pattern and objects carry a thin dark outline (so edges
and stripes have one polarity, as most natural edges have a dominant one,
while colour stays uninformative).

    python -m rice_jax.data.synthetic --out DIR --num-images N --seed S
"""
from __future__ import annotations

import argparse
import dataclasses
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rice_jax import cli
from rice_jax.data import records

SHAPES = ("circle", "square", "triangle", "cross")
TEXTURES = ("solid", "stripes", "checker")
CATEGORIES = tuple(f"{s}/{t}" for s in SHAPES for t in TEXTURES)
WORDS = ("rice", "jax", "region", "cluster", "token", "vision", "model", "pixel", "patch", "train",
         "image", "text", "label", "center", "margin", "scale", "batch", "shard", "mesh", "grain",
         "flax", "orbax", "tensor", "layer", "query", "key", "value", "head", "block", "loss",
         "alpha", "beta", "gamma", "delta", "north", "south", "east", "west", "red", "blue")
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                    [0, 128, 128], [170, 110, 40], [128, 0, 0], [0, 0, 128], [128, 128, 0], [20, 20, 20]])


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """How images are drawn. Stored in the manifest, so evaluation re-renders the same masks."""
    min_size: int = 96                              # image side range (pixels)
    max_size: int = 128
    object_scale: tuple[float, float] = (0.25, 0.45)    # object side as a share of the short image side
    min_object_size: int = 16                       # pixels
    num_objects: tuple[int, int] = (1, 4)           # inclusive range
    texture_period: tuple[int, int] = (6, 10)       # stripe / checker period in pixels, inclusive
    num_words: tuple[int, int] = (1, 2)             # inclusive range
    font_size: tuple[int, int] = (16, 24)           # inclusive range
    # Luminance structure that stays independent of the category: a patterned texture's pattern
    # colour is the darker of its two palette colours, and objects get a dark outline of this
    # width. Colour still says nothing about the category; edges and stripes get one polarity.
    dark_pattern: bool = True
    outline: int = 2
    # Re-draw an object's / word's position (up to 20 tries) while its box overlaps an earlier
    # one, so shapes and words stay whole; the last try is kept, so crowded images may overlap.
    avoid_overlap: bool = True
    dark_text: bool = True                          # words in the palette's darker colours (legible)

    @classmethod
    def from_dict(cls, d: dict) -> "GeneratorConfig":
        """From a manifest's ``generator`` entry (lists become tuples; unknown keys are ignored).

        A field the entry lacks takes the value of the first generator design (datasets
        written before the field existed), so their masks re-render exactly.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**{**FIRST_DESIGN, **given})


# The generator as first shipped (large images, small occluding objects, fine textures):
# what a manifest without these fields was written with.
FIRST_DESIGN = dict(min_size=96, max_size=160, object_scale=(1 / 6, 1 / 2), num_objects=(2, 5), texture_period=(4, 7),
                    num_words=(1, 2), font_size=(12, 21), dark_pattern=False, outline=0, avoid_overlap=False,
                    dark_text=False)


# Text colours darker than every background (backgrounds are grey levels 80-200 plus noise).
DARK_PALETTE = np.array([c for c in PALETTE if 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] < 90])


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _texture(size: int, texture: str, c1, c2, rng, period_range=(4, 7)) -> Image.Image:
    tile = Image.new("RGB", (size, size), tuple(int(v) for v in c1))
    d = ImageDraw.Draw(tile)
    period = int(rng.integers(period_range[0], period_range[1] + 1))
    if texture == "stripes":
        for k in range(-size, 2 * size, period * 2):
            d.line([(k, 0), (k + size, size)], fill=tuple(int(v) for v in c2), width=period)
    elif texture == "checker":
        for y in range(0, size, period):
            for x in range(0, size, period):
                if ((x // period) + (y // period)) % 2:
                    d.rectangle([x, y, x + period - 1, y + period - 1], fill=tuple(int(v) for v in c2))
    return tile


def _luminance(c) -> float:
    return 0.299 * float(c[0]) + 0.587 * float(c[1]) + 0.114 * float(c[2])


def _shape_mask(size: int, shape: str, inset: int = 0) -> Image.Image:
    """The shape's mask on a ``size`` square; ``inset`` > 0 shrinks it by that many pixels (for outlines)."""
    m = Image.new("L", (size, size), 0)
    if inset:
        inner = _shape_mask(max(size - 2 * inset, 2), shape)
        m.paste(inner, (inset, inset))
        return m
    d = ImageDraw.Draw(m)
    s = size - 1
    if shape == "circle":
        d.ellipse([0, 0, s, s], fill=255)
    elif shape == "square":
        d.rectangle([0, 0, s, s], fill=255)
    elif shape == "triangle":
        d.polygon([(s / 2, 0), (s, s), (0, s)], fill=255)
    elif shape == "cross":
        w = size // 3
        d.rectangle([w, 0, s - w, s], fill=255)
        d.rectangle([0, w, s, s - w], fill=255)
    return m


def _place(rng, x_end: int, y_end: int, bw: int, bh: int, boxes, avoid_overlap: bool) -> tuple[int, int]:
    """Top-left corner in ``[0, x_end) x [0, y_end)`` for a ``bw x bh`` box.

    With ``avoid_overlap``, re-draws (up to 20 tries) while the box overlaps one of ``boxes``;
    the last try is kept. Without it, exactly one draw (the first design's random stream).
    """
    for _ in range(20 if avoid_overlap else 1):
        x, y = int(rng.integers(0, x_end)), int(rng.integers(0, y_end))
        if not any(x < b[2] and b[0] < x + bw and y < b[3] and b[1] < y + bh for b in boxes):
            break
    return x, y


def render_image(rng: np.random.Generator, gen: GeneratorConfig = GeneratorConfig()):
    """One image. Returns (PIL image, boxes, kinds, texts, categories, semantic mask [H,W] int (-1 bg))."""
    w, h = (int(v) for v in rng.integers(gen.min_size, gen.max_size + 1, 2))
    bg = rng.integers(80, 200, 3)
    arr = np.clip(bg + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):  # clutter lines
        pts = [tuple(int(v) for v in rng.integers(0, [w, h])) for _ in range(2)]
        d.line(pts, fill=tuple(int(v) for v in PALETTE[rng.integers(len(PALETTE))]), width=int(rng.integers(1, 3)))
    sem = np.full((h, w), -1, np.int32)
    boxes, kinds, texts, cats = [], [], [], []
    short = min(w, h)
    lo = max(gen.min_object_size, int(short * gen.object_scale[0]))
    hi = max(lo + 1, min(int(short * gen.object_scale[1]), short - 1))
    for _ in range(int(rng.integers(gen.num_objects[0], gen.num_objects[1] + 1))):
        size = int(rng.integers(lo, hi))
        x0, y0 = _place(rng, w - size, h - size, size, size, boxes, gen.avoid_overlap)
        cat = int(rng.integers(len(CATEGORIES)))
        shape, texture = CATEGORIES[cat].split("/")
        c1, c2 = PALETTE[rng.choice(len(PALETTE), 2, replace=False)]
        # Only patterned textures are ordered: a solid object keeps a uniformly drawn colour, so
        # brightness does not tell solid from patterned either.
        if gen.dark_pattern and texture != "solid" and _luminance(c2) > _luminance(c1):
            c1, c2 = c2, c1
        mask = _shape_mask(size, shape)
        if gen.outline:
            img.paste((15, 15, 15), (x0, y0), mask)
            mask_in = _shape_mask(size, shape, inset=gen.outline)
        else:
            mask_in = mask
        img.paste(_texture(size, texture, c1, c2, rng, gen.texture_period), (x0, y0), mask_in)
        sem[y0:y0 + size, x0:x0 + size][np.asarray(mask) > 0] = cat
        boxes.append([x0, y0, x0 + size, y0 + size])
        kinds.append(records.KIND_OBJECT)
        texts.append("")
        cats.append(cat)
    for _ in range(int(rng.integers(gen.num_words[0], gen.num_words[1] + 1))):
        word = WORDS[int(rng.integers(len(WORDS)))]
        font = _font(int(rng.integers(gen.font_size[0], gen.font_size[1] + 1)))
        l, t, r, b = d.textbbox((0, 0), word, font=font)
        tw, th = r - l, b - t
        if tw >= w - 2 or th >= h - 2:
            continue
        x, y = _place(rng, w - tw - 1, h - th - 1, tw, th, boxes, gen.avoid_overlap)
        palette = DARK_PALETTE if gen.dark_text else PALETTE
        color = tuple(int(v) for v in palette[rng.integers(len(palette))])
        d.text((x - l, y - t), word, fill=color, font=font)
        boxes.append([x, y, x + tw, y + th])
        kinds.append(records.KIND_TEXT)
        texts.append(word)
        cats.append(-1)
    return img, np.asarray(boxes, np.float32), kinds, texts, cats, sem


def generate(num_images: int, seed: int = 0, gen: GeneratorConfig = GeneratorConfig(), fmt: str = "png"):
    """Yield :class:`records.RegionRecord` deterministically (image i depends only on (seed, i, gen))."""
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        img, boxes, kinds, texts, cats, _ = render_image(rng, gen)
        buf = io.BytesIO()
        img.save(buf, format="PNG" if fmt == "png" else "JPEG", quality=92)
        yield records.RegionRecord.new(buf.getvalue(), fmt, img.height, img.width, f"syn-{seed}-{i:07d}",
                                       boxes, kinds, text=texts, category=cats)


def ground_truth(manifest: dict, index: int):
    """Image ``index`` of a synthetic dataset re-rendered from its manifest (seed and generator):
    ``(PIL image, boxes, kinds, texts, categories, semantic mask)`` as :func:`render_image` returns."""
    gen = GeneratorConfig.from_dict(manifest.get("generator", {}))
    return render_image(np.random.default_rng([manifest["seed"], index]), gen)


def semantic_mask(manifest: dict, index: int) -> np.ndarray:
    """The per-pixel category map of image ``index`` of a synthetic dataset (re-rendered; -1 = background)."""
    return ground_truth(manifest, index)[5]


def image_index(image_id: str) -> int:
    """The generator index of a synthetic record's ``image_id`` (``syn-SEED-INDEX``)."""
    return int(image_id.rsplit("-", 1)[1])


def build(out: str, num_images: int, seed: int = 0, gen: GeneratorConfig = GeneratorConfig(),
          num_shards: int = 4, fmt: str = "png", progress: bool = False) -> dict:
    it = generate(num_images, seed, gen, fmt)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=num_images, desc="synthetic images", unit="img")
    extra = {"source": "synthetic", "categories": list(CATEGORIES), "seed": seed,
             "generator": dict(dataclasses.asdict(gen), format=fmt)}
    return records.write_records(it, out, num_shards=max(1, min(num_shards, num_images)), manifest_extra=extra)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-images", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-size", type=int, default=GeneratorConfig.min_size)
    ap.add_argument("--max-size", type=int, default=GeneratorConfig.max_size)
    ap.add_argument("--num-shards", type=int, default=4)
    ap.add_argument("--format", choices=("png", "jpeg"), default="png")
    a = ap.parse_args(argv)
    gen = GeneratorConfig(min_size=a.min_size, max_size=a.max_size)
    m = build(a.out, a.num_images, a.seed, gen, a.num_shards, a.format, progress=True)
    print(f"wrote {m['num_images']} images, {m['num_object_regions']} object and "
          f"{m['num_text_regions']} text regions to {a.out}")


if __name__ == "__main__":
    cli.run(main)
