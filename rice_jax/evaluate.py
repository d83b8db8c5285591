"""Frozen-backbone evaluation of what users get: the exported ViT.

    python -m rice_jax.evaluate --backbone ckpt:WORKDIR --data HELDOUT_DIR [--layer -2] [--all-layers] [--out results.json]
    python -m rice_jax.evaluate --backbone hf:HF_DIR --data HELDOUT_DIR

On a held-out synthetic dataset (images split 50/50 into probe-train/test):
- region classification: ROI mean-pooled patch tokens per object box (read at
  ``--layer``, default the penultimate block: the best layer measured, and what
  LLaVA-style users take) -> logistic-regression probe accuracy and cosine kNN
  (k=10) accuracy; with region layers, the same probes on the model's own
  region tokens (``region_token_*``);
- dense: per-patch logistic-regression probe of the generator's semantic mask
  (12 categories + background) -> mIoU;
- OCR: per text region, one-vs-rest probe over its transcript's token ids ->
  recall@5, from the ROI mean-pooled patch tokens (``ocr_token_recall@5``), from the
  box's 2 x 4 RoIAlign layout of the same patch tokens (``ocr_layout_recall@5``: a word
  is its letters in order, which a mean pool cannot keep; benchmarks/reading.py measured
  an end-to-end-trained mean-pooled box token at chance where the layout reads 0.88) and,
  with region layers, from the region tokens;
- global: image-level probe of the dominant (largest-area) category from
  ``pooler_output``.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
from PIL import Image

from rice_jax import backbones, cli, errors, storage
from rice_jax.data import pipeline, records, synthetic
from rice_jax.data.tokenizer import for_dataset
from rice_jax.labelling.features import RegionFeatures, resolve_layer
from rice_jax.losses import l2_normalize


def extract(vit, data_dir, image_size: int, batch_size: int = 16, max_patches_per_image: int = 24, seed: int = 0,
            layers=(-1,), region_layers: int = 0, layout_layers=()):
    """Per-region, per-patch (subsampled) and per-image features of a dataset.

    Region and patch features are read at every probe layer in ``layers``
    (see :func:`resolve_layer`); the ``feat`` of a region/patch item is a dict
    ``{str(resolved layer index): vector}`` (``-2`` and ``L-1`` are one entry). With ``region_layers`` = k > 0 the backbone is also run
    as a RICE model (its last k blocks carrying one region token per box) and
    each region item gets ``feat["region_token"]``: the post-normed region
    token, i.e. the model's own region embedding (no training head). Text regions also get
    ``feat["layout<i>"]``, their box's RoIAlign layout at each of ``layout_layers``.
    """
    src = records.RecordSource(data_dir)
    manifest = records.read_manifest(data_dir)
    feats = RegionFeatures(vit, image_size, layers=layers, region_layers=region_layers, keep_tokens=True,
                           layout_layers=layout_layers)
    vit = getattr(vit, "backbone", vit)
    gh, gw = vit.grid(image_size, image_size)

    rng = np.random.default_rng(seed)
    regions, patches, images = [], [], []
    idx = list(range(len(src)))
    for s in range(0, len(idx), batch_size):
        recs = [src[i] for i in idx[s:s + batch_size]]
        inputs = []
        for i, r in zip(idx[s:s + batch_size], recs):
            inp = pipeline.record_input(r, image_size)
            if inp is None:
                raise errors.InputError(f"{src.where(src.dataset_index(i))}: the image does not decode; "
                                        "an evaluation set must be whole (rebuild or drop that record)")
            inputs.append(inp)
        x, boxes, valid = pipeline.stack_inputs(inputs, batch_size)
        out = feats(x, boxes, valid)
        roi, tokens, pooled, layout = out["roi"], out["tokens"], out["pooled"], out.get("layout", {})
        for j, r in enumerate(recs):
            i = idx[s + j]
            for k in range(r.num_regions):
                feat = {l: v[j, k] for l, v in roi.items()}
                if r.kind[k] == records.KIND_TEXT:   # the layout is for reading: text regions only
                    feat.update({f"layout{l}": v[j, k] for l, v in layout.items()})
                regions.append({"image": i, "feat": feat, "kind": int(r.kind[k]),
                                "category": int(r.category[k]), "text": r.text[k]})
            area = {}
            for k in range(r.num_regions):
                if r.category[k] >= 0:
                    b = r.boxes[k]
                    area[int(r.category[k])] = area.get(int(r.category[k]), 0) + (b[2] - b[0]) * (b[3] - b[1])
            images.append({"image": i, "feat": pooled[j], "category": max(area, key=area.get) if area else -1})
            if "seed" in manifest and manifest.get("source") == "synthetic":
                sem = synthetic.semantic_mask(manifest, synthetic.image_index(r.image_id))
                lab = np.asarray(Image.fromarray((sem + 1).astype(np.uint8)).resize((gw, gh), Image.NEAREST)) - 1
                lab = lab.reshape(-1).astype(int) + 1          # 0 = background
                pick = rng.choice(gh * gw, min(max_patches_per_image, gh * gw), replace=False)
                for t in pick:
                    patches.append({"image": i, "feat": {l: v[j, t] for l, v in tokens.items()}, "label": int(lab[t])})
    return regions, patches, images


def split_by_image(items, key="image"):
    """Every probe's train/test split: even image indices train, odd ones test."""
    tr = [it for it in items if it[key] % 2 == 0]
    te = [it for it in items if it[key] % 2 == 1]
    return tr, te


