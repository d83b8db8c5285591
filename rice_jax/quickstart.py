"""The quickstart main job (``bash launch/quickstart.sh``), on 8 CPU-emulated devices:

synthetic region data -> OCR tokenizer -> clustering -> RICE pretraining (tiny,
with checkpoints) -> region-probe evaluation of the exported backbone (vs the
same architecture at random init) -> export to Hugging Face -> reload with
``transformers`` and compare outputs. Idempotent: a finished stage is reused,
an interrupted training run resumes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _stage(name: str) -> float:
    print(f"\n=== {name} ===", flush=True)
    return time.perf_counter()


def _config(arg: str):
    spec = importlib.util.spec_from_file_location("rice_config", ROOT / "configs" / "rice.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def _dataset(path: Path, n: int, seed: int, vocab: int):
    from rice_jax.data import records, synthetic, tokenizer

    if not (path / records.MANIFEST).exists():
        synthetic.build(str(path), n, seed=seed, progress=True)
    if not records.read_manifest(path).get("tokenizer"):
        tokenizer.build_for_dataset(path, vocab_size=vocab)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="runs/quickstart")
    ap.add_argument("--num-images", type=int, default=1024)
    ap.add_argument("--eval-images", type=int, default=256)
    ap.add_argument("--clusters", type=int, default=48)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    summary = {}

    import jax

    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}")

    t = _stage("1. synthetic region data (train + held-out) and OCR tokenizer")
    train_dir, eval_dir = workdir / "data_train", workdir / "data_eval"
    _dataset(train_dir, args.num_images, 0, 512)
    _dataset(eval_dir, args.eval_images, 1, 512)
    from rice_jax.data import records

    m = records.read_manifest(train_dir)
    summary["data"] = {k: m[k] for k in ("num_images", "num_object_regions", "num_text_regions")}
    print(json.dumps(summary["data"]), f"({time.perf_counter() - t:.1f}s)")

    t = _stage("2. region clustering (handcrafted features -> spherical k-means)")
    from rice_jax import clustering

    if (m.get("clustering") or {}).get("k") != args.clusters:
        clustering.run(train_dir, args.clusters)
    rep = records.read_manifest(train_dir)["clustering"]
    summary["clustering"] = {k: rep.get(k) for k in ("k", "nmi", "ari", "inertia")}
    print(f"({time.perf_counter() - t:.1f}s)")

    t = _stage("3. RICE pretraining (configs/rice.py:tiny, checkpoints in workdir/train)")
    from rice_jax import train

    c = _config("tiny")
    c.data.dir = str(train_dir)
    c.stages = ((args.steps, 64),)
    c.checkpoint_every = 100
    train.train(c, workdir / "train")
    rows = [json.loads(l) for l in (workdir / "train" / "metrics.jsonl").read_text().splitlines()]
    summary["train"] = {"loss_start": rows[0]["loss"], "loss_end": rows[-1]["loss"], "steps": rows[-1]["step"],
                        "images_per_s": float(np.median([r["images_per_s"] for r in rows[1:]] or [0])),
                        "mfu": float(np.median([r["mfu"] for r in rows[1:]] or [0])),
                        "skipped_updates": rows[-1]["skipped_updates_total"], "seconds": time.perf_counter() - t}
    from rice_jax import plot

    summary["train"]["curves"] = str(plot.plot(workdir / "train"))
    print(json.dumps(summary["train"]))

    t = _stage("4. region-probe evaluation of the backbone on held-out data (trained vs random init)")
    from flax import nnx

    from rice_jax import checkpoint, evaluate
    from rice_jax.data.tokenizer import OCRTokenizer
    from rice_jax.models.vit import ViT

    vit = checkpoint.load_backbone(workdir / "train")
    tok = OCRTokenizer(eval_dir)
    summary["eval"] = {"trained": evaluate.evaluate_backbone(vit, eval_dir, 64, tok),
                       "random_init": evaluate.evaluate_backbone(ViT(vit.cfg, rngs=nnx.Rngs(0)), eval_dir, 64, tok)}
    (workdir / "eval.json").write_text(json.dumps(summary["eval"], indent=2) + "\n")
    for k in summary["eval"]["trained"]:
        print(f"  {k:22s} trained {summary['eval']['trained'][k]:.3f}   random init {summary['eval']['random_init'].get(k, float('nan')):.3f}")

    t = _stage("5. export to Hugging Face and reload with transformers")
    from rice_jax import export

    out_dir = export.save_hf(vit, workdir / "export_hf", torch_state_dict=True)
    x = np.random.default_rng(0).standard_normal((2, 64, 96, 3)).astype(np.float32)
    diffs = export.compare_with_transformers(vit, out_dir, x)
    summary["export"] = {"dir": str(out_dir), "max_abs_diff": diffs}
    print(json.dumps(summary["export"]))
    if max(diffs.values()) > 1e-4:
        raise SystemExit(f"export parity failed: {diffs}")

    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    tr = summary["train"]
    print(f"\nDone. loss {tr['loss_start']:.2f} -> {tr['loss_end']:.2f} over {tr['steps']} steps "
          f"({tr['images_per_s']:.0f} img/s, MFU {100 * tr['mfu']:.1f}%); "
          f"region probe {summary['eval']['trained'].get('region_linear_acc', float('nan')):.3f} "
          f"(random init {summary['eval']['random_init'].get('region_linear_acc', float('nan')):.3f}).")
    print(f"outputs: {workdir} (train/ checkpoints + metrics + curves.png, eval.json, export_hf/, summary.json)")


if __name__ == "__main__":
    main()
