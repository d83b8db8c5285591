"""The quickstart main job (``bash launch/quickstart.sh``), on 8 CPU-emulated devices:

synthetic region data -> OCR tokenizer -> clustering -> RICE pretraining (tiny,
with checkpoints) -> region-probe evaluation of the exported backbone (vs the
same architecture at random init) -> export to Hugging Face -> reload with
``transformers`` and compare outputs. Idempotent: a finished stage is reused,
an interrupted training run resumes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from rice_jax import backbones, cli, evaluate, plot, train
from rice_jax.labelling import clustering
from rice_jax.configs.rice import get_config
from rice_jax.data import records, synthetic, tokenizer
from rice_jax.mining import mine
from rice_jax.models import hf


def _stage(name: str) -> float:
    print(f"\n=== {name} ===", flush=True)
    return time.perf_counter()


def _config(arg: str):
    return get_config(arg)


def _dataset(path: Path, n: int, seed: int, vocab: int):
    if not (path / records.MANIFEST).exists():
        synthetic.build(str(path), n, seed=seed, progress=True)
    if not records.read_manifest(path).get("tokenizer"):
        tokenizer.build_for_dataset(path, vocab_size=vocab)


def _mined_dataset(workdir: Path, path: Path, n: int, seed: int, vocab: int, workers: int) -> None:
    """The raw-images path: the synthetic images saved as plain PNG files (their boxes, words and
    categories thrown away), then mined (Felzenszwalb proposals + RapidOCR) into ``path``. OCR
    reads these small images with its detector at short side 320 instead of 736 (3.6x faster,
    61 vs 64 of 86 words exact; ``ocr.RapidOCR``)."""

    raw = workdir / f"raw_images_s{seed}_n{n}"
    if not (path / records.MANIFEST).exists():
        done = raw / ".complete"
        if not done.exists():
            raw.mkdir(parents=True, exist_ok=True)
            for i, rec in enumerate(synthetic.generate(n, seed)):
                (raw / f"{i:07d}.png").write_bytes(rec.image)
            done.touch()
        mine.mine(str(path), images=str(raw), settings=mine.MiningSettings(proposals="felzenszwalb", ocr="rapidocr:side=320"),
                  workers=workers, images_per_unit=512)
    if not records.read_manifest(path).get("tokenizer"):
        tokenizer.build_for_dataset(path, vocab_size=vocab)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="runs/quickstart")
    ap.add_argument("--seed", type=int, default=0,
                    help="training data seed S; the held-out data uses S+1 and the model S")
    ap.add_argument("--num-images", type=int, default=8192)
    ap.add_argument("--eval-images", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=48)
    ap.add_argument("--steps", type=int, default=0, help="training steps (0 = the tiny config's)")
    ap.add_argument("--mine", action="store_true",
                    help="train on regions mined from the raw images (Felzenszwalb + RapidOCR) instead of the "
                         "generator's boxes and words; the held-out evaluation data keeps its ground truth")
    ap.add_argument("--mine-workers", type=int, default=2, help="mining processes")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    summary = {"seed": args.seed, "mined": args.mine}
    t_start = time.perf_counter()

    import jax

    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}")

    s = args.seed
    if args.mine:
        t = _stage("1. raw synthetic images -> mined regions (Felzenszwalb proposals + RapidOCR); held-out data "
                   "with ground truth; OCR tokenizer")
        train_dir = workdir / f"data_mined_s{s}_n{args.num_images}"
        _mined_dataset(workdir, train_dir, args.num_images, s, 512, args.mine_workers)
    else:
        t = _stage("1. synthetic region data (train + held-out) and OCR tokenizer")
        train_dir = workdir / f"data_train_s{s}_n{args.num_images}"
        _dataset(train_dir, args.num_images, s, 512)
    eval_dir = workdir / f"data_eval_s{s + 1}_n{args.eval_images}"
    _dataset(eval_dir, args.eval_images, s + 1, 512)

    m = records.read_manifest(train_dir)
    summary["data"] = {k: m[k] for k in ("num_images", "num_object_regions", "num_text_regions")}
    print(json.dumps(summary["data"]), f"({time.perf_counter() - t:.1f}s)")

    t = _stage("2. region clustering (handcrafted features -> spherical k-means)")

    if (m.get("clustering") or {}).get("k") != args.clusters:
        clustering.run(train_dir, args.clusters, seed=s)
    rep = records.read_manifest(train_dir)["clustering"]
    summary["clustering"] = {k: rep.get(k) for k in ("k", "nmi", "ari", "inertia")}
    print(f"({time.perf_counter() - t:.1f}s)")

    t = _stage("3. RICE pretraining (rice_jax/configs/rice.py:tiny, checkpoints in workdir/train)")

    c = _config("tiny")
    c.data.dir = str(train_dir)
    c.seed = s
    if args.steps:
        c.stages = ((args.steps, c.stages[0][1]),)
    image_size = c.stages[-1][1]
    # Its own run folder per data kind: `--mine` after a plain quickstart (or the other way round)
    # must train afresh, not resume the other data's finished checkpoint and report its figures.
    train_dir_run = workdir / (f"train_mined_s{s}" if args.mine else f"train_s{s}")
    if train.train(c, train_dir_run)["preempted"]:
        # SIGTERM: train wrote a checkpoint; evaluating a half-trained model would mislead.
        raise SystemExit("[quickstart] stopped by SIGTERM; run the same command again to resume")
    rows = [json.loads(l) for l in (train_dir_run / "metrics.jsonl").read_text().splitlines()]
    summary["train"] = {"loss_start": rows[0]["loss"], "loss_end": rows[-1]["loss"], "steps": rows[-1]["step"],
                        "images_per_s": float(np.median([r["images_per_s"] for r in rows[1:]] or [0])),
                        "mfu": float(np.median([r["mfu"] for r in rows[1:]] or [0])),
                        "skipped_updates": rows[-1]["skipped_updates_total"], "seconds": time.perf_counter() - t}

    summary["train"]["curves"] = str(plot.plot(train_dir_run))
    print(json.dumps(summary["train"]))

    t = _stage("4. region-probe evaluation of the backbone on held-out data (trained vs random init)")

    model = backbones.load(f"ckpt:{train_dir_run}", regions=True)   # the RICE model, region tokens as trained
    tok = tokenizer.for_dataset(eval_dir)
    summary["eval"] = {
        "trained": evaluate.evaluate_backbone(model, eval_dir, image_size, tok, all_layers=True),
        "random_init": evaluate.evaluate_backbone(evaluate.random_like(model, s), eval_dir, image_size, tok,
                                                  all_layers=True)}
    (workdir / "eval.json").write_text(json.dumps(summary["eval"], indent=2) + "\n")
    print(f"  probes read layer {summary['eval']['trained']['layer']} (patch tokens: ROI mean-pooled, and "
          "for OCR also their box's 2x4 RoIAlign layout) and the region tokens")
    for k, v in summary["eval"]["trained"].items():
        if k not in ("layer", "num_regions_test", "per_layer"):
            print(f"  {k:26s} trained {v:.3f}   random init {summary['eval']['random_init'].get(k, float('nan')):.3f}")

    t = _stage("5. export to Hugging Face and reload with transformers")

    vit = getattr(model, "backbone", model)   # what is exported: the plain ViT, without the region parameters
    out_dir = hf.save_hf(vit, workdir / "export_hf", torch_state_dict=True)
    x = np.random.default_rng(0).standard_normal((2, 64, 96, 3)).astype(np.float32)
    diffs = hf.compare_with_transformers(vit, out_dir, x)
    summary["export"] = {"dir": str(out_dir), "max_abs_diff": diffs}
    print(json.dumps(summary["export"]))
    if max(diffs.values()) > 1e-4:
        raise SystemExit(f"export parity failed: {diffs}")

    summary["seconds"] = time.perf_counter() - t_start
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    tr, ev = summary["train"], summary["eval"]
    print(f"\nDone in {summary['seconds']:.0f}s. loss {tr['loss_start']:.2f} -> {tr['loss_end']:.2f} over {tr['steps']} "
          f"steps ({tr['images_per_s']:.0f} img/s). outputs: {workdir} ({train_dir_run.name}/ checkpoints + metrics + "
          "curves.png, eval.json, export_hf/, summary.json)")
    cols = (("region_linear_acc", "region linear"), ("region_knn_acc", "region kNN"), ("dense_miou", "dense mIoU"),
            ("ocr_token_recall@5", "OCR recall@5 (mean-pooled)"), ("ocr_layout_recall@5", "OCR recall@5 (box layout)"),
            ("region_token_linear_acc", "region-token linear"),
            ("region_token_ocr_recall@5", "region-token OCR recall@5"))
    # Patch-feature probes (the exported ViT) first, then the model's own region tokens.
    print("held-out probes, trained vs random init: " + "   ".join(
        f"{name} {ev['trained'][k]:.3f} vs {ev['random_init'][k]:.3f}"
        for k, name in cols if k in ev["trained"] and k in ev["random_init"]))


if __name__ == "__main__":
    cli.run(main)
