"""PNG curves from a training workdir's ``metrics.jsonl``.

    python -m rice_jax.plot WORKDIR        # writes WORKDIR/curves.png
"""
from __future__ import annotations

import argparse
import json
import io

from rice_jax import cli, errors, storage

# One panel per tuple; a key missing from the run (e.g. OCR terms of a global-only run) is skipped.
PANELS = (
    ("loss", "loss_object", "loss_ocr", "loss_global"),
    ("object/pos_cos_mean", "object/neg_cos_mean", "ocr/pos_cos_mean", "ocr/neg_cos_mean",
     "global/pos_cos_mean", "global/neg_cos_mean"),
    ("object/top1_acc", "ocr/top1_acc", "global/top1_acc"),
    ("object/pairwise_cos", "ocr/pairwise_cos", "global/pairwise_cos"),
    ("grad_norm",), ("lr",), ("images_per_s",), ("mfu", "data_wait_fraction"),
)
TITLES = ("losses", "cosine to positive / negative centres", "top-1 cluster accuracy (scored classes)",
          "mean pairwise cosine of embeddings (collapse -> 1)", "gradient norm", "learning rate", "throughput",
          "utilisation")


def plot(workdir: str | storage.PathLike):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = storage.path(workdir)
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    if not rows:
        raise errors.InputError(f"{workdir}/metrics.jsonl is empty")
    fig, axes = plt.subplots(2, 4, figsize=(18, 7.5))
    for ax, keys, title in zip(axes.ravel(), PANELS, TITLES):
        ax.set_title(title, fontsize=9)
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            if pts:
                ax.plot(*zip(*pts), label=k)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = workdir / "curves.png"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    out.write_bytes(buf.getvalue())
    plt.close(fig)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("workdir")
    print(plot(ap.parse_args(argv).workdir))


if __name__ == "__main__":
    cli.run(main)
