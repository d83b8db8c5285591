"""Can the recipe read at all? Supervised word classification from region tokens (issue 27, step 1).

Before asking whether RICE's OCR loss teaches reading, ask whether reading is learnable in the
recipe: the ``tiny`` RICE model (ViT + region layers) is trained end to end with a plain
cross-entropy head on the region tokens of text regions, the target being which of the
generator's 40 words the region shows (chance 1/40), and scored on held-out images. Variants
change one thing at a time — image size, patch size, font size, a high-resolution continuation
stage (the paper's lr / 10) — so the table says what makes words legible to the model.

Every variant: the same step budget, batch, optimiser and seeds; images plainly resized (no
random crop, so no word is cut); held-out data is a different generator seed.

    python -m benchmarks.reading                      # ~the variants below x seeds, minutes each
    python -m benchmarks.reading --variants 64px_p8 128px_p8 --seeds 0 1 2 --steps 800
    python -m benchmarks.reading --smoke
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import add_synthetic_run_flags, load_result, report

# name -> stages ((steps share, image size, lr multiplier), ...), patch size, generator overrides
VARIANTS = {
    "64px_p8": dict(stages=((1.0, 64, 1.0),), patch=8, gen={}),                  # the quickstart's recipe
    "64px_p8_standardized": dict(stages=((1.0, 64, 1.0),), patch=8, gen={}, standardize=True),
    "64px_p4": dict(stages=((1.0, 64, 1.0),), patch=4, gen={}),
    "128px_p8": dict(stages=((1.0, 128, 1.0),), patch=8, gen={}),
    "64px_p8_then_128px": dict(stages=((0.75, 64, 1.0), (0.25, 128, 0.1)), patch=8, gen={}),
    "64px_p8_font32-40": dict(stages=((1.0, 64, 1.0),), patch=8, gen={"font_size": (32, 40)}),
    "128px_p8_font32-40": dict(stages=((1.0, 128, 1.0),), patch=8, gen={"font_size": (32, 40)}),
    "64px_p8_font28-36": dict(stages=((1.0, 64, 1.0),), patch=8, gen={"font_size": (28, 36)}),   # all 40 words fit
    "64px_p8_patch_mean": dict(stages=((1.0, 64, 1.0),), patch=8, gen={}, pool="patch_mean"),
    "64px_p8_region_layers4": dict(stages=((1.0, 64, 1.0),), patch=8, gen={}, region_layers=4),
    "64px_p8_roi_align": dict(stages=((1.0, 64, 1.0),), patch=8, gen={}, pool="roi_align"),
    "64px_p8_font28-36_roi_align": dict(stages=((1.0, 64, 1.0),), patch=8, gen={"font_size": (28, 36)}, pool="roi_align"),
    "64px_p8_roi_seed": dict(stages=((1.0, 64, 1.0),), patch=8, gen={}, region_seed="roi"),
    "64px_p8_font28-36_roi_seed": dict(stages=((1.0, 64, 1.0),), patch=8, gen={"font_size": (28, 36)}, region_seed="roi"),
    "64px_p8_roi_seed_box_rope": dict(stages=((1.0, 64, 1.0),), patch=8, gen={}, region_seed="roi", region_rope="box"),
    "64px_p8_box_rope": dict(stages=((1.0, 64, 1.0),), patch=8, gen={}, region_rope="box"),
    "64px_p8_heads2": dict(stages=((1.0, 64, 1.0),), patch=8, gen={}, backbone={"num_heads": 2}),
    "64px_p8_heads2_box_rope": dict(stages=((1.0, 64, 1.0),), patch=8, gen={}, backbone={"num_heads": 2},
                                    region_rope="box"),
    "64px_p8_width128": dict(stages=((1.0, 64, 1.0),), patch=8, gen={},
                             backbone={"hidden_size": 128, "intermediate_size": 512}),
}


def _word_table(data_dir) -> list[list[int]]:
    """Per record, per region: the word's index in ``synthetic.WORDS`` (-1: not a text region)."""
    from rice_jax.data import records, synthetic

    index = {w: i for i, w in enumerate(synthetic.WORDS)}
    return [[index.get(t.lower(), -1) if k == records.KIND_TEXT else -1 for t, k in zip(r.text, r.kind)]
            for r in records.RecordSource(data_dir)]


