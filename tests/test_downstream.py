"""rice_jax.downstream: metrics against hand-computed values."""
import numpy as np
import pytest

from rice_jax.downstream.metrics import ReferringIoU, SemanticIoU


def _mask(h, w, cells):
    m = np.zeros((h, w), bool)
    for r, c in cells:
        m[r, c] = True
    return m


def test_ciou_and_giou_by_hand():
    # Expression 1: pred 4 px, target 2 px inside it -> I 2, U 4, IoU 0.5.
    # Expression 2: pred 1 px, target 3 px, overlap 1 -> I 1, U 3, IoU 1/3.
    # Expression 3: both empty -> counts as IoU 1, adds nothing to the cumulative sums.
    p1, g1 = _mask(3, 3, [(0, 0), (0, 1), (1, 0), (1, 1)]), _mask(3, 3, [(0, 0), (1, 1)])
    p2, g2 = _mask(3, 3, [(2, 2)]), _mask(3, 3, [(2, 0), (2, 1), (2, 2)])
    p3 = g3 = np.zeros((3, 3), bool)
    m = ReferringIoU()
    m.update(np.stack([p1, p2]), np.stack([g1, g2]))
    m.update(p3[None], g3[None])                        # batching does not matter
    r = m.result()
    assert r["ciou"] == pytest.approx(3 / 7)            # (2 + 1) / (4 + 3)
    assert r["giou"] == pytest.approx((0.5 + 1 / 3 + 1) / 3)
    assert r["expressions"] == 3
    one = ReferringIoU()
    one.update(np.stack([p1, p2, p3]), np.stack([g1, g2, g3]))
    assert one.result() == r


def test_miou_by_hand_with_ignored_pixels():
    target = np.array([[0, 0, 1], [1, 2, -1]])
    pred = np.array([[0, 1, 1], [1, 0, 2]])
    m = SemanticIoU(num_classes=4, ignore_index=-1)
    m.update(pred[None], target[None])
    r = m.result()
    # class 0: I 1 (0,0), U = target{(0,0),(0,1),} + pred{(0,0),(1,1)} -> {(0,0),(0,1),(1,1)} = 3 -> 1/3
    # class 1: I 2 {(0,2),(1,0)}, U {(0,1),(0,2),(1,0)} = 3 -> 2/3
    # class 2: I 0, U {(1,1)} = 1 -> 0; class 3: absent everywhere -> not averaged
    assert r["per_class_iou"][:3] == pytest.approx([1 / 3, 2 / 3, 0.0]) and r["per_class_iou"][3] is None
    assert r["miou"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert r["pixel_acc"] == pytest.approx(3 / 5) and r["classes_present"] == 3
    with pytest.raises(ValueError, match="outside"):
        m.update(np.array([[5]]), np.array([[0]]))


# --------------------------------------------------------------------------------------------
# Resampling, ground truth, the tasks end to end (TFDS mock data, synthetic data, two backbone kinds)
# --------------------------------------------------------------------------------------------
import json

import jax
import jax.numpy as jnp

from rice_jax.data import records, synthetic
from rice_jax.downstream import common, sources, table
from rice_jax.downstream.encoders import FrozenEncoder


def test_upsampling_is_jax_bilinear_resize():
    x = np.random.default_rng(0).normal(size=(3, 5, 7)).astype(np.float32)
    got = common.upsample(x, 19, 23)
    want = jax.image.resize(jnp.asarray(x), (3, 19, 23), "bilinear", antialias=False)
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)


def _resolve(expr, objects, words):
    """An independent reader of a synthetic expression: every region it could denote."""
    if expr.startswith("the word "):
        return [k for k, w in words if w == expr[len("the word "):]]
    textures = {v: k for k, v in sources.TEXTURE_WORDS.items()}

    def named(phrase):
        toks = phrase.split()
        if len(toks) == 2:
            return [k for k, (s, t, _) in objects.items() if s == toks[1] and t == textures[toks[0]]]
        return [k for k, (s, _, _) in objects.items() if s == toks[0]]

    body = expr[len("the "):]
    for rel in sources.RELATIONS:
        if f" {rel} the " in body:
            head, ref = body.split(f" {rel} the ")
            anchors = named(ref)
            assert len(anchors) == 1, (expr, anchors)
            return [k for k in named(head) if sources._relation(objects[k][2], objects[anchors[0]][2], rel)]
    return named(body)


