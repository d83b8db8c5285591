"""Ablation: RICE vs global-only (MLCD-style) vs RICE with oracle labels vs random init.

Same data, model, batch and step budget for every trained method (the ``tiny``
config, trained for 3000 steps instead of the quickstart's 1800); several
seeds, where seed S means training data S, held-out data S+1 and model S.
Every method is evaluated by rice_jax.evaluate on the same held-out synthetic
images (frozen exported backbone). The handcrafted clustering teacher's own
probe at the same resolution is reported beside them. Writes
benchmarks/results/ablation.json and ablation.png, prints one JSON line.

    python -m benchmarks.ablation [--seeds 0 1 2] [--steps 3000]     # ~15 min per seed on 2 cores
    python -m benchmarks.ablation --smoke
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, add_synthetic_run_flags, report

METHODS = ("rice", "mlcd", "rice_oracle", "random_init", "teacher")
# The synthetic downstream tasks' images: generator seed S + this (neither training nor held-out data).
DOWNSTREAM_SEED = 1000
DOWNSTREAM_TASKS = ("refseg", "semseg", "regcls")
LABELS = {"rice": "RICE", "mlcd": "global-only (MLCD-style)", "rice_oracle": "RICE, oracle labels",
          "random_init": "random init", "teacher": "handcrafted teacher"}


def _config(arg):
    from rice_jax.configs.rice import get_config

    return get_config(arg)



def teacher_probes(data_dir, image_size: int) -> dict:
    """The handcrafted clustering teacher's own region probes at the model's input resolution.

    Each image is resized to ``image_size`` x ``image_size`` exactly as the backbone sees it, the
    object boxes are cut from that image and described by
    :func:`rice_jax.labelling.clustering.handcrafted_features`; same split and probes as
    :func:`rice_jax.evaluate.evaluate_backbone`. What the pseudo-labels were made from, so the bar a
    backbone trained on them has to clear to have learned more than its teacher."""
    import io

    from PIL import Image

    from rice_jax import evaluate
    from rice_jax.data import records
    from rice_jax.labelling.clustering import handcrafted_features

    src = records.RecordSource(data_dir)
    items = []
    for i in range(len(src)):
        rec = src[i]
        img = Image.open(io.BytesIO(rec.image)).convert("RGB")
        w, h = img.size
        arr = np.asarray(img.resize((image_size, image_size), Image.BICUBIC))
        scale = np.array([image_size / w, image_size / h] * 2)
        for r in np.nonzero((rec.kind == records.KIND_OBJECT) & (rec.category >= 0))[0]:
            x0, y0 = np.floor(rec.boxes[r][:2] * scale[:2]).astype(int)
            x1, y1 = np.ceil(rec.boxes[r][2:] * scale[2:]).astype(int)
            crop = arr[max(y0, 0):max(y1, y0 + 1), max(x0, 0):max(x1, x0 + 1)]
            items.append({"image": i, "feat": {"hand": handcrafted_features(crop)}, "category": int(rec.category[r])})
    tr, te = evaluate.split_by_image(items)
    lin, knn = evaluate.region_probes(tr, te, "hand")
    return {"region_linear_acc": lin, "region_knn_acc": knn, "num_regions_test": len(te)}

def prepare(root: Path, seed: int, n_train: int, n_eval: int, k: int, n_down: int = 0):
    """Training data with k-means labels, a copy with oracle labels, held-out data and (``n_down``
    images) the synthetic downstream tasks' data."""
    from rice_jax.labelling import clustering
    from rice_jax.data import records, synthetic, tokenizer

    dirs = {"train": root / f"train_s{seed}", "eval": root / f"eval_s{seed + 1}", "oracle": root / f"oracle_s{seed}",
            "downstream": root / f"downstream_s{seed + DOWNSTREAM_SEED}"}
    if n_down and not (dirs["downstream"] / records.MANIFEST).exists():
        synthetic.build(str(dirs["downstream"]), n_down, seed=seed + DOWNSTREAM_SEED)
    for name, n, s in (("train", n_train, seed), ("eval", n_eval, seed + 1)):
        if not (dirs[name] / records.MANIFEST).exists():
            synthetic.build(str(dirs[name]), n, seed=s)
            tokenizer.build_for_dataset(dirs[name], vocab_size=512)
    if (records.read_manifest(dirs["train"]).get("clustering") or {}).get("k") != k:
        clustering.run(dirs["train"], k, seed=seed, log=lambda s: None)
    if not dirs["oracle"].exists():
        shutil.copytree(dirs["train"], dirs["oracle"])
        clustering.oracle_labels(dirs["oracle"], log=lambda s: None)
    return dirs