def _word_labels(batch, table) -> np.ndarray:
    """``[B, N]`` word ids of the batch's region slots (-1: padding, object or unknown word)."""
    out = np.full(batch["region_valid"].shape, -1, np.int32)
    for b, img in enumerate(np.asarray(batch["image_index"])):
        for n, r in enumerate(np.asarray(batch["region_index"][b])):
            if r >= 0 and batch["region_valid"][b, n]:
                out[b, n] = table[int(img)][int(r)]
    return out


def _data(root: Path, seed: int, n: int, gen: dict):
    from rice_jax.data import records, synthetic, tokenizer

    tag = "_".join(f"{k}{'-'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in sorted(gen.items()))
    d = root / f"words_s{seed}_n{n}{'_' + tag if tag else ''}"
    if not (d / records.MANIFEST).exists():
        synthetic.build(str(d), n, seed=seed, gen=dataclasses.replace(synthetic.GeneratorConfig(), **gen))
        tokenizer.build_for_dataset(d, vocab_size=128, show_progress=False)
    return d


def _batches(data_dir, size: int, batch: int, seed: int, train: bool):
    from rice_jax.data import pipeline

    cfg = pipeline.PipelineConfig(image_size=size, batch_size=batch, seed=seed, random_crop=False, shuffle=train,
                                  num_epochs=None if train else 1, workers=0, text_fraction=1.0)
    return iter(pipeline.make_dataset(data_dir, cfg, process_index=0, process_count=1))


def run_variant(name: str, seed: int, root: Path, *, steps: int, batch: int, n_train: int, n_eval: int,
                lr: float = 2e-3) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from rice_jax.batch import model_pixels
    from rice_jax.data import synthetic
    from rice_jax.models.config import get_preset
    from rice_jax.models.region import box_patch_visibility, roi_align, roi_mean_pool
    from rice_jax.models.rice import ROI_SEED_GRID, RICEConfig, RICEModel, batch_standardize

    v = VARIANTS[name]
    train_dir, eval_dir = _data(root, seed, n_train, v["gen"]), _data(root, seed + 1, n_eval, v["gen"])
    train_words, eval_words = _word_table(train_dir), _word_table(eval_dir)
    from rice_jax.configs.rice import get_config

    tiny = get_config("tiny").model
    cfg = RICEConfig(backbone=get_preset(tiny.backbone, patch_size=v["patch"], **v.get("backbone", {})),
                     region_layers=v.get("region_layers", tiny.region_layers), region_rope=v.get("region_rope", "class"),
                     region_seed=v.get("region_seed", "class"))
    model = RICEModel(cfg, rngs=nnx.Rngs(seed))
    width = cfg.backbone.hidden_size * (ROI_SEED_GRID[0] * ROI_SEED_GRID[1] if v.get("pool") == "roi_align" else 1)
    head = nnx.Linear(width, len(synthetic.WORDS), rngs=nnx.Rngs(seed + 1000))
    graph, state = nnx.split((model, head))
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps)
    tx = optax.inject_hyperparams(optax.adamw)(learning_rate=lr, weight_decay=0.05)
    opt_state = tx.init(state)

    def logits_of(state, batch):
        m, h = nnx.merge(graph, state)
        out = m(model_pixels(batch["image"]), batch["boxes"], batch["region_valid"])
        gh, gw = m.backbone.grid(batch["image"].shape[1], batch["image"].shape[2])
        if v.get("pool") == "patch_mean":  # the box's final patch tokens averaged: is the region-token path the obstacle?
            vis = box_patch_visibility(batch["boxes"], batch["region_valid"], gh, gw)
            x = roi_mean_pool(m.backbone.post_norm(out.last_hidden_state[:, 1:]), vis)
        elif v.get("pool") == "roi_align":  # box-aligned samples, concatenated: the patches read in box order
            x = roi_align(m.backbone.post_norm(out.last_hidden_state[:, 1:]), batch["boxes"], gh, gw, *ROI_SEED_GRID)
            x = x.reshape(*x.shape[:2], -1)
        else:
            x = m.backbone.post_norm(out.region_hidden)
        if v.get("standardize"):       # remove what every region shares (region tokens start from one state)
            x = batch_standardize(x, batch["region_valid"])
        return h(x)

    def loss_fn(state, batch, words):
        logits = logits_of(state, batch)
        ok = words >= 0
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(words, 0))
        return jnp.sum(ce * ok) / jnp.maximum(ok.sum(), 1)

    @jax.jit
    def step(state, opt_state, batch, words, lr_now):
        loss, g = jax.value_and_grad(loss_fn)(state, batch, words)
        opt_state.hyperparams["learning_rate"] = lr_now
        updates, opt_state = tx.update(g, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    predict = jax.jit(lambda state, batch: jnp.argmax(logits_of(state, batch), -1))
    keys = ("image", "boxes", "region_valid")
    history, t0, done = [], time.perf_counter(), 0
    for share, size, lr_mult in v["stages"]:
        n_steps = int(round(share * steps))
        it = _batches(train_dir, size, batch, seed, train=True)
        for _ in range(n_steps):
            b = next(it)
            words = _word_labels(b, train_words)
            state, opt_state, loss = step(state, opt_state, {k: jnp.asarray(b[k]) for k in keys}, jnp.asarray(words),
                                          jnp.float32(sched(done) * lr_mult))
            done += 1
            if done % max(1, steps // 20) == 0 or done == steps:
                history.append({"step": done, "loss": float(loss), "image_size": size})
    train_s = time.perf_counter() - t0
    size = v["stages"][-1][1]
    hit = total = 0
    for b in _batches(eval_dir, size, batch, seed, train=False):
        words = _word_labels(b, eval_words)
        pred = np.asarray(predict(state, {k: jnp.asarray(b[k]) for k in keys}))
        ok = words >= 0
        hit += int((pred[ok] == words[ok]).sum())
        total += int(ok.sum())
    return {"variant": name, "seed": seed, "steps": steps, "images": n_train, "lr": lr, "batch": batch,
            "accuracy": hit / max(total, 1), "eval_regions": total,
            "loss_start": history[0]["loss"], "loss_end": history[-1]["loss"], "train_seconds": train_s,
            "history": history}


def legibility(size: int, gen: dict, seed: int, n_train: int, n_eval: int) -> dict:
    """What the pixels hold at ``size`` px: multinomial logistic regression on each word's box crop of
    the resized grey image (resampled to 48 x 12, standardised). An independent reference for the
    model rows — the crop hands it the word aligned and scaled, which the ViT must learn to do."""
    from PIL import Image
    from sklearn.linear_model import LogisticRegression

    from rice_jax.data import records, synthetic

    g = dataclasses.replace(synthetic.GeneratorConfig(), **gen)
    index = {w: i for i, w in enumerate(synthetic.WORDS)}

    def crops(data_seed, n):
        xs, ys = [], []
        for i in range(n):
            img, boxes, kinds, texts, _, _ = synthetic.render_image(np.random.default_rng([data_seed, i]), g)
            sx, sy = size / img.width, size / img.height
            grey = img.resize((size, size), Image.BILINEAR).convert("L")
            for (x0, y0, x1, y1), kind, word in zip(boxes, kinds, texts):
                if kind == records.KIND_TEXT:
                    c = np.asarray(grey.crop((x0 * sx, y0 * sy, x1 * sx, y1 * sy)).resize((48, 12), Image.BILINEAR),
                                   np.float32).ravel()
                    xs.append((c - c.mean()) / (c.std() + 1e-6))
                    ys.append(index[word])
        return np.stack(xs), np.asarray(ys)

    x, y = crops(seed, n_train)
    xe, ye = crops(seed + 1, n_eval)
    clf = LogisticRegression(max_iter=2000, C=0.1).fit(x, y)
    return {"image_size": size, "gen": {k: list(v) for k, v in gen.items()}, "seed": seed, "train_words": len(y), "eval_words": len(ye),
            "accuracy": float(clf.score(xe, ye))}


def _row_key(r: dict) -> str:
    return f"{r['variant']}|{r['steps']}|{r['images']}|{r['lr']:g}"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    add_synthetic_run_flags(ap, steps=800, seeds=[0, 1], images=4096, steps_help="training steps of every variant")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (warm-up 5%%, cosine decay)")
    ap.add_argument("--legibility", action="store_true",
                    help="also the pixel reference: logistic regression on word crops at 64 and 128 px")
    ap.add_argument("--fresh", action="store_true",
                    help="start the results file afresh (default: add these runs to it, replacing runs with the "
                         "same variant, steps, images, lr and seed)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.variants, a.seeds, a.steps, a.images, a.eval_images, a.batch = ["64px_p8_then_128px"], [0], 4, 32, 32, 8
    mine = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.data_root or tmp)
        for name in a.variants:
            for seed in a.seeds:
                r = run_variant(name, seed, root, steps=a.steps, batch=a.batch, n_train=a.images,
                                n_eval=a.eval_images, lr=a.lr)
                mine.append(r)
                print(f"[reading] {name} seed {seed}: held-out word accuracy {r['accuracy']:.3f} "
                      f"(loss {r['loss_start']:.2f} -> {r['loss_end']:.2f}, {r['train_seconds']:.0f} s)", flush=True)
    # Read the file only now, so runs another process added while these trained are kept.
    old = {} if a.fresh or a.smoke else (load_result("reading") or {})
    # Runs written before rows carried their own budget took the file's (lr was then fixed at 2e-3).
    runs = [{"steps": old.get("steps"), "images": old.get("images"), "lr": 2e-3, **r} for r in old.get("runs", [])]
    for r in mine:
        runs = [q for q in runs if (_row_key(q), q["seed"]) != (_row_key(r), r["seed"])] + [r]
    legible = list(old.get("legibility", []))
    if a.legibility:
        for gen in ({}, {"font_size": (28, 36)}):
            for size in (64, 128):
                for seed in a.seeds:
                    g = legibility(size, gen, seed, n_train=min(a.images, 3000), n_eval=a.eval_images)
                    legible = [q for q in legible if (q["image_size"], q["gen"], q["seed"]) !=
                               (g["image_size"], g["gen"], seed)] + [g]
                    print(f"[reading] pixels at {size} px, generator {gen or 'default'}, seed {seed}: "
                          f"crop logistic regression {g['accuracy']:.3f}", flush=True)
    table = {}
    for key in dict.fromkeys(_row_key(r) for r in runs):
        group = [r for r in runs if _row_key(r) == key]
        acc = [r["accuracy"] for r in group]
        table[key] = {"variant": group[0]["variant"], "steps": group[0]["steps"], "images": group[0]["images"],
                      "lr": group[0]["lr"], "mean": float(np.mean(acc)), "std": float(np.std(acc)),
                      "seeds": sorted(r["seed"] for r in group),
                      "loss_end": float(np.mean([r["loss_end"] for r in group])),
                      "train_seconds": float(np.mean([r["train_seconds"] for r in group]))}
    used = {t["variant"] for t in table.values()}
    return report("reading" if not a.smoke else "reading_smoke",
                  {"batch": a.batch, "eval_images": a.eval_images, "chance": 1 / 40,
                   "variants": {k: VARIANTS[k] for k in VARIANTS if k in used}, "table": table, "runs": runs,
                   "legibility": legible},
                  write=not a.smoke)


if __name__ == "__main__":
    main()