def _features(items, feat_key=None) -> np.ndarray:
    return np.stack([t["feat"] if feat_key is None else t["feat"][feat_key] for t in items])


def _linear_probe(xtr, ytr, xte):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(max_iter=300, C=1.0).fit(scaler.transform(xtr), ytr)
    return clf.predict(scaler.transform(xte)), clf, scaler


def _probe(train, test, label_key, feat_key=None):
    return _linear_probe(_features(train, feat_key), [t[label_key] for t in train], _features(test, feat_key))


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 10) -> float:
    """Cosine k-nearest-neighbour majority vote accuracy."""
    a, b = l2_normalize(np.asarray(train_x)), l2_normalize(np.asarray(test_x))
    nn = np.argsort(-(b @ a.T), axis=1)[:, :k]
    votes = np.array([np.bincount(train_y[row], minlength=train_y.max() + 1).argmax() for row in nn])
    return float(np.mean(votes == test_y))


def region_probes(tr, te, feat_key) -> tuple[float, float]:
    """(linear probe accuracy, kNN accuracy) of the region categories: items ``{"image", "category",
    "feat": {feat_key: [D]}}`` split by :func:`split_by_image`."""
    xtr, xte = _features(tr, feat_key), _features(te, feat_key)
    ytr, y = np.array([t["category"] for t in tr]), np.array([t["category"] for t in te])
    pred, _, _ = _linear_probe(xtr, ytr, xte)
    return float(np.mean(pred == y)), knn_accuracy(xtr, ytr, xte, y)


# What the probes read by default: the output of the penultimate block. No loss reaches the
# last block's patch outputs (image tokens only feed the region/class tokens of the *next*
# block), and measured on the quickstart the penultimate layer is the best of the patch
# layers for region and dense probes (README, "Which layer to probe").
DEFAULT_LAYER = -2


def evaluate_backbone(vit, data_dir, image_size: int | None = None, tokenizer=None, *, layer: int = DEFAULT_LAYER,
                      region_layers: int = 0, all_layers: bool = False) -> dict:
    """Frozen-backbone probes of ``vit`` (a ViT, a teacher tower or a trained RICE model) on a held-out dataset.

    ``layer``: which hidden state the region / dense / OCR probes read (see
    :func:`resolve_layer`). A RICE model, or ``region_layers`` > 0 on a ViT, adds
    ``region_token_*`` probes on the model's own region embeddings. ``all_layers`` adds
    ``per_layer``: region linear / kNN accuracy at every depth.
    """
    backbone = getattr(vit, "backbone", vit)
    image_size = image_size or backbone.cfg.image_size
    num_layers = backbone.cfg.num_layers
    key = str(resolve_layer(layer, num_layers))
    layers = tuple(range(num_layers + 1)) if all_layers else (layer,)
    regions, patches, images = extract(vit, data_dir, image_size, layers=layers, region_layers=region_layers,
                                       layout_layers=(layer,))
    tokens = region_layers > 0 or backbone is not vit
    res = {"layer": layer}
    res.update(region_probe(regions, key, num_layers if all_layers else None, tokens))
    res.update(dense_probe(patches, key))
    res.update(ocr_probe(regions, tokenizer, key, tokens))
    res.update(image_probe(images))
    return res


def region_probe(regions, key: str, num_layers: int | None = None, region_tokens: bool = False) -> dict:
    """Region category from ROI features at layer ``key`` (linear + kNN); every depth when
    ``num_layers`` is given (``per_layer``); the model's own region tokens when ``region_tokens``."""
    obj = [r for r in regions if r["kind"] == 0 and r["category"] >= 0]
    tr, te = split_by_image(obj)
    if not (tr and te and len({t["category"] for t in tr}) > 1):
        return {}
    keys = [str(i) for i in range(num_layers + 1)] if num_layers is not None else [key]
    probes = {k: region_probes(tr, te, k) for k in keys}
    res = dict(zip(("region_linear_acc", "region_knn_acc"), probes[key]))
    if region_tokens:
        res["region_token_linear_acc"], res["region_token_knn_acc"] = region_probes(tr, te, "region_token")
    if num_layers is not None:
        res["per_layer"] = {l: dict(zip(("region_linear_acc", "region_knn_acc"), v)) for l, v in probes.items()}
    res["num_regions_test"] = len(te)
    return res


