"""PNG curves from a training workdir's ``metrics.jsonl``.

    python -m rice_jax.plot WORKDIR        # writes WORKDIR/curves.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = (("loss", "loss_object", "loss_ocr", "loss_global"), ("object/pos_cos_mean", "ocr/pos_cos_mean"),
          ("grad_norm",), ("lr",), ("images_per_s",), ("mfu", "data_wait_fraction"))


def plot(workdir: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    if not rows:
        raise ValueError(f"{workdir}/metrics.jsonl is empty")
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, keys in zip(axes.ravel(), PANELS):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            if pts:
                ax.plot(*zip(*pts), label=k)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = workdir / "curves.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("workdir")
    print(plot(ap.parse_args(argv).workdir))


if __name__ == "__main__":
    main()
