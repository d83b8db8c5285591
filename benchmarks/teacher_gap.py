"""How far the student is from its teacher (issue 27's moonshot), over the clusters K and the budget.

The ablation trains RICE on K = 48 k-means clusters of the handcrafted teacher's features for
1-2K steps; its region probes stay below the teacher's own (0.878 at 64 px). Two levers a user
has are the number of centres (finer clusters merge fewer categories into one class, but also
split categories along the teacher's nuisance directions: which wins is measured here, and at
64 px about as many centres as categories won, docs/results.md) and the training budget. Per seed S (the ablation's
data: training images S, held-out images S + 1), for each K the training images are clustered
(handcrafted features, spherical k-means; the labels' NMI against the generator's 12 categories
is recorded) and RICE (`tiny`, 64 px) is trained for each budget in ``--steps``, then read by the
ablation's held-out probes (rice_jax.evaluate) beside the teacher's own probe.

Runs go to a process pool (``--parallel``; each run is one process with its own devices view),
so one accelerator host runs the whole grid at once; on 2 CPU cores keep ``--parallel 1``. The
result is rewritten after every finished run, and rows accumulate across invocations (each row is
one K, budget and machine kind; ``--fresh`` starts over). Writes benchmarks/results/teacher_gap.json and
teacher_gap.png.

    python -m benchmarks.teacher_gap [--seeds 0 1 2] [--clusters 48 192 768] [--steps 1000 4000] [--parallel 1]
    python -m benchmarks.teacher_gap --seeds 0 1 2 --parallel 9 --workers 1    # one GPU host, 16 cores
    python -m benchmarks.teacher_gap --smoke
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import shutil
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, load_result, report

KEEP = ("label_nmi", "region_linear_acc", "region_knn_acc", "region_token_linear_acc", "region_token_knn_acc",
        "dense_miou", "ocr_layout_recall@5", "region_token_ocr_recall@5")


def _prepare(seed: int, root: str, images: int, eval_images: int, clusters: tuple) -> dict:
    """The seed's data (ablation.prepare, K = the first of ``clusters``) and one labelled copy of the
    training images per further K; the teacher's own probe on the held-out images."""
    from benchmarks.ablation import prepare, teacher_probes
    from rice_jax.labelling import clustering
    from rice_jax.configs.rice import get_config
    from rice_jax.data import records

    root = Path(root)
    dirs = prepare(root, seed, images, eval_images, clusters[0])
    train = {clusters[0]: str(dirs["train"])}
    for k in clusters[1:]:
        d = root / f"train_s{seed}_k{k}"
        labelled = d.exists() and (records.read_manifest(d).get("clustering") or {}).get("k") == k
        if not labelled:
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(dirs["train"], d)
            clustering.run(d, k, seed=seed, log=lambda s: None)
        train[k] = str(d)
    nmi = {k: (records.read_manifest(d).get("clustering") or {}).get("nmi") for k, d in train.items()}
    teacher = teacher_probes(dirs["eval"], get_config("tiny").stages[-1][1])
    return {"seed": seed, "train": train, "eval": str(dirs["eval"]), "nmi": nmi, "teacher": teacher}


def _run(job: dict) -> dict:
    """One training run and its held-out probes (a pool worker)."""
    import jax

    from benchmarks.ablation import evaluate_run, train_tiny

    s, seconds = train_tiny(job["train"], job["workdir"], job["seed"], job["steps"], workers=job["workers"])
    res = evaluate_run(job["workdir"], job["eval"])
    shutil.rmtree(job["workdir"], ignore_errors=True)
    return {"seed": job["seed"], "clusters": job["clusters"], "steps": job["steps"], "backend": jax.default_backend(),
            "jax": jax.__version__, "train_seconds": seconds,
            "loss_end": s["history"][-1]["loss"], **{k: v for k, v in res.items() if isinstance(v, float)}}


def _key(r: dict) -> tuple:
    """A table row: runs of one K, budget and machine kind (figures of a GPU and a CPU run differ)."""
    return r["clusters"], r["steps"], r["backend"]


def _table(runs: list[dict], teacher: list[dict]) -> dict:
    cells = {}
    for r in runs:
        cells.setdefault(_key(r), []).append(r)
    table = {}
    for key, rs in sorted(cells.items()):
        table["k{}_steps{}_{}".format(*key)] = {
            "clusters": key[0], "steps": key[1], "backend": key[2], "seeds": sorted(r["seed"] for r in rs),
            **{k: {"mean": float(np.mean([r[k] for r in rs])), "std": float(np.std([r[k] for r in rs]))}
               for k in KEEP if all(r.get(k) is not None for r in rs)}}
    table["teacher"] = {k: {"mean": float(np.mean([t[k] for t in teacher])), "std": float(np.std([t[k] for t in teacher]))}
                        for k in ("region_linear_acc", "region_knn_acc")}
    return table


