"""Regenerate the generated tables of the README and docs/*.md from benchmarks/results/*.json.

Each table lives between ``<!-- BEGIN name -->`` / ``<!-- END name -->`` markers in whichever page
holds them (docs/performance.md, docs/data.md, docs/results.md, README.md); a section found in no
page, or in two, is an error.
    python -m benchmarks.readme_tables
"""
from __future__ import annotations

import dataclasses
import json
import re
import statistics
from pathlib import Path

from benchmarks.common import RESULTS, load_result

README = Path(__file__).resolve().parents[1] / "README.md"


def performance() -> str:
    rows = ["| benchmark | JAX | PyTorch eager | ratio |", "|---|---|---|---|"]
    v, t = load_result("vit_forward"), load_result("train_step")
    if v:
        rows.append(f"| ViT-B/16 @ {v['image_size']} forward, batch {v['batch']} (`vit_forward.py`) | "
                    f"{v['jax_images_per_s']:.1f} img/s | {v['torch_images_per_s']:.1f} img/s | {v['jax_over_torch']:.2f}× |")
        rows.append(f"| RICE forward vs plain ViT (N={v['rice']['num_regions']}, k={v['rice']['region_layers']}) | "
                    f"{100 * v['rice']['overhead']:+.1f}% | | |")
    e = load_result("teacher_extraction")
    if e:
        rows.append(f"| teacher ROI features, {e['teacher']}, batch {e['batch']} x {e['regions_per_image']} boxes "
                    f"(`teacher_extraction.py`) | {e['jax_regions_per_s_per_device']:.0f} regions/s | "
                    f"{e['torch_regions_per_s']:.0f} regions/s | {e['jax_over_torch']:.2f}× |")
    if t:
        g, r, pt = t["jax_global_only"], t["jax_rice"], t["torch_global_only"]
        rows.append(f"| train step, global-only objective, batch {t['batch']} (`train_step.py`) | {g['step_s']:.2f} s, "
                    f"MFU {100 * g['mfu']:.0f}% | {pt['step_s']:.2f} s ({100 * pt['mfu_at_jax_flops']:.0f}% at the same FLOPs) | "
                    f"{t['jax_over_torch_same_objective']:.2f}× |")
        rows.append(f"| train step, RICE objective (N={t['regions']}) | {r['step_s']:.2f} s, MFU {100 * r['mfu']:.0f}% | — | |")
        rows.append(f"\nPeak measured in the same run: torch.matmul {t['peak_flops']['torch_matmul'] / 1e9:.0f} GFLOP/s, "
                    f"jnp.dot {t['peak_flops']['jax_dot'] / 1e9:.0f} GFLOP/s (2048², fp32); MFU is against "
                    f"{t['peak_flops']['peak'] / 1e9:.0f} GFLOP/s, the peak the train loop uses.")
    i, c = load_result("input_pipeline"), load_result("clustering")
    if i and "runs" in i and "default_workers" in i:
        rows += ["", f"Input pipeline on real-photo JPEG records (`input_pipeline.py`, `benchmarks.photos`; "
                     f"N = {i['num_regions']}, batch {i['batch']}, {i['cores']} cores, `data.workers=auto` = "
                     f"{i['default_workers']} worker processes here). Floor = cores × the bare one-core decode + crop + "
                     f"resize rate, measured in alternation with the pipeline ({i['rounds']} rounds); ratio = pipeline "
                     "/ floor, median over rounds. Threads: the whole per-example transform in 2 threads of one "
                     "process over 1 thread, and the serial (locked) share that implies.", "",
                 "| source JPEG | output | bare, img/s/core | default | 1 worker | 2 workers | 2 threads (serial share) "
                 "| JPEG draft: speed-up, pixel diff mean / p95 |", "|---|---|---|---|---|---|---|---|"]
        for r in i["runs"]:
            cell = lambda k: f"{r['pipeline'][k]['images_per_s']:.0f} img/s ({r['pipeline'][k]['ratio_to_cores_x_bare']:.2f}×)"
            th = r["threads"]
            rows.append(f"| {r['source']}, {r['jpeg_kib']:.0f} KiB | {r['image_size']} px | {r['bare_one_core']:.0f} | "
                        f"{cell('default')} | {cell('workers_1')} | {cell('workers_2')} | {th['speedup']:.2f}× "
                        f"({th['serial_fraction']:.2f}) | {r['draft_speedup']:.2f}×, "
                        f"{r['draft_pixel_difference']['mean']:.2f} / {r['draft_pixel_difference']['p95']:.2f} |")
        for t in i.get("training", []):
            rows.append(f"\nShort training run on the photo records (`tiny` model, 8 CPU devices on the same 2 cores, "
                        f"batch {t['batch']}) at {t['image_size']} px: {t['images_per_s']:.0f} img/s, "
                        f"{t['step_time_s']:.3f} s/step, `data_wait_fraction` {t['data_wait_fraction']:.3f} "
                        f"(median of the logged intervals after the compile); loss {t['loss_first']:.2f} → {t['loss_last']:.2f}.")
        main_ms = max(r["pipeline"]["workers_2"]["main_process_ms_per_image"] for r in i["runs"])
        rows += ["", f"With 2 workers the consuming process spent at most {main_ms:.3f} ms of CPU per image (receiving "
                     f"and joining worker batches): one trainer process can take in ~{1e3 / max(main_ms, 1e-6):,.0f} img/s.", ""]
    if c:
        rows.append(f"Clustering: extraction {c['extract_regions_per_s']:.0f} regions/s ({c['extractor']}), "
                    f"assignment {c['assign_regions_per_s']:.0f} regions/s at K={c['K']}, D={c['D']}.")
    if e:
        proj = "; ".join(f"{name} {p['hours']:.1f} h" for name, p in e["projection"].items())
        rows.append(f"Teacher features for the paper's {e['paper_regions'] / 1e9:.0f}B regions "
                    f"({e['paper_images'] / 1e6:.0f}M images, {e['flops_per_image'] / 1e9:.1f} GFLOP each, "
                    f"datasheet bf16 peak at an assumed {100 * e['mfu_assumed']:.0f}% MFU): {proj}.")
        g = e.get("mlp_gemm_flop_rate")
        if g:
            rows.append(f"The teacher's ratio is its GEMM's: the tower's MLP matmul ({g['shape'][0]} x {g['shape'][1]} "
                        f"@ {g['shape'][1]} x {g['shape'][2]}, fp32) runs at {g['jax'] / 1e9:.0f} GFLOP/s in XLA:CPU "
                        f"and {g['torch'] / 1e9:.0f} in PyTorch (oneDNN) on the same cores "
                        f"({g['jax'] / g['torch']:.2f}×); matmuls are most of both forwards.")
    return "\n".join(rows)