def dense_probe(patches, key: str) -> dict:
    """Per-patch semantic class (synthetic ground truth) from patch tokens: mean IoU."""
    if not patches:
        return {}
    tr, te = split_by_image(patches)
    pred, _, _ = _probe(tr, te, "label", key)
    y = np.array([t["label"] for t in te])
    ious = [np.sum((pred == c) & (y == c)) / np.sum((pred == c) | (y == c)) for c in np.unique(y)]
    return {"dense_miou": float(np.mean(ious))}


def ocr_probe(regions, tokenizer, key: str, region_tokens: bool = False) -> dict:
    """Token ids of text regions from their features: recall@5 from the mean-pooled patch tokens,
    from their box layout (when extracted) and from region tokens."""
    txt = [r for r in regions if r["kind"] == records.KIND_TEXT]
    if tokenizer is None or len(txt) <= 10:
        return {}
    res = {"ocr_token_recall@5": _ocr_recall(txt, tokenizer, key)}
    if f"layout{key}" in txt[0]["feat"]:
        res["ocr_layout_recall@5"] = _ocr_recall(txt, tokenizer, f"layout{key}")
    if region_tokens:
        res["region_token_ocr_recall@5"] = _ocr_recall(txt, tokenizer, "region_token")
    return res


def image_probe(images) -> dict:
    """Image category (largest object's) from the post-LN class token: linear accuracy."""
    imgs = [i for i in images if i["category"] >= 0]
    tr, te = split_by_image(imgs)
    if not (tr and te and len({t["category"] for t in tr}) > 1):
        return {}
    pred, _, _ = _probe(tr, te, "category")
    return {"global_linear_acc": float(np.mean(pred == np.array([t["category"] for t in te])))}


def _ocr_recall(txt, tokenizer, feat_key, k: int = 5) -> float:
    """One-vs-rest probe over a text region's token ids -> mean recall@k on the test half."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import MultiLabelBinarizer, StandardScaler

    tr, te = split_by_image(txt)
    ids = lambda t: sorted(set(int(i) for i in tokenizer.encode(t["text"], 10) if i >= 0))
    mlb = MultiLabelBinarizer().fit([ids(t) for t in tr + te])
    xtr, xte = _features(tr, feat_key), _features(te, feat_key)
    sc = StandardScaler().fit(xtr)
    ytr = mlb.transform([ids(t) for t in tr])
    keep = ytr.sum(0) > 0
    clf = OneVsRestClassifier(LogisticRegression(max_iter=300)).fit(sc.transform(xtr), ytr[:, keep])
    scores = clf.decision_function(sc.transform(xte))
    classes = np.array(mlb.classes_)[keep]
    recall = []
    for row, t in zip(scores, te):
        top = set(classes[np.argsort(-row)[:k]].tolist())
        true = set(ids(t))
        recall.append(len(top & true) / max(len(true), 1))
    return float(np.mean(recall))


def random_like(model, seed: int):
    """The same architecture as ``model`` (a ViT or a RICE model), freshly initialised: the
    random-init row every probe table is read against."""
    from flax import nnx

    from rice_jax.models.rice import RICEModel
    from rice_jax.models.vit import ViT

    if isinstance(model, RICEModel):
        return RICEModel(model.cfg, rngs=nnx.Rngs(seed))
    return ViT(model.cfg, rngs=nnx.Rngs(seed))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", required=True,
                    help="the backbone spec (rice_jax.backbones): ckpt:RUN, hf:DIR, hub:ID, preset:NAME, regions:ckpt:RUN")
    ap.add_argument("--data", required=True, help="held-out region dataset (synthetic for the dense probe)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--layer", type=int, default=DEFAULT_LAYER,
                    help="hidden state the probes read: 0 = patch embedding, i = after block i, negative from the "
                         f"end (default {DEFAULT_LAYER}: the penultimate block, the best measured)")
    ap.add_argument("--all-layers", action="store_true", help="also report region probes at every depth")
    ap.add_argument("--region-layers", type=int, default=None,
                    help="probe region tokens from K parameter-free region blocks on the backbone (default: a "
                         "checkpoint's own trained region model, none for an HF model)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    tok = for_dataset(a.data)
    # A checkpoint that trained region tokens is read as the RICE model it trained (its region
    # settings and parameters); --region-layers K reads a backbone with K parameter-free region blocks.
    model = backbones.load(backbones.parse(a.backbone, backbones.JAX_SCHEMES, what="--backbone"),
                           regions=a.region_layers is None)
    res = evaluate_backbone(model, a.data, a.image_size, tok, layer=a.layer, region_layers=a.region_layers or 0,
                            all_layers=a.all_layers)
    print(json.dumps(res, indent=2))
    if a.out:
        storage.write_text_atomic(a.out, json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    cli.run(main)