def _plot(table: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    rows = [v for k, v in table.items() if k != "teacher"]
    for ax, metric, title in ((axes[0], "region_token_linear_acc", "region tokens"),
                              (axes[1], "region_linear_acc", "patch features (ROI mean)")):
        for n, backend in sorted({(r["steps"], r["backend"]) for r in rows}):
            pts = sorted((r["clusters"], r[metric]["mean"], r[metric]["std"]) for r in rows
                         if (r["steps"], r["backend"]) == (n, backend) and metric in r)
            if pts:
                xs, ms, ss = zip(*pts)
                ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=f"{n} steps ({backend})")
        t = table["teacher"]["region_linear_acc"]
        ax.axhline(t["mean"], color="k", ls="--", lw=1, label="teacher's own probe")
        ax.set_xscale("log")
        ks = sorted({r["clusters"] for r in rows})
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("k-means centres K (handcrafted teacher features)")
        ax.set_title(f"held-out region linear probe: {title}", fontsize=9)
    axes[0].set_ylabel("accuracy (12 categories)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "teacher_gap.png", dpi=90)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--images", type=int, default=8192, help="training images generated per seed")
    ap.add_argument("--eval-images", type=int, default=512, help="held-out images (generator seed + 1)")
    ap.add_argument("--data-root", default=None, help="keep the generated data here between runs")
    ap.add_argument("--clusters", type=int, nargs="+", default=[48, 192, 768])
    ap.add_argument("--steps", type=int, nargs="+", default=[1000, 4000], help="training budgets (one run each)")
    ap.add_argument("--fresh", action="store_true", help="drop the runs benchmarks/results/teacher_gap.json holds")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--parallel", type=int, default=1, help="runs at once (processes)")
    ap.add_argument("--workers", default="auto", help="data.workers of each run (with --parallel N > 1 on a "
                                                      "big host: about cores / N - 1)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.steps, a.seeds, a.images, a.eval_images, a.clusters, a.parallel = [4], [0], 64, 64, [8, 12], 1
    ctx = mp.get_context("spawn")   # each worker initialises its own jax backend
    mine, preps, rec = [], [], None
    with tempfile.TemporaryDirectory() as tmp, cf.ProcessPoolExecutor(max(a.parallel, 1), mp_context=ctx) as pool:
        root = a.data_root or tmp
        preps = list(pool.map(_prepare, a.seeds, [root] * len(a.seeds), [a.images] * len(a.seeds),
                              [a.eval_images] * len(a.seeds), [tuple(a.clusters)] * len(a.seeds)))
        jobs = [{"seed": p["seed"], "clusters": k, "steps": n, "train": p["train"][k], "eval": p["eval"], "workers": a.workers,
                 "workdir": str(Path(tmp) / f"run_s{p['seed']}_k{k}_n{n}")}
                for p in preps for n in a.steps for k in a.clusters]
        for fut in cf.as_completed([pool.submit(_run, j) for j in jobs]):
            r = fut.result()
            r["label_nmi"] = next(p["nmi"][r["clusters"]] for p in preps if p["seed"] == r["seed"])
            mine.append(r)
            print(f"[teacher_gap] seed {r['seed']} K {r['clusters']} {r['steps']} steps: region-token linear "
                  f"{r.get('region_token_linear_acc', float('nan')):.3f}, region linear {r['region_linear_acc']:.3f} "
                  f"({r['train_seconds']:.0f} s)", flush=True)
            # Rows accumulate across invocations (a GPU host's grid, then CPU runs of other K): the
            # file's runs are kept but for the (seed, K, budget, machine) this invocation re-ran.
            old = {} if a.fresh or a.smoke else (load_result("teacher_gap") or {})
            done = {(r["seed"], *_key(r)) for r in mine}
            runs = [r for r in old.get("runs", []) if (r["seed"], *_key(r)) not in done] + mine
            teacher = {t["seed"]: t for t in old.get("teacher", []) if "seed" in t}
            teacher.update({p["seed"]: {"seed": p["seed"], **p["teacher"]} for p in preps})
            rec = report("teacher_gap" if not a.smoke else "teacher_gap_smoke",
                         {"images": a.images, "eval_images": a.eval_images, "image_size": 64,
                          "table": _table(runs, list(teacher.values())), "teacher": list(teacher.values()),
                          "runs": runs}, write=not a.smoke)
            if not a.smoke:   # the plot too, so a grid cut short keeps both
                _plot(rec["table"])
    return rec


if __name__ == "__main__":
    main()