def ablation() -> str:
    a = load_result("ablation")
    if not a:
        return "(run `python -m benchmarks.ablation`)"
    t = a["table"]
    methods = [m for m in ("rice", "mlcd", "rice_oracle", "random_init", "teacher") if m in t]
    names = {"rice": "RICE", "mlcd": "global-only (MLCD-style)", "rice_oracle": "RICE, oracle labels (upper bound)",
             "random_init": "random init", "teacher": "handcrafted teacher"}
    # The downstream tasks' metrics have their own table (README, downstream_synthetic).
    metrics = list(dict.fromkeys(k for m in methods for k in t[m] if not k.startswith(("refseg", "semseg", "regcls"))))
    rows = [f"{a['images']} synthetic training images (K = {a['clusters']} k-means clusters of handcrafted features), "
            f"{a['steps']} steps of the `tiny` config at {a.get('image_size', 64)} px, seeds {a['seeds']} "
            f"(mean ± std over seeds; held-out images; probes read layer {a.get('probe_layer', -1)}); "
            "chance ≈ 0.083 for the 12-category probes.\n",
            "| metric | " + " | ".join(names[m] for m in methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for k in metrics:
        cells = [f"{t[m][k]['mean']:.3f} ± {t[m][k]['std']:.3f}" if k in t[m] else "—" for m in methods]
        rows.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def ablation_summary() -> str:
    """The README's view of the ablation: the headline probes per method (docs/results.md has all)."""
    a = load_result("ablation")
    if not a:
        return "(run `python -m benchmarks.ablation`)"
    t, n = a["table"], len(a["seeds"])
    names = {"rice": "RICE", "mlcd": "global-only (MLCD-style)", "rice_oracle": "RICE, oracle labels",
             "random_init": "random init", "teacher": "handcrafted teacher"}
    cols = (("region_linear_acc", "region linear"), ("region_token_linear_acc", "region-token linear"),
            ("dense_miou", "dense mIoU"), ("ocr_layout_recall@5", "OCR recall@5 (box layout)"),
            ("region_token_ocr_recall@5", "region-token OCR recall@5"))
    rows = [f"{a['steps']} steps of `tiny` at {a.get('image_size', 64)} px per method, seeds {a['seeds']}, "
            "held-out synthetic images; OCR loss (near step 100 → last 10 %) where the method has one.\n",
            "| method | " + " | ".join(c for _, c in cols) + " | OCR loss |", "|---" * (len(cols) + 2) + "|"]
    for m in (m for m in names if m in t):
        loss = (f"{t[m]['ocr_loss_100']['mean']:.2f} → {t[m]['ocr_loss_end']['mean']:.2f}"
                if "ocr_loss_end" in t[m] else "—")
        rows.append(f"| {names[m]} | " + " | ".join(_mean_std(t[m][k]["mean"], t[m][k]["std"], n) if k in t[m] else "—"
                                                  for k, _ in cols) + f" | {loss} |")
    return "\n".join(rows)


DOWNSTREAM_NAMES = {"rice": "RICE", "mlcd": "global-only (MLCD-style)", "rice_oracle": "RICE, oracle labels",
                    "random_init": "random init"}
DOWNSTREAM_COLUMNS = (("refseg_ciou", "referring seg. cIoU"), ("refseg_giou", "referring seg. gIoU"),
                      ("semseg_miou", "semantic seg. mIoU (linear)"), ("regcls_top1", "region cls. top-1 (ROI)"),
                      ("regcls_region_token_top1", "region cls. top-1 (region token)"))


def downstream_synthetic() -> str:
    a = load_result("downstream_synthetic")
    if not a:
        return "(run `python -m benchmarks.ablation`: it runs the synthetic downstream tasks on every method)"
    t = a["table"]
    methods = [m for m in DOWNSTREAM_NAMES if m in t]
    cols = [(k, n) for k, n in DOWNSTREAM_COLUMNS if any(k in t[m] for m in methods)]
    n = len(a["seeds"])
    rows = [f"Frozen backbones of the ablation ({a['backbone_steps']} training steps, seeds {a['seeds']}), light "
            f"heads trained on {a['images'] // 2} synthetic images (generator seed {a['data_seed']}) and "
            f"evaluated on {a['images'] // 2} others at their original resolution; mean ± std over seeds.\n",
            "| backbone | " + " | ".join(name for _, name in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in methods:
        rows.append(f"| {DOWNSTREAM_NAMES[m]} | " + " | ".join(
            _mean_std(t[m][k]["mean"], t[m][k]["std"], n) if k in t[m] else "—" for k, _ in cols) + " |")
    return "\n".join(rows)


def downstream() -> str:
    """The table command's results files (``python -m rice_jax.downstream --out benchmarks/results/downstream*.json``)."""
    from rice_jax.downstream.table import markdown

    files = sorted(p for p in RESULTS.glob("downstream*.json") if not p.stem.startswith("downstream_synthetic"))
    if not files:
        return ("(no results yet: run `python -m rice_jax.downstream ... --out benchmarks/results/downstream.json` "
                "with the TFDS data prepared, then `python -m benchmarks.readme_tables`)")
    return "\n\n".join(f"`{p.name}`:\n\n" + markdown(json.loads(p.read_text())["rows"]) for p in files)


def labelling_rounds() -> str:
    a = load_result("labelling_rounds")
    if not a:
        return "(run `python -m benchmarks.labelling_rounds`)"
    t = a["table"]
    names = {"round1": "round 1 (handcrafted-feature clusters)", "round2_scratch": "round 2, from scratch",
             "round2_continue": "round 2, continued from round 1", "round1_2x": "round 1, twice the steps",
             "teacher": "handcrafted teacher"}
    variants = [v for v in names if v in t]
    steps = {"round1": a["steps"], "round2_scratch": a["steps"], "round2_continue": 2 * a["steps"],
             "round1_2x": 2 * a["steps"]}
    metrics = list(dict.fromkeys(k for v in variants for k in t[v]))
    n = len(a["seeds"])
    rows = [f"{a['images']} training images, K = {a['clusters']}, seeds {a['seeds']}; held-out probes as in the "
            "ablation (total training steps in the header).\n",
            "| metric | " + " | ".join(f"{names[v]}" + (f" ({steps[v]} steps)" if v in steps else "") for v in variants)
            + " |", "|---" * (len(variants) + 1) + "|"]
    for k in metrics:
        rows.append(f"| {k} | " + " | ".join(_mean_std(t[v][k]["mean"], t[v][k]["std"], n) if k in t[v] else "—"
                                            for v in variants) + " |")
    return "\n".join(rows)


def teacher_gap() -> str:
    a = load_result("teacher_gap")
    if not a:
        return "(run `python -m benchmarks.teacher_gap`)"
    t = a["table"]
    cells = [v for k, v in t.items() if k != "teacher"]
    cols = (("label_nmi", "label NMI"), ("region_token_linear_acc", "region-token linear"),
            ("region_token_knn_acc", "region-token kNN"), ("region_linear_acc", "region linear (patches)"),
            ("region_knn_acc", "region kNN (patches)"), ("ocr_layout_recall@5", "OCR recall@5 (box layout)"))
    kinds = "; ".join(f"`{b}`: jax {', '.join(sorted({r['jax'] for r in a['runs'] if r['backend'] == b}))}"
                      for b in sorted({r["backend"] for r in a["runs"]}))
    rows = [f"{a['images']} training images a seed, held-out probes as in the ablation, `tiny` at "
            f"{a.get('image_size', 64)} px; mean ± std over the seeds each row names; each row is one machine "
            f"kind ({kinds}). "
            f"The teacher's own probe (seeds {sorted(t_['seed'] for t_ in a['teacher'])}): region linear "
            f"{t['teacher']['region_linear_acc']['mean']:.3f} ± {t['teacher']['region_linear_acc']['std']:.3f}, "
            f"kNN {t['teacher']['region_knn_acc']['mean']:.3f} ± {t['teacher']['region_knn_acc']['std']:.3f}.\n",
            "| K | steps | machine | seeds | " + " | ".join(n for _, n in cols) + " |", "|---" * (len(cols) + 4) + "|"]
    for c in cells:
        n = len(c["seeds"])
        rows.append(f"| {c['clusters']} | {c['steps']} | {c['backend']} | {', '.join(map(str, c['seeds']))} | " + " | ".join(
            _mean_std(c[k]["mean"], c[k]["std"], n) if k in c else "—" for k, _ in cols) + " |")
    return "\n".join(rows)


def layers() -> str:
    a = load_result("ablation")
    if not a or "layers" not in a:
        return "(run `python -m benchmarks.ablation`)"
    names = {"rice": "RICE", "mlcd": "global-only", "rice_oracle": "RICE, oracle labels", "random_init": "random init"}
    methods = [m for m in names if m in a["layers"]]
    depth = sorted(a["layers"][methods[0]], key=int)
    label = lambda l: "patch embedding" if l == "0" else f"after block {l}"
    rows = ["| layer | " + " | ".join(names[m] for m in methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for l in depth:
        rows.append(f"| {label(l)} | " + " | ".join(
            f"{a['layers'][m][l]['region_linear_acc']:.3f} / {a['layers'][m][l]['region_knn_acc']:.3f}"
            for m in methods) + " |")
    return "\n".join(rows)


def replace_section(text: str, name: str, body: str) -> str:
    pat = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
    if not pat.search(text):
        raise ValueError(f"README has no <!-- BEGIN {name} --> ... <!-- END {name} --> markers")
    return pat.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def kmeans() -> str:
    r = load_result("kmeans")
    if not r:
        return "(run `python -m benchmarks.kmeans`)"
    names = {"jax_mesh_1dev": "rice_jax mesh k-means, 1 device (the CPU)",
             "jax_mesh_8dev": f"rice_jax mesh k-means, {r['devices']} CPU-emulated devices on the same 2 cores "
                              "(centres sharded along K)",
             "faiss_cpu": "faiss-cpu `Kmeans` (spherical)", "sklearn_minibatch": "scikit-learn `MiniBatchKMeans`"}
    rows = [f"N = {r['N']:,} unit features, D = {r['D']}, K = {r['K']:,}, {r['passes']} passes, same features and "
            "initial centres (MiniBatchKMeans: same number of sweeps over the data); inertia = Σ squared distance "
            "on the sphere to the nearest normalised centre, computed the same way for all.", "",
            "| method | s / pass | final inertia |", "|---|---|---|"]
    for key, label in names.items():
        m = r["methods"].get(key, {})
        if "seconds_per_pass" in m:
            rows.append(f"| {label} | {m['seconds_per_pass']:.1f} | {m['inertia']:.6g} |")
        else:
            rows.append(f"| {label} | {m.get('skipped', 'not run')} | |")
    mem = r["memory_per_device_k1m"]
    by = mem["by_devices"]
    rows += ["", f"Mesh k-means at K = {mem['K']:,}, D = {mem['D']} (compiled per-device memory of one step, "
                 f"batch {mem['batch']}; nothing allocated):", "",
             "| devices | arguments | temporaries | total |", "|---|---|---|---|"]
    for w, m in sorted(by.items(), key=lambda kv: int(kv[0])):
        rows.append(f"| {w} | {m['argument_bytes'] / 2**20:.0f} MiB | {m['temp_bytes'] / 2**20:.0f} MiB | "
                    f"{m['total_bytes'] / 2**20:.0f} MiB |")
    p = r["projection"]
    j, f = r["methods"].get("jax_mesh_1dev", {}), r["methods"].get("faiss_cpu", {})
    if "seconds_per_pass" in j and "seconds_per_pass" in f:
        rows += ["", f"Mesh k-means (1 device) / faiss-cpu time per pass: "
                     f"{j['seconds_per_pass'] / f['seconds_per_pass']:.2f}×; inertia ratio "
                     f"{j['inertia'] / f['inertia']:.5f}."]
    sw = load_result("kmeans_sweep")
    if sw and "points" in sw:
        rows += ["", f"Mesh k-means (1 device) against faiss-cpu over sizes (`--sweep`): N = {sw['N']:,} rows, "
                     f"{sw['passes']} passes, same features and initial centres, {sw['seeds']} seeds per size "
                     "(features, init and splits change with the seed). Scoring rate = 2·N·K·D per pass over "
                     "the measured pass time, next to the same run's matmul rate at the scoring's "
                     f"`[8192, D] @ [D, K]` shape and the square-2048 peak ({sw['peak_flops'] / 1e9:.0f} GFLOP/s).",
                 "", "| D | K | time / faiss (per seed) | inertia / faiss (per seed) | scoring GFLOP/s | faiss GFLOP/s "
                 "| shape matmul GFLOP/s |", "|---|---|---|---|---|---|---|"]
        by = {}
        for pt in sw["points"]:
            by.setdefault((pt["D"], pt["K"]), []).append(pt)
        for (d, k), pts in by.items():
            rows.append(f"| {d} | {k:,} | " + ", ".join(f"{p['time_ratio_jax_over_faiss']:.2f}" for p in pts)
                        + " | " + ", ".join(f"{p['inertia_ratio_jax_over_faiss']:.4f}" for p in pts)
                        + f" | {_mean([p['jax_scoring_flop_rate'] for p in pts]) / 1e9:.0f}"
                        + f" | {_mean([2 * sw['N'] * k * d / p['seconds_per_pass_faiss'] for p in pts]) / 1e9:.0f}"
                        + f" | {pts[0]['shape_matmul_flop_rate'] / 1e9:.0f} |")
        frates = [2 * sw['N'] * p['K'] * p['D'] / p['seconds_per_pass_faiss'] / 1e9 for p in sw["points"]]
        rows += ["", f"Worst point: time {sw['max_time_ratio']:.2f}× faiss-cpu's, inertia "
                     f"{sw['max_inertia_ratio']:.4f}× its. faiss-cpu's pass ran at {min(frates):.0f}–"
                     f"{max(frates):.0f} GFLOP/s here, below the same shapes' `jnp` matmul rate, so the time "
                     "ratio measures this machine's faiss wheel as much as the k-means; the inertia ratio is "
                     "the algorithms' (the same Lloyd passes; the difference is where empty clusters are "
                     "re-seeded: greedy by squared error here, random by size in faiss)."]
    rows += ["", f"One Lloyd pass over the paper's 2B regions × 1M centres × D = 1024 is "
                 f"{p['flops_per_pass_2B_x_1M_x_1024']:.2g} FLOPs: {p['this_machine_hours_per_pass']:,.0f} h on this "
                 f"machine at the rate measured here ({r['jax_flop_rate'] / 1e9:.0f} GFLOP/s), "
                 f"{p['v5p_256_chips_minutes_per_pass_at_50pct']:.1f} min on 256 TPU v5p chips ({p['assumption']}) "
                 "with bf16 scoring (`--score-precision auto`'s choice on TPU/GPU), the scoring that projection "
                 "assumes; float32 multiplies at HIGHEST precision, about six bf16 passes on a TPU's matrix unit, "
                 "so ≈ 6× that."]
    pr = load_result("kmeans_precision")
    if pr:
        runs = pr["runs"]
        fmt = lambda key, f: ", ".join(f.format(x[key]) for x in runs)
        plain = (f", plain bf16 scores (no rescoring) {fmt('plain_bf16_agreement', '{:.4f}')}"
                 if "plain_bf16_agreement" in runs[0] else "")
        rows += ["", f"bf16 scoring (bf16 matmuls, each row's two best centres rescored in float32) vs float32, same "
                     f"features and init, N = {pr['N']:,}, D = {pr['D']}, "
                     f"K = {pr['K']:,}, {pr['passes']} passes, {len(runs)} seeds (`--precision`, backend "
                     f"{pr['backend']}): assignment agreement {fmt('assignment_agreement', '{:.4f}')} (given the "
                     f"same centres{plain}), final inertia bf16 / fp32 {fmt('inertia_ratio_bf16_over_fp32', '{:.4f}')}, "
                     f"speed-up {fmt('speedup', '{:.2f}')}× (a CPU has no bf16 matrix unit; the speed-up on "
                     "accelerators is not measured here)."]
    return "\n".join(rows)


def clustering_scale() -> str:
    r = load_result("clustering_scale")
    if not r:
        return "(run `python -m benchmarks.clustering_scale`)"
    p = r["paper"]
    rows = [f"Per process and per device at the paper's scale ({p['regions'] / 1e9:.0f}B regions of "
            f"{p['images'] / 1e6:.0f}M images, D = {p['dim']}, K = {p['k']:,}), from what the code stores "
            "(`benchmarks/clustering_scale.py`):", "",
            "| setup | fp16 features on local disk / process | ids + labels in RAM / process | label files written "
            "/ process | centres + sums / device | init rows moved / device |", "|---|---|---|---|---|---|"]
    for name, m in r["layout"].items():
        rows.append(f"| {name} | {m['features_disk_per_process_gib']:.0f} GiB | "
                    f"{m['ids_and_labels_ram_per_process_gib']:.1f} GiB | {m['label_files_per_process_gib']:.2f} GiB | "
                    f"{m['centres_and_sums_per_device_gib'] * 1024:.0f} MiB | "
                    f"{m['init_rows_per_device_gib'] * 1024:.0f} MiB |")
    meas = "; ".join(f"{n} images: {a:.0f} / {b:.0f} MiB" for n, (a, b) in r["measured_peak_rss_mib"].items())
    rows += ["", f"Measured peak RSS of process 0 / process 1 of a 2-process x 4-device run here: {meas} "
                 "(the interpreter, JAX and the compiled programs dominate; nothing grows with the data)."]
    return "\n".join(rows)


def mining() -> str:
    r = load_result("mining")
    if not r:
        return "(run `python -m benchmarks.mining`)"
    names = {"felzenszwalb_photo": ("Felzenszwalb proposals (default)", "photo 427×640"),
             "felzenszwalb_synthetic": ("Felzenszwalb proposals (default)", "synthetic 96–128 px"),
             "rapidocr_photo": ("RapidOCR (PP-OCRv4 det + rec, ONNX)", "photo 427×640"),
             "rapidocr_synthetic": ("RapidOCR (PP-OCRv4 det + rec, ONNX)", "synthetic 96–128 px"),
             "sam_vit_b_points16_photo": ("SAM ViT-B, 16×16 point grid, CPU", "photo 427×640"),
             "sam_vit_b_points32_photo": ("SAM ViT-B, 32×32 point grid (SAM's automatic setting), CPU",
                                          "photo 427×640"),
             "sam_vit_b_points16_photo_cuda": ("SAM ViT-B, 16×16 point grid, GPU", "photo 427×640"),
             "sam_vit_b_points32_photo_cuda": ("SAM ViT-B, 32×32 point grid, GPU", "photo 427×640")}
    p = r["projection"]
    cores = p["cores_here"]
    gpu = f"GPU: {', '.join(r['gpu'])}" if r.get("gpu") else "no GPU was lent for this run, so no GPU rows"
    rows = [f"Measured on this machine ({cores} CPU cores, one process; SAM with random weights of the real "
            f"ViT-B architecture — the cost does not depend on the weights; {gpu}).", "",
            f"| step | images | images / s | regions / image | core-hours for {p['paper_images'] / 1e6:.0f}M images |",
            "|---|---|---|---|---|"]
    for key, (label, what) in names.items():
        m = r["methods"].get(key)
        if m:
            ch = p["core_hours"].get(key) if "cuda" not in key else None
            regions = "— (random weights)" if key.startswith("sam") else f"{m['regions_per_image']:.1f}"
            rows.append(f"| {label} | {what} | {m['images_per_s']:.3g} | {regions} | "
                        f"{f'{ch:,.0f}' if ch else '—'} |")
    rows += ["", f"Projection, assuming {p['assumption']}: Felzenszwalb + RapidOCR on the paper's 400M images ≈ "
                 f"{p['felzenszwalb_plus_rapidocr_core_hours']:,.0f} core-hours, e.g. "
                 f"{p['felzenszwalb_plus_rapidocr_core_hours'] / 1000 / 24:,.1f} days on 1,000 cores. SAM belongs on "
                 "GPUs (`--engine ray --ray-gpus-per-unit 1`); its CPU row is here to size that choice, not as a plan."]
    sc = r.get("scale")
    if sc:
        e, pi, tk = sc["mine_tar_paper_preset"], sc["paddle_index"], sc["tokenizer_sample"]
        rows += ["", "The scale paths, measured in the same run:", "",
                 "| path | measured | at the paper's scale |", "|---|---|---|",
                 f"| `mine --tar ... --preset paper` end to end (tar streaming, JPEG decoding, Felzenszwalb + "
                 f"RapidOCR, records; {e['workers']} workers, pool start-up included) | {e['images']} photos in "
                 f"{e['seconds']:.1f} s = {e['images_per_s']:.2f} img/s; {e['objects_per_image']:.1f} objects + "
                 f"{e['regions_per_image'] - e['objects_per_image']:.1f} texts / image | "
                 f"{p['paper_preset_regions_400M'] / 1e9:.1f}B regions from 400M images (paper: ~2B) |",
                 f"| PaddleOCR results (JSON lines) indexed once, then one seek per image | {pi['lines']:,} lines "
                 f"({pi['file_mib']:.0f} MiB) in {pi['index_s']:.1f} s = {pi['index_lines_per_s']:,.0f} lines/s; "
                 f"{pi['lookups_per_s']:,.0f} look-ups/s per worker | 50M images: "
                 f"{p['paddle_index_hours_50M']:.1f} h of indexing, once, in the driver |",
                 f"| tokenizer trained on a sample (`--sample`), records read without decoding images | "
                 f"{tk['records_read']:,} records in {tk['seconds']:.2f} s = {tk['records_per_s']:,.0f} records/s | "
                 f"a 2M-record sample: {2e6 / tk['records_per_s'] / 60:,.0f} min |"]
    return "\n".join(rows)


def _mean_std(mean: float, std: float, n: int) -> str:
    """``0.123 ± 0.004`` over seeds; one seed has no spread to show."""
    return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"


def reading() -> str:
    r = load_result("reading")
    if not r:
        return "(run `python -m benchmarks.reading`)"
    rows = [f"Supervised word classification (40 words, chance {r['chance']:.3f}) from region tokens, trained end to "
            f"end ({r['batch']} images a step) on synthetic images, scored on {r['eval_images']} held-out ones.", "",
            "| variant | stages (share of steps, px, lr ×) | patch | model / generator | steps | train images | peak lr "
            "| held-out accuracy | seeds | final train loss | train s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in sorted(r["table"].values(), key=lambda t: (t["steps"], t["images"], t["variant"])):
        v = r["variants"][t["variant"]]
        stages = ", ".join(f"{sh:g}·{px}px·{m:g}" for sh, px, m in v["stages"])
        notes = [f"{k} {tuple(x) if isinstance(x, list) else x}" for k, x in v["gen"].items()]
        notes += ["region tokens batch-standardised"] if v.get("standardize") else []
        notes += ["head on the box's mean patch token"] if v.get("pool") == "patch_mean" else []
        notes += [f"{v['region_layers']} region layers"] if "region_layers" in v else []
        notes += [f"width {v['backbone']['hidden_size']}"] if "hidden_size" in v.get("backbone", {}) else []
        notes += [f"{v['backbone']['num_heads']} heads"] if "num_heads" in v.get("backbone", {}) else []
        notes += ["head on the box's 2x4 RoIAlign samples (not a region token)"] if v.get("pool") == "roi_align" else []
        notes += ["region query at the box centre (region_rope box)"] if v.get("region_rope") == "box" else []
        notes += ["region tokens start from RoIAlign (region_seed roi)"] if v.get("region_seed") == "roi" else []
        rows.append(f"| {t['variant']} | {stages} | {v['patch']} | {'; '.join(notes) or 'default'} | {t['steps']} | "
                    f"{t['images']:,} | {t['lr']:g} | {_mean_std(t['mean'], t['std'], len(t['seeds']))} | "
                    f"{', '.join(map(str, t['seeds']))} | {t['loss_end']:.2f} | {t['train_seconds']:.0f} |")
    if r.get("legibility"):
        rows += ["", "What the pixels hold (logistic regression on each word's box crop of the resized image, "
                 "the word handed over aligned and scaled):", "",
                 "| image size | generator | train words | held-out accuracy | seeds |", "|---|---|---|---|---|"]
        groups = {}
        for g in r["legibility"]:
            groups.setdefault((g["image_size"], json.dumps(g["gen"])), []).append(g)
        for (size, gen), gs in sorted(groups.items()):
            acc = [g["accuracy"] for g in gs]
            mean, std = statistics.fmean(acc), statistics.pstdev(acc)
            rows.append(f"| {size} px | {', '.join(f'{k} {tuple(x)}' for k, x in json.loads(gen).items()) or 'default'}"
                        f" | {gs[0]['train_words']:,} | {_mean_std(mean, std, len(gs))} | "
                        f"{', '.join(str(g['seed']) for g in gs)} |")
    return "\n".join(rows)


def mining_max_side() -> str:
    r = load_result("mining_max_side")
    rows = ["What `mine --max-side N` saves training (`benchmarks/mining.py --max-side`): the pipeline's decode "
            "(JPEG draft on, as trained) of web-sized JPEG originals (the bundled photos upscaled, q92) against the "
            "same images stored at N px on the longer side (q90), per image, median of 7.", "",
            "| source | stored at | training size | decode original | decode stored | speed-up | bytes |",
            "|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        rows.append(f"| {x['source_side']} px | {x['max_side']} px | {x['train_size']} px | "
                    f"{x['decode_ms_original']:.2f} ms | {x['decode_ms_stored']:.2f} ms | {x['speedup']:.1f}x | "
                    f"{x['bytes_original'] / 1e3:,.0f} KB -> {x['bytes_stored'] / 1e3:,.0f} KB |")
    return "\n".join(rows)


def mining_presets() -> str:
    """The settings table of docs/data.md: defaults, the paper preset, and what each setting costs."""
    from rice_jax.mining import mine

    d, paper, r = mine.MiningSettings(), mine.preset_settings("paper"), load_result("mining")
    objects = (r or {}).get("scale", {}).get("mine_tar_paper_preset", {}).get("objects_per_image")
    regions = {n: 400e6 * n for n in (d.max_proposals, paper.max_proposals)}   # object regions, at most
    feat_tb = {n: v * 1024 * 2 / 1e12 for n, v in regions.items()}
    costs = {
        "min_image_short_edge": "img2dataset's default output (256 px) fails it entirely: download at ≥ 336 px "
                                "(`--min_image_size 336`, `--resize_mode no` or keep-ratio-largest 512)",
        "min_box_short_edge": "drops small objects; the paper's regions are all ≥ 128 px"
                              + (f" (on the benchmark's photos {objects:.1f} objects an image still pass it, up to the cap of "
                                 f"{paper.max_proposals})" if objects else ""),
        "max_proposals": f"every later stage scales with it: {d.max_proposals} → up to "
                         f"{regions[d.max_proposals] / 1e9:.1f}B object regions at 400M images, "
                         f"{feat_tb[d.max_proposals]:.0f} TB of bf16 D=1024 teacher features; {paper.max_proposals} → "
                         f"{regions[paper.max_proposals] / 1e9:.1f}B, {feat_tb[paper.max_proposals]:.0f} TB (paper: ~2B)",
        "ocr_min_confidence": "the paper's threshold is also the default",
        "nms_iou": "applies to every proposer",
    }
    rows = ["| setting (flag) | default | `--preset paper` | what it costs |", "|---|---|---|---|"]
    for f in dataclasses.fields(mine.MiningSettings):
        if f.name in ("proposals", "ocr", "keep_input_regions"):
            continue
        rows.append(f"| `--{f.name.replace('_', '-')}` | {getattr(d, f.name)} | {getattr(paper, f.name)} | "
                    f"{costs.get(f.name, '')} |")
    return "\n".join(rows)


def plan() -> str:
    r = load_result("plan")
    if not r:
        return "(run `.venv-plan/bin/python -m benchmarks.plan_sweep`)"
    rows = [f"Global batch {r['global_batch']:,}, K = {r['K']:,} object centres, V = {r['V']:,} OCR token centres, "
            "ρ = 0.1, N = 10 regions, bf16, AdamW; per-device figures of the compiled step (ahead of time, on "
            "this CPU machine); step time = model FLOPs (`perf.model_flops`) / (chips × datasheet bf16 peak × an "
            "assumed 40% MFU). Rows with micro-batches > 1 run the 32K batch as gradient-accumulation microbatches.", "",
            "| config | px | slice | remat policy | micro-batches | per-device HBM (of) | fits | model FLOPs / step | "
            "s / step @40% | images / s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        if "error" in x and "per_device" not in x and "image_size" not in x:
            rows.append(f"| {x['variant']} | | {x['topology']} | {x['policy']} | {x.get('grad_accum_steps', 1)} | "
                        f"error: {x['error'][:80]} | | | | |")
            continue
        hbm = f"{x['hbm_bytes'] / 2**30:.0f} GiB" if "hbm_bytes" in x else "?"
        if "per_device" in x:
            used = f"{x['per_device']['total_bytes'] / 2**30:.1f} GiB ({hbm})"
            perf = (f"{x['model_flops_per_step']:.2e} | {x['step_time_s']:.2f} | {x['images_per_s']:,.0f}"
                    if x.get("step_time_s") else "| |")
        else:
            m = re.search(r"temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", x.get("error", ""))
            used = (f"compiler: temporaries alone {float(m.group(1)):.1f} GB > {float(m.group(2)):.1f} GB"
                    if m else f"compiler: out of memory ({hbm})")
            perf = "— | — | —"
        rows.append(f"| {x['variant']} | {x['image_size']} | {x['topology']} ({x['devices']} chips) | "
                    f"{x['policy']} | {x.get('grad_accum_steps', 1)} | {used} | {'yes' if x['fits'] else 'no'} | {perf} |")
    return "\n".join(rows)


def step_profile() -> str:
    r = load_result("step_profile")
    if not r:
        return "(run `python -m benchmarks.step_profile`)"
    from benchmarks.step_profile import CATEGORIES

    j, t = r["jax"]["ms"], r["torch"]["ms"]
    rows = [f"{r['preset']}, batch {r['batch']}, fp32, {r['objective']}; ms per step summed over executed ops "
            f"(JAX: XLA thunks, PyTorch: ATen self time), one profiled run of `benchmarks/step_profile.py`.", "",
            "| category | JAX fwd | PyTorch fwd | JAX bwd | PyTorch bwd |", "|---|---|---|---|---|"]
    for cat in CATEGORIES:
        cells = [j["forward"].get(cat, 0), t["forward"].get(cat, 0), j["backward"].get(cat, 0), t["backward"].get(cat, 0)]
        if any(c >= 0.5 for c in cells):
            rows.append(f"| {cat} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    tot = lambda side, ph: sum(side[ph].values())
    rows.append(f"| **all ops** | **{tot(j, 'forward'):.0f}** | **{tot(t, 'forward'):.0f}** | "
                f"**{tot(j, 'backward'):.0f}** | **{tot(t, 'backward'):.0f}** |")
    rows += ["", f"Optimiser (AdamW, clipping, the finite-update guard): JAX {tot(j, 'optimizer'):.0f} ms, PyTorch "
                 f"{tot(t, 'optimizer'):.0f} ms. Step wall time under the profilers: JAX {r['jax']['wall_ms']:.0f} ms, "
                 f"PyTorch {r['torch']['wall_ms']:.0f} ms (XLA runs independent ops concurrently, so its summed op "
                 "time can exceed its wall time)."]
    ab = r.get("residual_grad_materialization")
    if ab:
        rows += ["", f"Residual-gradient materialisation (`vit.materialize_grad`), same run, step time off → on: "
                     + ", ".join(f"{a:.2f} → {b:.2f} s" for a, b in zip(ab["off_s"], ab["on_s"]))
                     + f" ({ab['speedup']:.2f}×)."]
    return "\n".join(rows)


def gpu() -> str:
    runs = [r for r in (load_result("gpu_l14_336"), load_result("gpu_b16")) if r]
    if not runs:
        return "(run `bash benchmarks/gpu.sh` on a GPU machine)"
    rows = ["| config | px | batch | device | attention | step | images / s | MFU | compiled program / device |",
            "|---|---|---|---|---|---|---|---|---|"]
    micro = []
    for r in runs:
        px = 336 if r["variant"] == "l14_336" else 512 if r["variant"] == "b16" else "?"
        for impl, x in r["attention"].items():
            if "error" in x:
                rows.append(f"| {r['variant']} | {px} | {r['global_batch']} | {r['device_kind']} | {impl} | "
                            f"refused: {x['error'][:70]} | | | |")
                continue
            mark = " (†)" if "note" in x else ""
            rows.append(f"| {r['variant']} | {px} | {r['global_batch']} | {r['device_kind']} | {impl}{mark} | "
                        f"{1e3 * x['step_s']:.0f} ms | {x['images_per_s']:,.0f} | {100 * x['mfu']:.1f}% | "
                        f"{x['program_bytes'] / 2**30:.1f} GiB |")
        m = r.get("attention_micro")
        if m:
            b, h, t, dh = m["shape"]
            for mask in ("no_mask", "region_mask"):
                cells = [f"{m[f'{mask}/{i}']['fwd_bwd_ms']:.2f} ms" if "fwd_bwd_ms" in m[f"{mask}/{i}"] else "refused"
                         for i in ("einsum", "xla", "cudnn")]
                micro.append(f"| [{b}, {h}, {t}, {dh}] bf16, {mask.replace('_', ' ')} | " + " | ".join(cells) + " |")
    out = rows + ["", "MFU = model FLOPs (`perf.rice_train_flops`: 3× the forward's matmuls, loss logits "
                  "included, remat not counted) / step time / the card's datasheet dense bf16 peak (989 TFLOP/s for "
                  "H100 SXM). Real loss: K = 100,000 object centres, V = 49,408 OCR centres, ρ = 0.1, N = 10 regions; "
                  f"jax {runs[0]['machine']['jax']}."]
    if any("note" in x for r in runs for x in r["attention"].values()):
        out += ["", "† measured in an earlier run of the same script on another machine of the same kind."]
    if micro:
        out += ["", "One attention call, forward + backward (`attention_micro` in the same run):", "",
                "| shape [B, heads, tokens, Dh] | einsum | XLA | cuDNN |", "|---|---|---|---|"] + micro
    return "\n".join(out)


def plan_fit() -> str:
    """The planner's own JSON (``--out``) for a step that does not fit, and what its fit search found."""
    r = load_result("plan_fit_search")
    if not r or "fits_with" not in r:
        return "(run `bash launch/plan.sh ... --out benchmarks/results/plan_fit_search.json` on a step that does not fit)"
    head = (f"{r['backbone']} @ {r['image_size']} px, global batch {r['global_batch']:,}, K = {r['num_obj_classes']:,}, "
            f"{r['dtype']}, remat {r['remat_policy']}, {r['grad_accum_steps']} microbatch(es) on {r['topology']} "
            f"({r['devices']} × {r['device_kind']}): **does not fit** — {r.get('error', '').split(': ', 1)[-1]}")
    rows = [head, "", "| would fit with | per-device HBM (of) | compiled FLOPs / model FLOPs |", "|---|---|---|"]
    for f in r["fits_with"]:
        ratio = f"{f['compiled_over_model_flops']:.2f}×" if f.get("compiled_over_model_flops") else "—"
        rows.append(f"| `--config.grad_accum_steps={f['grad_accum_steps']} --config.model.remat_policy={f['remat_policy']}` "
                    f"| {f['total_bytes'] / 2**30:.1f} GiB ({r['hbm_bytes'] / 2**30:.2f} GiB) | {ratio} |")
    return "\n".join(rows)


def preflight() -> str:
    """``python -m rice_jax.preflight.bench ... --out benchmarks/results/preflight_*.json`` runs on this machine."""
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("preflight_*.json"))]
    if not runs:
        return "(run `python -m rice_jax.preflight.bench ... --out benchmarks/results/preflight_NAME.json`)"
    rows = ["| target | px | batch per host | this host reads | chips take per host | verdict |", "|---|---|---|---|---|---|"]
    for r in runs:
        s = r["supply"]
        rows.append(f"| {r['topology']} ({r['chips']} chips, {r['hosts']} hosts) | {s['image_size']} | {s['per_host_batch']:,} | "
                    f"{s['images_per_s']:,.0f} img/s ({s['workers']} workers × {s['threads']} threads, {s['cores']} cores) | "
                    f"{r['demand_per_host']:,.0f} img/s at {r['mfu_assumed']:.0%} MFU | {r['verdict']} |")
    return "\n".join(rows)


SECTIONS = ("ablation_summary", "teacher_gap", "labelling_rounds", "downstream_synthetic", "downstream", "gpu", "step_profile", "plan", "plan_fit", "preflight", "mining", "mining_max_side", "mining_presets", "reading", "kmeans", "clustering_scale", "performance", "ablation", "layers")


def pages() -> list[Path]:
    return [README] + sorted((README.parent / "docs").glob("*.md"))


def page_of(name: str) -> Path:
    """The one page that carries section ``name``'s markers."""
    hits = [p for p in pages() if f"<!-- BEGIN {name} -->" in p.read_text()]
    if len(hits) != 1:
        raise ValueError(f"section {name!r}: markers found in {[str(h) for h in hits] or 'no page'}; "
                         "exactly one page must carry them")
    return hits[0]


def main():
    build = {"ablation_summary": ablation_summary, "teacher_gap": teacher_gap, "labelling_rounds": labelling_rounds, "downstream_synthetic": downstream_synthetic, "downstream": downstream, "gpu": gpu, "step_profile": step_profile, "plan": plan, "plan_fit": plan_fit, "preflight": preflight, "mining": mining,
             "mining_max_side": mining_max_side, "mining_presets": mining_presets, "reading": reading, "kmeans": kmeans,
             "clustering_scale": clustering_scale,
             "performance": performance, "ablation": ablation, "layers": layers}
    for name in SECTIONS:
        page = page_of(name)
        page.write_text(replace_section(page.read_text(), name, build[name]()))
        print(f"updated {name} in {page.relative_to(README.parent)}")


if __name__ == "__main__":
    main()
