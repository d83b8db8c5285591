"""The table command: several backbones x tasks -> one JSON results file and a markdown table.

    python -m rice_jax.downstream \\
        --backbone rice=ckpt:/runs/rice --backbone mlcd=hf:/models/mlcd --backbone dino=transformers:/models/dinov2 \\
        --task refseg=tfds:ref_coco/refcoco_unc --task semseg=tfds:scene_parse150 --task regcls=records:/data/coco_val \\
        --out downstream.json

``--task TASK=DATA`` (TASK: refseg, semseg, regcls; DATA: :mod:`rice_jax.downstream.sources`).
Every backbone gets the same head, budget and seed per task. With TFDS data prepared locally
nothing else is read from the network (``hub:`` backbones download, and only when written).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

from rice_jax import cli, errors
from rice_jax.downstream import refseg, regcls, semseg, sources
from rice_jax.downstream.encoders import FrozenEncoder
from rice_jax.evaluate import DEFAULT_LAYER

TASKS = ("refseg", "semseg", "regcls")
# The headline metric of each task and split, for the table.
HEADLINE = {"refseg": "ciou", "semseg": "miou", "regcls": "top1"}


def run_task(encoder: FrozenEncoder, task: str, data, *, steps: int | None = None, seed: int = 0,
             train_images: int | None = None, eval_images: int | None = None, tfds_data_dir: str | None = None,
             text_encoder: str = "", log=print) -> dict:
    """One task on one encoder. ``data``: a spec string or an opened source; ``text_encoder``: a
    local HF text-encoder folder for referring segmentation ("" = the word-level vocabulary)."""
    source = sources.open_source(data, tfds_data_dir) if isinstance(data, str) else data
    kw = dict(train_images=train_images, eval_images=eval_images, log=log)
    if task == "regcls":
        return regcls.run(encoder, source, **kw)
    if task not in TASKS:
        raise errors.InputError(f"--task {task}: choose from {', '.join(TASKS)}")
    mod, cfg = ((refseg, refseg.RefSegConfig(text_encoder=text_encoder)) if task == "refseg"
                else (semseg, semseg.SemSegConfig()))
    train = dataclasses.replace(cfg.train, seed=seed, **({"steps": steps} if steps else {}))
    return mod.run(encoder, source, cfg=dataclasses.replace(cfg, train=train), **kw)


def rows_of(backbone: str, spec: str, task: str, data: str, res: dict) -> list[dict]:
    """One flat row per split: what the table and the README read."""
    return [{"backbone": backbone, "spec": spec, "task": task, "data": data, "split": split, **metrics}
            for split, metrics in res["splits"].items()]


def run_table(backbones: dict, tasks: list[tuple[str, str]], *, image_size: int | None = None,
              layer: int = DEFAULT_LAYER, log=print, **kw) -> list[dict]:
    """``backbones``: name -> spec string or model object; ``tasks``: (task, data spec) pairs."""
    rows = []
    opened = {data: sources.open_source(data, kw.get("tfds_data_dir")) for _, data in tasks}
    for name, spec in backbones.items():
        encoder = FrozenEncoder(spec, image_size, layer)
        for task, data in tasks:
            log(f"[downstream] {name} / {task} on {data}")
            res = run_task(encoder, task, opened[data], log=log, **kw)
            rows += [dict(r, seconds=res["seconds"], skipped=res["skipped"])
                     for r in rows_of(name, spec if isinstance(spec, str) else encoder.spec, task, data, res)]
    return rows


def markdown(rows: list[dict]) -> str:
    """Backbones as rows, (task, data, split) as columns, the headline metric in each cell."""
    cols = list(dict.fromkeys((r["task"], r["data"], r["split"]) for r in rows))
    names = list(dict.fromkeys(r["backbone"] for r in rows))
    cell = {(r["backbone"], r["task"], r["data"], r["split"]): r.get(HEADLINE[r["task"]]) for r in rows}
    head = "| backbone | " + " | ".join(f"{t} {HEADLINE[t]} ({d.split(':', 1)[-1].rsplit('/', 1)[-1]}, {s})"
                                       for t, d, s in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for n in names:
        vals = [cell.get((n,) + c) for c in cols]
        lines.append(f"| {n} | " + " | ".join("—" if v is None else f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines)


def _pairs(values, what):
    out = []
    for v in values:
        k, sep, spec = v.partition("=")
        if not sep or not spec:
            raise errors.InputError(f"--{what} {v!r}: write NAME=SPEC")
        out.append((k, spec))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", action="append", required=True, help="NAME=SPEC (ckpt:, hf:, hub:, transformers:)")
    ap.add_argument("--task", action="append", required=True, help="TASK=DATA, TASK in refseg/semseg/regcls")
    ap.add_argument("--image-size", type=int, default=None, help="encoder input side (default: the backbone's)")
    ap.add_argument("--layer", type=int, default=DEFAULT_LAYER, help="probe layer (default: the penultimate block)")
    ap.add_argument("--steps", type=int, default=None, help="head training steps (default: each task's)")
    ap.add_argument("--seed", type=int, default=0, help="head initialisation and batch order")
    ap.add_argument("--train-images", type=int, default=None, help="first N training images (default: all)")
    ap.add_argument("--eval-images", type=int, default=None, help="first N images of each evaluation split")
    ap.add_argument("--tfds-data-dir", default=None)
    ap.add_argument("--text-encoder", default="", help="referring segmentation: a local HF text-encoder folder, "
                                                        "frozen (default: a word vocabulary trained with the head)")
    ap.add_argument("--out", default=None, help="results JSON (default: print only)")
    a = ap.parse_args(argv)
    tasks = _pairs(a.task, "task")
    for t, _ in tasks:
        if t not in TASKS:
            raise errors.InputError(f"--task {t}: choose from {', '.join(TASKS)}")
    t0 = time.time()
    rows = run_table(dict(_pairs(a.backbone, "backbone")), tasks, image_size=a.image_size, layer=a.layer,
                     steps=a.steps, seed=a.seed, train_images=a.train_images, eval_images=a.eval_images,
                     tfds_data_dir=a.tfds_data_dir, text_encoder=a.text_encoder)
    rec = {"benchmark": "downstream", "layer": a.layer, "image_size": a.image_size, "seed": a.seed,
           "text_encoder": a.text_encoder,
           "rows": rows, "seconds": time.time() - t0}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rec, f, indent=1)
    print(markdown(rows))
    print(json.dumps({"benchmark": "downstream", "rows": len(rows)}))
    return rec


if __name__ == "__main__":
    cli.run(main)
