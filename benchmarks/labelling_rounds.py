"""A second labelling round (beyond the paper): re-cluster with the trained model's own region
tokens, train again, and compare with round 1 and with the handcrafted teacher it learned from.

Per seed S, on the ablation's data (training images S, held-out images S + 1, K clusters):

- ``round1``: RICE on k-means labels of the handcrafted teacher's features (the ablation's row);
- ``round2_scratch``: the training images re-clustered (same K, ``--extractor regions:ckpt:ROUND1``)
  and a fresh model trained on those labels with the same budget: are the labels better?
- ``round2_continue``: the same labels, training continued from round 1's checkpoint
  (``init_from=ckpt:ROUND1``: backbone and region parameters; the centres start afresh because
  the classes changed) for the same budget again, against
- ``round1_2x``: round 1 trained for twice the budget (what the continued run spent in total).

Every row is read by the same held-out probes as the ablation (rice_jax.evaluate); ``teacher``
is the handcrafted features' own probe. Writes benchmarks/results/labelling_rounds.json.

    python -m benchmarks.labelling_rounds [--seeds 0] [--steps 1000] [--data-root DIR]
    python -m benchmarks.labelling_rounds --smoke
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.ablation import evaluate_run, prepare, teacher_probes, train_tiny
from benchmarks.common import add_synthetic_run_flags, report

VARIANTS = ("round1", "round2_scratch", "round2_continue", "round1_2x", "teacher")


def run_seed(seed: int, root: Path, work: Path, a) -> dict:
    from rice_jax.labelling import clustering
    from rice_jax.configs.rice import get_config

    dirs = prepare(root, seed, a.images, a.eval_images, a.clusters)
    out = {"teacher": teacher_probes(dirs["eval"], get_config("tiny").stages[-1][1])}
    r1 = work / f"round1_{seed}"
    s1, t1 = train_tiny(dirs["train"], r1, seed, a.steps)
    from rice_jax.data import records

    # How good each round's labels are: NMI of the clusters against the generator's categories.
    nmi1 = (records.read_manifest(dirs["train"]).get("clustering") or {}).get("nmi")
    out["round1"] = {**evaluate_run(r1, dirs["eval"]), "train_seconds": t1, "loss_end": s1["history"][-1]["loss"],
                     "label_nmi": nmi1}
    # Round 2's labels: the same images clustered with round 1's own region tokens (a copy of the
    # data, so the ablation's handcrafted labels stay where they are).
    relabelled = root / f"round2_s{seed}"
    if relabelled.exists():
        shutil.rmtree(relabelled)
    shutil.copytree(dirs["train"], relabelled)
    t = time.perf_counter()
    rep = clustering.run(relabelled, a.clusters, extractor=f"regions:ckpt:{r1}", seed=seed,
                         features_dir=work / f"features_{seed}", log=lambda s: None)
    cluster_seconds = time.perf_counter() - t
    for name, init in (("round2_scratch", ""), ("round2_continue", f"ckpt:{r1}")):
        wd = work / f"{name}_{seed}"
        s, secs = train_tiny(relabelled, wd, seed, a.steps, init)
        out[name] = {**evaluate_run(wd, dirs["eval"]), "train_seconds": secs, "loss_end": s["history"][-1]["loss"],
                     "cluster_seconds": cluster_seconds, "clusters_used": rep.get("clusters_used"),
                     "label_nmi": rep.get("nmi")}
    if not a.no_2x:
        wd = work / f"round1_2x_{seed}"
        s, secs = train_tiny(dirs["train"], wd, seed, 2 * a.steps)
        out["round1_2x"] = {**evaluate_run(wd, dirs["eval"]), "train_seconds": secs, "loss_end": s["history"][-1]["loss"]}
    for name, res in out.items():
        print(f"[rounds] seed {seed} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()
                                                          if isinstance(v, float) and not k.endswith("seconds")),
              flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    add_synthetic_run_flags(ap, steps=1000, seeds=[0], images=8192, steps_help="training steps of each round")
    ap.add_argument("--clusters", type=int, default=48)
    ap.add_argument("--no-2x", action="store_true", help="skip the round-1-for-twice-the-budget control")
    a = ap.parse_args(argv)
    if a.smoke:
        a.steps, a.seeds, a.images, a.eval_images, a.clusters, a.no_2x = 4, [0], 64, 64, 8, True
    runs = {v: [] for v in VARIANTS}
    rec = None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.data_root or tmp)
        for seed in a.seeds:
            for name, res in run_seed(seed, root, Path(tmp), a).items():
                runs[name].append({"seed": seed, **res})
            keep = ("label_nmi", "region_linear_acc", "region_knn_acc", "region_token_linear_acc", "region_token_knn_acc",
                    "dense_miou", "ocr_token_recall@5", "region_token_ocr_recall@5")
            table = {v: {k: {"mean": float(np.mean([r[k] for r in rs])), "std": float(np.std([r[k] for r in rs]))}
                         for k in keep if rs and rs[0].get(k) is not None} for v, rs in runs.items() if rs}
            rec = report("labelling_rounds" if not a.smoke else "labelling_rounds_smoke",
                         {"steps": a.steps, "seeds": [r["seed"] for r in runs["round1"]], "images": a.images,
                          "eval_images": a.eval_images, "clusters": a.clusters, "table": table, "runs": runs},
                         write=not a.smoke)
    return rec


if __name__ == "__main__":
    main()