def downstream(model, seed: int, dirs: dict, steps: int | None = None) -> dict:
    """The synthetic downstream tasks (rice_jax.downstream) on a frozen backbone: flat metrics."""
    from rice_jax.downstream import table
    from rice_jax.downstream.encoders import FrozenEncoder

    if not (dirs["downstream"] / "manifest.json").exists():
        return {}
    enc, out = FrozenEncoder(model), {}
    for task in DOWNSTREAM_TASKS:
        res = table.run_task(enc, task, f"synthetic:{dirs['downstream']}", seed=seed, steps=steps, log=None)
        for k, v in res["splits"]["test"].items():
            if isinstance(v, float):
                out[f"{task}_{k}"] = v
    return out


def run_one(method: str, seed: int, dirs: dict, workdir: Path, steps: int, down_steps: int | None = None,
            with_downstream: bool = True):
    from flax import nnx

    from rice_jax import backbones, evaluate, train
    from rice_jax.data import tokenizer
    from rice_jax.models.rice import RICEModel

    c = _config("tiny" if method != "mlcd" else "tiny,objective=mlcd")
    image = c.stages[-1][1]
    eval_dir = dirs["eval"]
    if method == "teacher":
        return teacher_probes(eval_dir, image), None
    tok = tokenizer.for_dataset(eval_dir)
    if method == "random_init":   # the RICE recipe's architecture (region settings included), untrained
        model = RICEModel(train.build_model_config(c), rngs=nnx.Rngs(seed))
        res = evaluate.evaluate_backbone(model, eval_dir, image, tok, all_layers=True)
        return {**res, **(downstream(model, seed, dirs, down_steps) if with_downstream else {})}, None
    c.data.dir, c.seed = str(dirs["oracle" if method == "rice_oracle" else "train"]), seed
    if steps:
        c.stages = ((steps, image),)
    c.progress_bar, c.checkpoint_every = False, 10**9
    t = time.perf_counter()
    s = train.train(c, workdir)
    if s["preempted"]:  # SIGTERM: train saved and returned early; do not report a half-trained row
        raise SystemExit(f"[ablation] {method} seed {seed} stopped by SIGTERM")
    seconds = time.perf_counter() - t
    # A run that trained region tokens is read as its RICE model; global-only (mlcd) as its ViT.
    model = backbones.load(f"ckpt:{workdir}", regions=True)
    res = evaluate.evaluate_backbone(model, eval_dir, image, tok, all_layers=True)
    if with_downstream:
        res.update(downstream(model, seed, dirs, down_steps))
    tr = {"loss_start": s["history"][0]["loss"], "loss_end": s["history"][-1]["loss"],
          "train_seconds": seconds, "steps": s["end_step"]}
    ocr = [(h["step"], h["loss_ocr"]) for h in s["history"] if "loss_ocr" in h]
    if ocr:   # the test of the OCR half: its loss near step 100 against the end (means of windows)
        tr["ocr_loss_100"] = float(np.mean([v for st, v in ocr if 50 <= st <= 150] or [ocr[0][1]]))
        tr["ocr_loss_end"] = float(np.mean([v for _, v in ocr[-max(1, len(ocr) // 10):]]))
    return res, tr


def train_tiny(data_dir, workdir, seed: int, steps: int, init_from: str = "", workers="auto") -> tuple[dict, float]:
    """The `tiny` RICE recipe on ``data_dir`` for ``steps`` (one stage, no checkpoints on the way):
    (train's summary, seconds). ``workers``: its ``data.workers``."""
    from rice_jax import train
    from rice_jax.configs.rice import get_config

    c = get_config("tiny")
    c.data.dir, c.seed, c.init_from = str(data_dir), seed, init_from
    c.stages = ((steps, c.stages[-1][1]),)
    c.progress_bar, c.checkpoint_every = False, 10**9
    c.data.workers = workers
    t = time.perf_counter()
    s = train.train(c, workdir)
    if s["preempted"]:
        raise SystemExit(f"[benchmarks] {workdir} stopped by SIGTERM")
    return s, time.perf_counter() - t


def evaluate_run(workdir, eval_dir) -> dict:
    """A run's RICE model (region tokens as trained) through the held-out probes of rice_jax.evaluate."""
    from rice_jax import backbones, evaluate
    from rice_jax.configs.rice import get_config
    from rice_jax.data import tokenizer

    image = get_config("tiny").stages[-1][1]
    return evaluate.evaluate_backbone(backbones.load(f"ckpt:{workdir}", regions=True), eval_dir, image,
                                      tokenizer.for_dataset(eval_dir))


def main(argv=None):
    ap = argparse.ArgumentParser()
    add_synthetic_run_flags(ap, steps=3000, seeds=[0, 1, 2], images=8192,
                            steps_help="training steps of every method (0 = the tiny config's)")
    ap.add_argument("--clusters", type=int, default=48)
    ap.add_argument("--downstream-images", type=int, default=1024,
                    help="images of the synthetic downstream tasks (half train their heads; 0 = skip them)")
    ap.add_argument("--downstream-steps", type=int, default=None, help="head training steps (default: each task's)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.steps, a.seeds, a.images, a.eval_images, a.clusters, a.downstream_images = 4, [0], 64, 64, 8, 32
        a.downstream_steps = 3
    runs = {m: [] for m in METHODS}
    rec = None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.data_root or tmp)
        for seed in a.seeds:
            dirs = prepare(root, seed, a.images, a.eval_images, a.clusters, a.downstream_images)
            for m in METHODS:
                res, tr = run_one(m, seed, dirs, Path(tmp) / f"{m}_{seed}", a.steps, a.downstream_steps,
                                  with_downstream=not a.smoke or m == "rice")   # smoke: one method is enough
                runs[m].append({"seed": seed, **res, **(tr or {})})
                print(f"[ablation] seed {seed} {m}: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in res.items() if isinstance(v, float)), flush=True)
            # Written after every seed (the table of the seeds done so far): a run cut short keeps them.
            rec = _write(a, runs)
    return rec


def _write(a, runs):
    skip = ("seed", "num_regions_test", "loss_start", "loss_end", "layer", "train_seconds", "steps", "per_layer")
    table = {m: {k: {"mean": float(np.mean([r[k] for r in runs[m]])), "std": float(np.std([r[k] for r in runs[m]]))}
                 for k in runs[m][0] if k not in skip} for m in METHODS}
    # Region probes at every depth (0 = patch embedding, i = after block i), mean over seeds.
    layers = {m: {l: {k: float(np.mean([r["per_layer"][l][k] for r in runs[m]])) for k in v}
                  for l, v in runs[m][0]["per_layer"].items()} for m in METHODS if "per_layer" in runs[m][0]}
    c = _config("tiny")
    down = {m: {k: v for k, v in table[m].items() if k.split("_")[0] in DOWNSTREAM_TASKS} for m in METHODS}
    if any(down.values()):   # the synthetic downstream comparison, on its own for the README table
        report("downstream_synthetic" if not a.smoke else "downstream_synthetic_smoke",
               {"seeds": [r["seed"] for r in runs["rice"]], "images": a.downstream_images,
                "backbone_steps": a.steps or sum(s[0] for s in c.stages), "head_steps": a.downstream_steps,
                "data_seed": f"S + {DOWNSTREAM_SEED}", "table": {m: v for m, v in down.items() if v}},
               write=not a.smoke)
    rec = report("ablation" if not a.smoke else "ablation_smoke",
                 {"steps": a.steps or sum(s[0] for s in c.stages), "image_size": c.stages[-1][1],
                  "seeds": [r["seed"] for r in runs["rice"]], "images": a.images, "eval_images": a.eval_images, "clusters": a.clusters,
                  "probe_layer": runs["rice"][0].get("layer"), "table": table, "layers": layers, "runs": runs},
                 write=not a.smoke)
    if not a.smoke:
        _plot(table)
    return rec


def _plot(table):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [k for k in table["rice"] if not k.startswith(("region_token", "ocr_loss") + DOWNSTREAM_TASKS)]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    w = 0.8 / len(METHODS)
    for i, m in enumerate(METHODS):
        ks = [k for k in metrics if k in table[m]]
        xs = [metrics.index(k) + i * w for k in ks]
        ax.bar(xs, [table[m][k]["mean"] for k in ks], w, yerr=[table[m][k]["std"] for k in ks], label=LABELS[m])
    ax.set_xticks(np.arange(len(metrics)) + 0.4 - w / 2, metrics, rotation=12)
    ax.axhline(1 / 12, color="grey", lw=0.8, ls="--", label="chance (12 categories)")
    ax.legend(fontsize=8)
    ax.set_title("frozen-backbone probes on held-out synthetic data (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(RESULTS / "ablation.png", dpi=90)


if __name__ == "__main__":
    main()