def test_synthetic_referring_expressions_each_name_exactly_their_region():
    seen = 0
    for i in range(60):
        img, boxes, kinds, texts, cats, sem = synthetic.render_image(np.random.default_rng([5, i]))
        objects = {k: (*synthetic.CATEGORIES[cats[k]].split("/"), boxes[k]) for k in range(len(kinds))
                   if kinds[k] == records.KIND_OBJECT}
        words = [(k, texts[k]) for k in range(len(kinds)) if kinds[k] == records.KIND_TEXT]
        for k, expr in sources.referring_expressions(boxes, kinds, texts, cats, np.random.default_rng(i)):
            assert _resolve(expr, objects, words) == [k], (i, expr)
            m = sources.region_mask(sem, boxes[k], kinds[k], cats[k])
            assert m.any() and m.shape == sem.shape
            seen += 1
    assert seen > 200


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tests.helpers import save_random_hf_model

    d = tmp_path_factory.mktemp("mlcd")
    save_random_hf_model(d, seed=3)
    return d


def _teacher_dir(kind, path):
    import transformers as T

    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8)
    model = {"clip": lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**kw)),
             "siglip": lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**kw))}[kind]()
    model.save_pretrained(str(path))
    if kind == "siglip":   # SigLIP's own pixel statistics, for the PyTorch side (the JAX tower knows them)
        (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    return path


@pytest.mark.parametrize("kind", ["mlcd", "clip", "siglip"])
def test_the_jax_and_pytorch_encoders_of_one_folder_agree(kind, hf_dir, tmp_path):
    """``hf:`` (our JAX ViT or teacher tower) and ``transformers:`` (PyTorch) of the same weights
    give the same patch tokens at the probe layer (the penultimate block) and the same ROI features."""
    folder = hf_dir if kind == "mlcd" else _teacher_dir(kind, tmp_path / kind)
    side, grid, dim = (56, 4, 64) if kind == "mlcd" else (32, 4, 32)
    x = np.random.default_rng(0).integers(0, 256, (2, side, side, 3), dtype=np.uint8)
    boxes = np.array([[[0.1, 0.1, 0.6, 0.5]]] * 2, np.float32)
    valid = np.ones((2, 1), bool)
    a = FrozenEncoder(f"hf:{folder}")(x, boxes, valid)
    b = FrozenEncoder(f"transformers:{folder}")(x, boxes, valid)
    assert a["patches"].shape == b["patches"].shape == (2, grid, grid, dim)
    np.testing.assert_allclose(a["patches"], b["patches"], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(a["roi"], b["roi"], rtol=2e-3, atol=2e-3)


def _image(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _refcoco_examples(n):
    """RefCOCO examples in the decoded form ``tfds.data_source`` returns (masks the image's size)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        h, w = int(rng.integers(40, 70)), int(rng.integers(40, 70))
        masks, raws = [], []
        for k in range(2):
            m = np.zeros((h, w, 1), np.uint8)
            y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
            m[y:y + h // 3, x:x + w // 3] = 1
            masks.append(m)
            raws.append(np.array([f"the thing number {k}", f"object {k} on the {'left' if k else 'right'}"]))
        out.append({"image": _image(rng, h, w), "image/id": i,
                    "objects": {"mask": np.stack(masks), "refexp": {"raw": np.stack(raws)},
                                "bbox": np.zeros((2, 4), np.float32), "label": np.zeros(2, np.int64)}})
    return out


def _ade_examples(n):
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        h, w = int(rng.integers(40, 70)), int(rng.integers(40, 70))
        a = np.zeros((h, w, 3), np.uint8)
        a[: h // 2] = int(rng.integers(1, 151))            # class 1..150; the rest stays 0 ("other", ignored)
        a[h // 2:, : w // 2] = int(rng.integers(1, 151))
        out.append({"image": _image(rng, h, w), "annotation": a})
    return out


def test_tfds_referring_and_semantic_tasks_end_to_end_on_mock_data(hf_dir):
    import tensorflow_datasets as tfds

    def data_source(builder, split=None, **kw):
        return _refcoco_examples(6) if builder.name == "ref_coco" else _ade_examples(6)

    enc = FrozenEncoder(f"hf:{hf_dir}")
    with tfds.testing.mock_data(as_data_source_fn=data_source):
        ref = table.run_task(enc, "refseg", "tfds:ref_coco/refcoco_unc", steps=3, log=None)
        sem = table.run_task(enc, "semseg", "tfds:scene_parse150", steps=3, log=None)
    assert set(ref["splits"]) == {"validation", "testA", "testB"}
    for split in ref["splits"].values():
        assert split["expressions"] == 6 * 2 * 2 and 0 <= split["ciou"] <= 1 and 0 <= split["giou"] <= 1
    assert ref["train_expressions"] == 24 and ref["skipped"] == {}
    assert set(sem["splits"]) == {"test"} and sem["num_classes"] == 150
    assert 0 <= sem["splits"]["test"]["miou"] <= 1 and sem["splits"]["test"]["classes_present"] >= 2


def test_tfds_random_mock_examples_are_skipped_and_counted_not_fatal(hf_dir):
    """TFDS's default mock examples are inconsistent (masks of other sizes than their image): the
    reader skips each with its reason instead of failing or training on a misaligned mask."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=3):
        src = sources.open_source("tfds:ref_coco/refcoco_unc")
        got = list(src.examples("referring", "validation"))
    assert sum(src.skipped.values()) >= 3 and len(got) + src.skipped["image_without_expression"] == 3


def test_two_backbone_kinds_through_the_table_command(hf_dir, tmp_path, capsys):
    d = tmp_path / "syn"
    synthetic.build(str(d), 24, seed=4, num_shards=1)
    out = tmp_path / "down.json"
    table.main(["--backbone", f"jax=hf:{hf_dir}", "--backbone", f"torch=transformers:{hf_dir}",
                "--task", f"regcls=synthetic:{d}", "--task", f"refseg=synthetic:{d}", "--steps", "2",
                "--out", str(out)])
    rec = json.loads(out.read_text())
    rows = {(r["backbone"], r["task"]): r for r in rec["rows"]}
    assert set(rows) == {(b, t) for b in ("jax", "torch") for t in ("regcls", "refseg")}
    # The same weights through both paths: the same probe accuracy (features agree to ~1e-3).
    assert rows["jax", "regcls"]["top1"] == pytest.approx(rows["torch", "regcls"]["top1"], abs=0.05)
    assert "| jax |" in capsys.readouterr().out


def test_coco_tfds_boxes_become_pixel_boxes_and_crowds_are_left_out():
    """TFDS's COCO builder needs TensorFlow to construct, so its examples are fed to the reader
    directly: normalised (ymin, xmin, ymax, xmax) -> pixel xyxy; crowd boxes excluded."""
    src = sources.TFDSSource("coco/2017")
    ex = {"image": np.zeros((50, 100, 3), np.uint8),
          "objects": {"bbox": np.array([[0.1, 0.2, 0.5, 0.6], [0, 0, 1, 1], [0.2, 0.0, 0.4, 0.5]], np.float32),
                      "label": np.array([3, 7, 79]), "is_crowd": np.array([False, True, False])}}
    src._sources["validation"] = [ex]
    (img, boxes, labels), = src.examples("regions", "validation")
    np.testing.assert_allclose(boxes, [[20, 5, 60, 25], [0, 10, 50, 20]], atol=1e-4)
    assert labels.tolist() == [3, 79] and img.size == (100, 50)


def test_region_classification_from_imported_coco_records(hf_dir, tmp_path):
    from PIL import Image

    from rice_jax.data import coco

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    images, anns = [], []
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": 40, "width": 60})
        anns += [{"image_id": i, "bbox": [5, 5, 20, 20], "category_id": 1 + (i % 3)},
                 {"image_id": i, "bbox": [30, 10, 25, 25], "category_id": 1 + ((i + 1) % 3)}]
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                   "categories": [{"id": c} for c in (1, 2, 3)]}))
    stats = coco.ImportStats()
    coco.import_to_records(coco.iter_coco(tmp_path / "ann.json", tmp_path / "img", stats=stats), tmp_path / "rec",
                           stats, 1, {})
    res = table.run_task(FrozenEncoder(f"hf:{hf_dir}"), "regcls", f"records:{tmp_path / 'rec'}", log=None)
    assert res["train_regions"] == 8 and res["splits"]["test"]["regions"] == 8
    assert 0 <= res["splits"]["test"]["top1"] <= 1 and res["skipped"] == {}


def test_referring_head_with_a_local_hf_text_encoder(hf_dir, tmp_path):
    """``text_encoder``: a frozen HF text encoder (a random tiny BERT and its word-piece vocabulary
    saved here) feeds the same decoder end to end, in place of the trained word vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizer

    words = sorted({w for w in " ".join(["the word", *sources.TEXTURE_WORDS.values(), *synthetic.SHAPES,
                                         *sources.RELATIONS, *synthetic.WORDS]).split()})
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    BertTokenizer(str(tmp_path / "bert" / "vocab.txt")).save_pretrained(str(tmp_path / "bert"))
    BertModel(BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(str(tmp_path / "bert"))
    d = tmp_path / "syn"
    synthetic.build(str(d), 16, seed=6, num_shards=1)
    res = table.run_task(FrozenEncoder(f"hf:{hf_dir}"), "refseg", f"synthetic:{d}", steps=3,
                         text_encoder=str(tmp_path / "bert"), log=None)
    assert res["text"] == "text encoder BertModel" and res["splits"]["test"]["expressions"] > 10
    assert 0 <= res["splits"]["test"]["ciou"] <= 1
