"""Ablation: RICE (object + OCR region losses) vs global-only (MLCD-style) vs random init.

Same data, model, batch and step budget; several seeds; every method evaluated by
rice_jax.evaluate on the same held-out synthetic set (frozen exported backbone).
Writes benchmarks/results/ablation.json and ablation.png, prints one JSON line.

    python -m benchmarks.ablation [--steps 2000 --images 8192 --seeds 0 1]   # ~25 min on 2 cores
    python -m benchmarks.ablation --smoke
"""
from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, report

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("rice", "mlcd", "random_init")


def _config(arg):
    spec = importlib.util.spec_from_file_location("rice_cfg", ROOT / "configs" / "rice.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def prepare(root: Path, n_train: int, n_eval: int, k: int):
    from rice_jax import clustering
    from rice_jax.data import records, synthetic, tokenizer

    for name, n, seed in (("train", n_train, 0), ("eval", n_eval, 1)):
        d = root / name
        if not (d / records.MANIFEST).exists():
            synthetic.build(str(d), n, seed=seed)
            tokenizer.build_for_dataset(d, vocab_size=512)
    if (records.read_manifest(root / "train").get("clustering") or {}).get("k") != k:
        clustering.run(root / "train", k, log=lambda s: None)
    return root / "train", root / "eval"


def run_one(method: str, seed: int, train_dir: Path, eval_dir: Path, workdir: Path, steps: int, image: int):
    from flax import nnx

    from rice_jax import checkpoint, evaluate, train
    from rice_jax.data.tokenizer import OCRTokenizer
    from rice_jax.models.vit import ViT

    tok = OCRTokenizer(eval_dir)
    c = _config("tiny" if method != "mlcd" else "tiny,objective=mlcd")
    if method == "random_init":
        from rice_jax.models.config import get_preset

        vit = ViT(get_preset(c.model.backbone), rngs=nnx.Rngs(seed))
        return evaluate.evaluate_backbone(vit, eval_dir, image, tok), None
    c.data.dir, c.seed = str(train_dir), seed
    c.stages = ((steps, image),)
    c.progress_bar, c.checkpoint_every = False, 10**9
    s = train.train(c, workdir)
    return evaluate.evaluate_backbone(checkpoint.load_backbone(workdir), eval_dir, image, tok), \
        {"loss_start": s["history"][0]["loss"], "loss_end": s["history"][-1]["loss"]}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--clusters", type=int, default=48)
    ap.add_argument("--data-root", default=None, help="reuse generated data here")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    if a.smoke:
        a.steps, a.seeds, a.images, a.clusters = 4, [0], 64, 8
    image = 64
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.data_root or tmp)
        train_dir, eval_dir = prepare(root, a.images, max(64, a.images // 4), a.clusters)
        runs = {m: [] for m in METHODS}
        for seed in a.seeds:
            for m in METHODS:
                res, tr = run_one(m, seed, train_dir, eval_dir, Path(tmp) / f"{m}_{seed}", a.steps, image)
                runs[m].append({"seed": seed, **res, **(tr or {})})
    metrics = [k for k in runs["rice"][0] if k not in ("seed", "num_regions_test", "loss_start", "loss_end")]
    table = {m: {k: {"mean": float(np.mean([r[k] for r in runs[m]])), "std": float(np.std([r[k] for r in runs[m]]))}
                 for k in metrics} for m in METHODS}
    rec = report("ablation" if not a.smoke else "ablation_smoke",
                 {"steps": a.steps, "seeds": a.seeds, "images": a.images, "clusters": a.clusters, "table": table,
                  "runs": runs}, write=not a.smoke)
    if not a.smoke:
        _plot(table, metrics)
    return rec


def _plot(table, metrics):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    w = 0.8 / len(METHODS)
    for i, m in enumerate(METHODS):
        ax.bar(np.arange(len(metrics)) + i * w, [table[m][k]["mean"] for k in metrics], w,
               yerr=[table[m][k]["std"] for k in metrics], label=m)
    ax.set_xticks(np.arange(len(metrics)) + w, metrics, rotation=15)
    ax.legend()
    ax.set_title("frozen-backbone probes on held-out synthetic data (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(RESULTS / "ablation.png", dpi=90)


if __name__ == "__main__":
    main()
