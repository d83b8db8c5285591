"""Frozen-backbone evaluation of what users get: the exported ViT.

    python -m rice_jax.evaluate --checkpoint WORKDIR --data HELDOUT_DIR [--out results.json]
    python -m rice_jax.evaluate --hf HF_DIR --data HELDOUT_DIR

On a held-out synthetic dataset (images split 50/50 into probe-train/test):
- region classification: ROI mean-pooled patch tokens per object box ->
  logistic-regression probe accuracy and cosine kNN (k=10) accuracy;
- dense: per-patch logistic-regression probe of the generator's semantic mask
  (12 categories + background) -> mIoU;
- OCR: per text region, one-vs-rest probe over its transcript's token ids ->
  recall@5;
- global: image-level probe of the dominant (largest-area) category from
  ``pooler_output``.
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from rice_jax.data import pipeline, records, synthetic
from rice_jax.models.region import box_patch_visibility, roi_mean_pool


def extract(vit, data_dir, image_size: int, batch_size: int = 16, max_patches_per_image: int = 24, seed: int = 0):
    """Per-region, per-patch (subsampled) and per-image features of a dataset."""
    src = records.RecordSource(data_dir)
    manifest = records.read_manifest(data_dir)
    gen = manifest.get("generator", {})
    graphdef, state = nnx.split(vit)
    gh, gw = vit.grid(image_size, image_size)

    @jax.jit
    def fwd(state, x, boxes, valid):
        out = nnx.merge(graphdef, state)(x)
        tokens = out.last_hidden_state[:, 1:]
        return roi_mean_pool(tokens, box_patch_visibility(boxes, valid, gh, gw)), tokens, out.pooler_output

    rng = np.random.default_rng(seed)
    regions, patches, images = [], [], []
    idx = list(range(len(src)))
    for s in range(0, len(idx), batch_size):
        recs = [src[i] for i in idx[s:s + batch_size]]
        n = max(1, max(r.num_regions for r in recs))
        x = np.zeros((batch_size, image_size, image_size, 3), np.float32)
        boxes = np.zeros((batch_size, n, 4), np.float32)
        valid = np.zeros((batch_size, n), bool)
        for j, r in enumerate(recs):
            img = Image.open(io.BytesIO(r.image))
            w, h = img.size
            x[j] = pipeline.resize_normalize(img, image_size)
            boxes[j, : r.num_regions] = r.boxes / np.array([w, h, w, h], np.float32)
            valid[j, : r.num_regions] = True
        roi, tokens, pooled = (np.asarray(a) for a in fwd(state, jnp.asarray(x), jnp.asarray(boxes), jnp.asarray(valid)))
        for j, r in enumerate(recs):
            i = idx[s + j]
            for k in range(r.num_regions):
                regions.append({"image": i, "feat": roi[j, k], "kind": int(r.kind[k]), "category": int(r.category[k]),
                                "text": r.text[k]})
            area = {}
            for k in range(r.num_regions):
                if r.category[k] >= 0:
                    b = r.boxes[k]
                    area[int(r.category[k])] = area.get(int(r.category[k]), 0) + (b[2] - b[0]) * (b[3] - b[1])
            images.append({"image": i, "feat": pooled[j], "category": max(area, key=area.get) if area else -1})
            if "seed" in manifest and manifest.get("source") == "synthetic":
                sem = synthetic.semantic_mask(manifest["seed"], int(r.image_id.rsplit("-", 1)[1]),
                                              gen.get("min_size", 96), gen.get("max_size", 160))
                lab = np.asarray(Image.fromarray((sem + 1).astype(np.uint8)).resize((gw, gh), Image.NEAREST)) - 1
                lab = lab.reshape(-1).astype(int) + 1          # 0 = background
                pick = rng.choice(gh * gw, min(max_patches_per_image, gh * gw), replace=False)
                for t in pick:
                    patches.append({"image": i, "feat": tokens[j, t], "label": int(lab[t])})
    return regions, patches, images


def _split(items, key="image"):
    tr = [it for it in items if it[key] % 2 == 0]
    te = [it for it in items if it[key] % 2 == 1]
    return tr, te


def _probe(train, test, label_key):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xtr = np.stack([t["feat"] for t in train])
    xte = np.stack([t["feat"] for t in test])
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(max_iter=300, C=1.0).fit(scaler.transform(xtr), [t[label_key] for t in train])
    return clf.predict(scaler.transform(xte)), clf, scaler


def evaluate_backbone(vit, data_dir, image_size: int | None = None, tokenizer=None) -> dict:
    image_size = image_size or vit.cfg.image_size
    regions, patches, images = extract(vit, data_dir, image_size)
    res = {}
    obj = [r for r in regions if r["kind"] == 0 and r["category"] >= 0]
    tr, te = _split(obj)
    if tr and te and len({t["category"] for t in tr}) > 1:
        pred, _, _ = _probe(tr, te, "category")
        y = np.array([t["category"] for t in te])
        res["region_linear_acc"] = float(np.mean(pred == y))
        a = np.stack([t["feat"] for t in tr])
        b = np.stack([t["feat"] for t in te])
        a /= np.linalg.norm(a, axis=1, keepdims=True) + 1e-9
        b /= np.linalg.norm(b, axis=1, keepdims=True) + 1e-9
        nn = np.argsort(-(b @ a.T), axis=1)[:, :10]
        ytr = np.array([t["category"] for t in tr])
        knn = np.array([np.bincount(ytr[row], minlength=ytr.max() + 1).argmax() for row in nn])
        res["region_knn_acc"] = float(np.mean(knn == y))
        res["num_regions_test"] = len(te)
    if patches:
        tr, te = _split(patches)
        pred, _, _ = _probe(tr, te, "label")
        y = np.array([t["label"] for t in te])
        ious = [np.sum((pred == c) & (y == c)) / np.sum((pred == c) | (y == c)) for c in np.unique(y)]
        res["dense_miou"] = float(np.mean(ious))
    txt = [r for r in regions if r["kind"] == 1]
    if tokenizer is not None and len(txt) > 10:
        from sklearn.linear_model import LogisticRegression
        from sklearn.multiclass import OneVsRestClassifier
        from sklearn.preprocessing import MultiLabelBinarizer, StandardScaler

        tr, te = _split(txt)
        ids = lambda t: sorted(set(int(i) for i in tokenizer.encode(t["text"], 10) if i >= 0))
        mlb = MultiLabelBinarizer().fit([ids(t) for t in tr + te])
        xtr, xte = np.stack([t["feat"] for t in tr]), np.stack([t["feat"] for t in te])
        sc = StandardScaler().fit(xtr)
        ytr = mlb.transform([ids(t) for t in tr])
        keep = ytr.sum(0) > 0
        clf = OneVsRestClassifier(LogisticRegression(max_iter=300)).fit(sc.transform(xtr), ytr[:, keep])
        scores = clf.decision_function(sc.transform(xte))
        classes = np.array(mlb.classes_)[keep]
        recall = []
        for row, t in zip(scores, te):
            top = set(classes[np.argsort(-row)[:5]].tolist())
            true = set(ids(t))
            recall.append(len(top & true) / max(len(true), 1))
        res["ocr_token_recall@5"] = float(np.mean(recall))
    imgs = [i for i in images if i["category"] >= 0]
    tr, te = _split(imgs)
    if tr and te and len({t["category"] for t in tr}) > 1:
        pred, _, _ = _probe(tr, te, "category")
        res["global_linear_acc"] = float(np.mean(pred == np.array([t["category"] for t in te])))
    return res


def load_model(checkpoint: str | None = None, hf: str | None = None):
    if hf:
        from rice_jax import export

        return export.load_hf(hf)
    from rice_jax import checkpoint as ckpt

    return ckpt.load_backbone(checkpoint)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="training workdir or checkpoint dir")
    src.add_argument("--hf", help="local HF MLCDVisionModel directory")
    ap.add_argument("--data", required=True, help="held-out region dataset (synthetic for the dense probe)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from rice_jax.data.tokenizer import OCRTokenizer

    m = records.read_manifest(a.data)
    tok = OCRTokenizer(Path(a.data) / m["tokenizer"]["file"]) if m.get("tokenizer") else None
    res = evaluate_backbone(load_model(a.checkpoint, a.hf), a.data, a.image_size, tok)
    print(json.dumps(res, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
