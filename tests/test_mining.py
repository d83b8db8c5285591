"""Region mining: proposals (Felzenszwalb, SAM), OCR (RapidOCR, PaddleOCR results), the mine
command (units, atomic shards, kill -9 resume), engines (in-process, process pool, Ray) agree,
and a mined folder of images trains."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from rice_jax.data import coco, records, synthetic
from rice_jax.mining import mine, ocr, proposals

ROOT = Path(__file__).resolve().parents[1]


def _photos():
    from sklearn.datasets import load_sample_images

    return [np.asarray(im) for im in load_sample_images().images]   # china.jpg, flower.jpg (427 x 640)


def _recall(gt: np.ndarray, boxes: np.ndarray, thr: float = 0.5) -> float:
    if len(gt) == 0:
        return 1.0
    if len(boxes) == 0:
        return 0.0
    return float((proposals.box_iou(gt, boxes).max(1) >= thr).mean())


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _shapes_on_photo(rng, photo: np.ndarray, size=(320, 240)):
    """A random crop of a photo with 2-4 filled shapes (60-140 px) in random colours; their boxes."""
    h, w = photo.shape[:2]
    x, y = int(rng.integers(0, w - size[0])), int(rng.integers(0, h - size[1]))
    img = Image.fromarray(photo[y:y + size[1], x:x + size[0]].copy())
    d = ImageDraw.Draw(img)
    boxes = []
    for _ in range(int(rng.integers(2, 5))):
        for _try in range(30):
            s = int(rng.integers(60, 141))
            bx, by = int(rng.integers(0, size[0] - s)), int(rng.integers(0, size[1] - s))
            if not any(bx < b[2] and b[0] < bx + s and by < b[3] and b[1] < by + s for b in boxes):
                break
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            d.rectangle([bx, by, bx + s - 1, by + s - 1], fill=colour)
        elif kind == 1:
            d.ellipse([bx, by, bx + s - 1, by + s - 1], fill=colour)
        else:
            d.polygon([(bx + s / 2, by), (bx + s - 1, by + s - 1), (bx, by + s - 1)], fill=colour)
        boxes.append([bx, by, bx + s, by + s])
    return np.asarray(img), np.asarray(boxes, np.float32)


# ----------------------------------------------------------------------------- boxes
def test_box_iou_and_nms_against_brute_force():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (40, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 40, (40, 2))], 1)
    scores = rng.uniform(size=40)
    iou = proposals.box_iou(boxes, boxes)
    for i in range(0, 40, 7):
        for j in range(0, 40, 5):
            a, b = boxes[i], boxes[j]
            inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            assert iou[i, j] == pytest.approx(inter / union, rel=1e-9)
    keep = proposals.nms(boxes, scores, 0.3)
    kept = set(keep.tolist())
    assert list(keep) == sorted(keep, key=lambda i: -scores[i])
    sub = iou[np.ix_(keep, keep)]
    assert (sub[~np.eye(len(keep), dtype=bool)] <= 0.3).all()
    for i in set(range(40)) - kept:     # every suppressed box overlaps a better kept one
        assert any(iou[i, k] > 0.3 and scores[k] >= scores[i] for k in kept)
    assert len(proposals.nms(boxes, scores, 0.3, max_keep=3)) == 3


# ----------------------------------------------------------------------------- proposers
@pytest.mark.parametrize("seed", [11, 12])
def test_felzenszwalb_recalls_synthetic_objects(seed):
    """The weight-free proposer on the quickstart's images finds the drawn objects (IoU >= 0.5)."""
    prop = proposals.parse("felzenszwalb")
    hits = total = 0
    for i in range(30):
        img, boxes, kinds, *_ = synthetic.render_image(np.random.default_rng([seed, i]))
        gt = boxes[np.asarray(kinds) == records.KIND_OBJECT]
        found, scores = prop(np.asarray(img))
        assert found.dtype == np.float32 and len(found) <= 16 and (np.diff(scores) <= 0).all()
        hits += int(round(_recall(gt, found) * len(gt)))
        total += len(gt)
    assert hits / total >= 0.8, f"recall {hits}/{total}"


def test_felzenszwalb_recalls_shapes_drawn_on_photos():
    prop = proposals.parse("felzenszwalb")
    rng = np.random.default_rng(3)
    hits = total = 0
    for i in range(16):
        img, gt = _shapes_on_photo(rng, _photos()[i % 2])
        found, _ = prop(img)
        hits += int(round(_recall(gt, found) * len(gt)))
        total += len(gt)
    assert hits / total >= 0.8, f"recall {hits}/{total}"


def test_proposer_specs_and_size_rules():
    f = proposals.parse("felzenszwalb:scales=100+300,sigma=0.5,pairs=0,work=256", min_short_edge=40,
                        max_per_image=5)
    assert f.scales == (100.0, 300.0) and f.sigma == 0.5 and not f.pairs and f.work_size == 256
    img, gt = _shapes_on_photo(np.random.default_rng(0), _photos()[0])
    boxes, _ = f(img)
    assert len(boxes) <= 5 and (np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= 40).all()
    assert (boxes[:, 2] <= img.shape[1]).all() and (boxes[:, 3] <= img.shape[0]).all()
    for bad, msg in (("felzenszwalb:bogus=1", "unknown option"), ("selective", "use felzenszwalb"),
                     ("sam:", "needs a directory")):
        with pytest.raises(ValueError, match=msg):
            proposals.parse(bad)
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        proposals.parse("sam:/nonexistent/sam")


def test_sam2_folder_is_refused_with_advice(tmp_path):
    from transformers import Sam2Config

    Sam2Config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="SAM 2 folders are not supported yet"):
        proposals.parse(f"sam:{tmp_path}")


def _tiny_sam(path, kind="sam"):
    import torch

    torch.manual_seed(0)
    if kind == "sam":
        from transformers import SamConfig, SamModel

        cfg = SamConfig(vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=256,
                                           patch_size=16, output_channels=32, mlp_dim=64, window_size=4,
                                           global_attn_indexes=[1], num_pos_feats=16),
                        prompt_encoder_config=dict(hidden_size=32, image_size=256, patch_size=16, mask_input_channels=4),
                        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                                 iou_head_hidden_dim=32))
        SamModel(cfg).eval().save_pretrained(path)
        # What a hub SAM folder carries (SamImageProcessor itself imports torchvision, unusable here).
        (Path(path) / "preprocessor_config.json").write_text(json.dumps({
            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
            "longest_edge": 256, "image_processor_type": "SamImageProcessor"}))
    return path


def test_sam_proposer_on_a_tiny_random_model(tmp_path):
    """The SAM path end to end (random weights, thresholds off): valid, in-image, deduplicated,
    deterministic boxes. Random weights give masks scattered over the whole frame, so the
    whole-image rule is relaxed here; the geometry is checked on known masks below."""
    d = _tiny_sam(tmp_path / "sam")
    settings = proposals.SamSettings(points_per_side=6, points_per_batch=16, pred_iou_thresh=0.0,
                                     stability_thresh=0.0, filter=proposals.BoxFilter(max_area_frac=1.0, nms_iou=0.6))
    prop = proposals.Sam(str(d), settings)
    assert prop.kind == "sam" and prop.input_size == 256
    img, _ = _shapes_on_photo(np.random.default_rng(1), _photos()[1], size=(300, 200))
    boxes, scores = prop(img)
    assert 0 < len(boxes) <= 16
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes >= 0).all() and (boxes[:, 2] <= 300).all() and (boxes[:, 3] <= 200).all()
    iou = proposals.box_iou(boxes, boxes)
    assert (iou[~np.eye(len(boxes), dtype=bool)] <= 0.6 + 1e-6).all()
    again = proposals.Sam(str(d), settings)(img)
    np.testing.assert_array_equal(boxes, again[0])
    np.testing.assert_array_equal(scores, again[1])


def test_sam_boxes_from_mask_logits_map_back_to_image_pixels(tmp_path):
    """Known low-res masks -> boxes: the logit thresholds (predicted IoU, stability) and the
    mapping from the padded 256-px input frame (64 x 64 logits, 4 px per cell) to the image."""
    prop = proposals.Sam(str(_tiny_sam(tmp_path / "sam")), proposals.SamSettings(pred_iou_thresh=0.5,
                                                                                  stability_thresh=0.9))
    logits = np.full((3, 64, 64), -10.0, np.float32)
    logits[0, 10:20, 5:15] = 10.0          # crisp mask: kept
    logits[1, 30:40, 30:50] = 10.0         # crisp, but predicted IoU 0.3: dropped
    logits[2, 0:20, 0:20] = 0.5            # soft mask (unstable at ±1): dropped
    logits[2, 5:8, 5:8] = 10.0
    boxes, scores = prop._boxes_from_logits(logits, np.array([0.9, 0.3, 0.95], np.float32))
    np.testing.assert_array_equal(boxes, [[20, 40, 60, 80]])
    assert scores[0] == pytest.approx(0.9)
    # A 300 x 200 image fills the input's width (scale 256/300) and is padded below.
    _, fx, fy, nw, nh = prop._preprocess(np.zeros((200, 300, 3), np.uint8))
    assert (nw, nh) == (256, 171) and fx == fy == pytest.approx(256 / 300)


# ----------------------------------------------------------------------------- OCR
WORDS = ("river", "garden", "yellow", "window", "market", "silver", "planet", "forest", "candle", "harbor",
         "pencil", "orange", "marble", "bridge", "violet", "rocket")


def _words_on_photo(photo: np.ndarray, words, rng):
    img = Image.fromarray(photo.copy())
    d = ImageDraw.Draw(img)
    boxes = []
    for i, word in enumerate(words):
        font = ImageFont.load_default(size=int(rng.integers(34, 44)))
        x, y = 20 + (i % 2) * 300, 20 + (i // 2) * 95
        d.text((x, y), word, font=font, fill=(10, 10, 10), stroke_width=3, stroke_fill=(250, 250, 250))
        boxes.append(d.textbbox((x, y), word, font=font, stroke_width=3))
    return np.asarray(img), np.asarray(boxes, np.float32)


def test_rapidocr_reads_words_rendered_on_photos():
    engine = ocr.parse("rapidocr")
    rng = np.random.default_rng(0)
    exact = total = located = 0
    for p, photo in enumerate(_photos()):
        words = WORDS[p * 8:(p + 1) * 8]
        img, gt = _words_on_photo(photo, words, rng)
        stats = coco.ImportStats()
        got = engine(img, f"photo{p}", stats)
        assert all(r.score >= 0.7 and r.text == ocr.normalize_transcript(r.text) for r in got)
        read = {r.text.lower(): np.asarray(r.box) for r in got}
        for word, box in zip(words, gt):
            total += 1
            if word in read:
                exact += 1
                located += int(proposals.box_iou(box[None], read[word][None])[0, 0] >= 0.5)
    assert exact / total >= 0.8, f"{exact}/{total} words read exactly"
    assert located == exact


def test_transcript_normalisation_and_quads():
    assert ocr.normalize_transcript("  ＨＥＬＬＯ\t wor\nld ") == "HELLO wor ld"
    assert ocr.quad_to_box([[10, 5], [30, 7], [29, 20], [9, 18]]) == (9.0, 5.0, 30.0, 20.0)
    for bad, msg in (("rapidocr:fast", "side=N"), ("rapidocr:dpi=3", "side=N"), ("tesseract", "use none, rapidocr"),
                     ("paddle-json:", "needs a path")):
        with pytest.raises(ValueError, match=msg):
            ocr.parse(bad)


def test_paddle_results_in_both_standard_formats(tmp_path):
    system = tmp_path / "system_results.txt"
    system.write_text(
        "imgs/a.jpg\t" + json.dumps([{"transcription": "Hello ", "points": [[1, 2], [40, 2], [40, 12], [1, 12]],
                                      "score": 0.95},
                                     {"transcription": "faint", "points": [[1, 20], [9, 20], [9, 30], [1, 30]],
                                      "score": 0.4},
                                     {"transcription": "  ", "points": [[1, 1], [2, 1], [2, 2], [1, 2]],
                                      "score": 0.99}]) + "\n")
    stats = coco.ImportStats()
    res = ocr.parse(f"paddle-json:{system}")(np.zeros((50, 50, 3), np.uint8), "x/y/a.jpg", stats)
    assert [(r.text, r.box) for r in res] == [("Hello", (1.0, 2.0, 40.0, 12.0))]
    assert stats["dropped_text_low_confidence"] == 1 and stats["dropped_text_empty_transcript"] == 1
    folder = tmp_path / "v3"
    folder.mkdir()
    (folder / "b_res.json").write_text(json.dumps({"res": {
        "input_path": "/data/b.png", "rec_texts": ["World", "x"], "rec_scores": [0.9, 0.8],
        "rec_polys": [[[5, 5], [25, 5], [25, 15], [5, 15]], [[0, 0], [3, 0], [3, 3], [0, 3]]]}}))
    eng = ocr.parse(f"paddle-json:{folder}")
    assert [r.text for r in eng(np.zeros((50, 50, 3), np.uint8), "b.png", stats)] == ["World", "x"]
    assert eng(np.zeros((5, 5, 3), np.uint8), "missing.png", stats) == []
    assert stats["images_without_ocr_results"] == 1
    (tmp_path / "bad.txt").write_text("no tab here\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: expected 'image_path<TAB>"):
        ocr.parse(f"paddle-json:{tmp_path / 'bad.txt'}")


# ----------------------------------------------------------------------------- the command
def _image_folder(path: Path, n: int, seed: int = 0) -> tuple[Path, dict]:
    """``n`` synthetic images as PNG files (ground truth returned by file name), plus a corrupt
    JPEG and an image too small for ``--min-image-short-edge 64``."""
    path.mkdir(parents=True)
    truth = {}
    for i in range(n):
        img, boxes, kinds, texts, *_ = synthetic.render_image(np.random.default_rng([seed, i]))
        name = f"img{i:03d}.png"
        img.save(path / name)
        truth[name] = (boxes[np.asarray(kinds) == 0], [t for t in texts if t])
    (path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    Image.new("RGB", (40, 30), (120, 120, 120)).save(path / "tiny.png")
    return path, truth


def _dataset_bytes(d: Path) -> dict:
    m = records.read_manifest(d)
    return {"manifest": m, **{s: (d / s).read_bytes() for s in m["shards"]}}


def test_mine_folder_to_dataset_that_clusters_and_trains(tmp_path):
    from rice_jax import train
    from rice_jax.labelling import clustering
    from rice_jax.configs.rice import get_config
    from rice_jax.data import tokenizer

    folder, truth = _image_folder(tmp_path / "imgs", 14)
    out = tmp_path / "mined"
    settings = mine.MiningSettings(proposals="felzenszwalb", ocr="rapidocr", min_image_short_edge=64)
    m = mine.mine(str(out), images=str(folder), settings=settings, images_per_unit=6, show_progress=False)
    imp = m["import"]
    assert imp["images_seen"] == 16 and imp["skipped_corrupt_image"] == 1 and imp["skipped_small_image"] == 1
    assert m["num_images"] == imp["images_written"] == 14 and len(m["shards"]) == 3
    assert m["mining"]["settings"]["proposals"] == "felzenszwalb" and m["source"]["mined"]["images"] == str(folder)
    recs = list(records.RecordSource(out))
    assert sorted(r.image_id for r in recs) == sorted(truth)
    hits = total = read = words = 0
    for r in recs:
        gt, gt_words = truth[r.image_id]
        hits += int(round(_recall(gt, r.boxes[r.kind == 0]) * len(gt)))
        total += len(gt)
        got = {t.lower() for t, k in zip(r.text, r.kind) if k == records.KIND_TEXT}
        read += sum(w in got for w in gt_words)
        words += len(gt_words)
        assert (r.category == -1).all() and (r.cluster == -1).all()
    assert hits / total >= 0.8 and read / words >= 0.5, (hits, total, read, words)
    # The importers' consumers take it unchanged: tokenizer, clustering, training.
    tokenizer.build_for_dataset(out, vocab_size=64)
    clustering.run(out, 6, chunk=64, log=lambda s: None)
    c = get_config("tiny")
    c.data.dir, c.batch_size, c.stages = str(out), 8, ((2, 32),)
    c.optim.warmup_steps, c.checkpoint_every, c.progress_bar, c.loss.num_obj_classes = 1, 2, False, 8
    summary = train.train(c, str(tmp_path / "run"))
    assert summary["end_step"] == 2 and all(np.isfinite(h["loss"]) for h in summary["history"])


def test_mine_kill9_then_rerun_equals_uninterrupted(tmp_path):
    rng = np.random.default_rng(5)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(_shapes_on_photo(rng, _photos()[i % 2])[0]).save(folder / f"p{i:02d}.png")
    args = ["--images", str(folder), "--proposals", "felzenszwalb", "--ocr", "none", "--images-per-unit", "1"]
    ref = tmp_path / "ref"
    mine.main(["--out", str(ref), *args])
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "rice_jax.mining.mine", "--out", str(out), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / mine.MINING_DIR / "unit-000002.json"
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((out / mine.MINING_DIR).glob("unit-*.json")))
    assert 3 <= done < 12, f"kill landed after {done} units"
    assert not (out / records.MANIFEST).exists()
    mine.main(["--out", str(out), *args])
    assert _dataset_bytes(out) == _dataset_bytes(ref)
    assert not list(out.glob(".*tmp*"))  # at most the shard in flight was lost; no temp file published
    # A rerun with other settings into the same folder is refused, not mixed in.
    with pytest.raises(ValueError, match="different settings"):
        mine.main(["--out", str(out), *args[:-2], "--images-per-unit", "1", "--max-proposals", "3"])


def test_engines_agree_in_process_pool_and_ray(tmp_path):
    pytest.importorskip("ray")
    folder, _ = _image_folder(tmp_path / "imgs", 8, seed=3)
    settings = mine.MiningSettings(proposals="felzenszwalb", ocr="none")
    got = {}
    for name, kw in (("inproc", dict(engine="local", workers=1)), ("pool", dict(engine="local", workers=2)),
                     ("ray", dict(engine="ray", workers=2))):
        mine.mine(str(tmp_path / name), images=str(folder), settings=settings, images_per_unit=3,
                  show_progress=False, **kw)
        got[name] = _dataset_bytes(tmp_path / name)
        assert json.loads((tmp_path / name / mine.MINING_DIR / "timing.json").read_text())["engine"] == kw["engine"]
    assert got["pool"] == got["inproc"] and got["ray"] == got["inproc"]


def test_records_and_tar_inputs(tmp_path):
    """--records keeps the imported regions and adds OCR read elsewhere (PaddleOCR results);
    --tar shards give the records a folder gives."""
    src = tmp_path / "src"
    synthetic.build(str(src), 6, seed=2, num_shards=2)
    originals = {r.image_id: r for r in records.RecordSource(src)}
    paddle = tmp_path / "ocr.txt"
    paddle.write_text("".join(f"{k}\t" + json.dumps([{"transcription": "EXTRA", "score": 0.9,
                                                      "points": [[1, 1], [20, 1], [20, 9], [1, 9]]}]) + "\n"
                              for k in originals))
    out = tmp_path / "plus_ocr"
    m = mine.main(["--out", str(out), "--records", str(src), "--proposals", "none", "--ocr", f"paddle-json:{paddle}"])
    assert m == records.read_manifest(out)
    assert m["num_text_regions"] == records.read_manifest(src)["num_text_regions"] + 6
    for r in records.RecordSource(out):
        o = originals[r.image_id]
        n = o.num_regions
        np.testing.assert_array_equal(r.boxes[:n], o.boxes)
        np.testing.assert_array_equal(r.category[:n], o.category)
        assert r.text[:n] == o.text and r.text[n:] == ["EXTRA"] and r.image == o.image
    dropped = tmp_path / "dropped"
    mine.main(["--out", str(dropped), "--records", str(src), "--proposals", "none", "--ocr",
               f"paddle-json:{paddle}", "--drop-input-regions"])
    assert all(r.text == ["EXTRA"] for r in records.RecordSource(dropped))
    # tar shards == the same files as a folder (member names are the keys, as relative paths are).
    folder, _ = _image_folder(tmp_path / "imgs", 6, seed=4)
    names = sorted(p.name for p in folder.glob("img*.png"))
    for t in range(2):
        with tarfile.open(tmp_path / f"shard-{t:03d}.tar", "w") as tf:
            for name in names[t * 3:(t + 1) * 3]:
                tf.add(folder / name, arcname=name)
    (folder / "broken.jpg").unlink()
    (folder / "tiny.png").unlink()
    common = ["--proposals", "felzenszwalb", "--ocr", "none"]
    mine.main(["--out", str(tmp_path / "from_tar"), "--tar", str(tmp_path / "shard-{000..001}.tar"), *common])
    mine.main(["--out", str(tmp_path / "from_dir"), "--images", str(folder), "--images-per-unit", "3", *common])
    a, b = _dataset_bytes(tmp_path / "from_tar"), _dataset_bytes(tmp_path / "from_dir")
    assert a.pop("manifest")["num_images"] == b.pop("manifest")["num_images"] == 6
    assert a == b


def test_brace_expansion_and_input_errors(tmp_path):
    assert mine.expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert mine.expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    with pytest.raises(FileNotFoundError, match="2 file.s. missing"):
        mine.resolve_tars(str(tmp_path / "x{1..2}.tar"))
    with pytest.raises(FileNotFoundError, match="nothing matches"):
        mine.resolve_tars(str(tmp_path / "*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        mine.mine(str(tmp_path / "o1"), images=str(tmp_path / "empty"), show_progress=False)
    with pytest.raises(ValueError, match="sa1b-annotations is for --sa1b"):
        mine.mine(str(tmp_path / "o2"), images=str(tmp_path / "empty"),
                  settings=mine.MiningSettings(proposals=mine.ANNOTATIONS), show_progress=False)
    r = subprocess.run([sys.executable, "-m", "rice_jax.mining.mine", "--out", str(tmp_path / "o"), "--images",
                        str(tmp_path / "empty")], capture_output=True, text=True, env={**os.environ,
                                                                                        "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:") and "no image files" in r.stderr


def test_presets_paper_settings_and_overrides():
    p = mine.preset_settings("paper")
    assert (p.min_image_short_edge, p.min_box_short_edge, p.ocr_min_confidence, p.max_proposals) == (336, 128, 0.7, 5)
    assert mine.preset_settings("paper", max_proposals=8, ocr=None).max_proposals == 8
    assert mine.preset_settings("default") == mine.MiningSettings()
    with pytest.raises(ValueError, match="use one of default, paper"):
        mine.preset_settings("huge")


# ----------------------------------------------------------------------------- tar inputs at scale
def _webdataset_tar(path: Path, keys: list[str], seed: int, size=(112, 112)) -> dict:
    """A web-dataset tar: per key an image, a caption (.txt) and metadata (.json); returns key -> caption."""
    captions = {}
    with tarfile.open(path, "w") as tf:
        for i, key in enumerate(keys):
            img, *_ = synthetic.render_image(np.random.default_rng([seed, i]))
            img = img.resize(size)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            captions[key] = f"a caption for {key}"
            meta = {"url": f"https://example.com/{key}.png", "original_width": 1024, "key": key,
                    "exif": {"nested": "dropped"}}
            for ext, data in (("png", buf.getvalue()), ("txt", captions[key].encode()),
                              ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return captions


def _unit_pids(out: Path) -> dict:
    return {p.name: json.loads(p.read_text())["source"] for p in (out / mine.MINING_DIR).glob("unit-*.json")}


def test_tars_damaged_skipped_counted_growing_and_metadata(tmp_path, capsys):
    """An absolute glob of web-dataset tars, one truncated: rc 0, the good tars mined with their
    captions/metadata, the damage counted with its reason; one more tar mines only it; the damaged
    tar, once complete, is mined again; a tar that disappears is refused unless --forget-missing."""
    shards = tmp_path / "shards"
    shards.mkdir()
    captions = {}
    for t in range(3):
        captions.update(_webdataset_tar(shards / f"part-{t:03d}.tar", [f"s{t}{i:02d}" for i in range(3)], seed=t))
    whole = (shards / "part-001.tar").read_bytes()
    (shards / "part-001.tar").write_bytes(whole[:len(whole) // 2 + 100])   # still uploading / damaged
    out = tmp_path / "mined"
    args = ["--out", str(out), "--tar", str(shards / "*.tar"), "--proposals", "felzenszwalb", "--ocr", "none"]
    m = mine.main(args)
    imp = m["import"]
    assert imp["damaged_tar"] == 1 and imp.get("skipped_sample_cut_by_damage", 0) <= 1
    (bad,) = m["mining"]["damaged_units"]
    assert bad["source"].endswith("part-001.tar") and bad["reason"] and bad["size"] == len(whole) // 2 + 100
    recs = {r.image_id: r for r in records.RecordSource(out)}
    good = {k for k in captions if not k.startswith("s1")}
    assert good <= {Path(k).stem for k in recs} and len(recs) < 9
    for key, r in recs.items():
        stem = Path(key).stem
        assert r.meta["caption"] == captions[stem] and r.meta["url"].endswith(f"{stem}.png")
        assert r.meta["original_width"] == 1024 and "exif" not in r.meta
    assert m["source"]["mined"] == {"tar": str(shards / "*.tar")}
    # One more tar: only it is mined, the manifest grows.
    captions.update(_webdataset_tar(shards / "part-003.tar", ["s300", "s301"], seed=3))
    before = {p: p.stat().st_mtime_ns for p in (out / mine.MINING_DIR).glob("unit-*.json")}
    capsys.readouterr()
    m2 = mine.main(args)
    assert "4 unit(s), 3 already done; 1 new unit(s)" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert m2["shards"] == m["shards"] + ["regions-000003.array_record"]
    assert m2["num_images"] == m["num_images"] + 2
    # The damaged tar arrives whole: a rerun mines it again (its size changed), nothing else.
    (shards / "part-001.tar").write_bytes(whole)
    capsys.readouterr()
    m3 = mine.main(args)
    assert "1 damaged unit(s) whose tar changed since" in capsys.readouterr().out
    assert m3["mining"]["damaged_units"] == [] and "damaged_tar" not in m3["import"]
    assert m3["num_images"] == 11 and {Path(r.image_id).stem for r in records.RecordSource(out)} == set(captions)
    # A tar gone from the input: refused with what would be lost; --forget-missing drops it.
    (shards / "part-000.tar").unlink()
    with pytest.raises(ValueError, match=r"no longer names 1 unit\(s\) with 3 mined image\(s\) .first: .*part-000"):
        mine.main(args)
    m4 = mine.main([*args, "--forget-missing"])
    assert m4["num_images"] == 8 and "regions-000000.array_record" not in m4["shards"]
    assert not (out / "regions-000000.array_record").exists()


def test_gcs_tars_stream_without_a_mount(tmp_path):
    """``gs://`` patterns are listed and read through epath (here: the offline GCS stand-in)."""
    from tests.fake_gcs import fake_gcs

    bucket = tmp_path / "gcs" / "bucket" / "laion"
    bucket.mkdir(parents=True)
    for t in range(2):
        _webdataset_tar(bucket / f"{t:05d}.tar", [f"k{t}{i}" for i in range(2)], seed=10 + t)
    local = tmp_path / "local"
    local.mkdir()
    for t in range(2):
        (local / f"{t:05d}.tar").write_bytes((bucket / f"{t:05d}.tar").read_bytes())
    common = ["--proposals", "felzenszwalb", "--ocr", "none"]
    with fake_gcs(str(tmp_path / "gcs")):
        assert mine.resolve_tars("gs://bucket/laion/{00000..00001}.tar") == [
            "gs://bucket/laion/00000.tar", "gs://bucket/laion/00001.tar"]
        m = mine.main(["--out", str(tmp_path / "from_gcs"), "--tar", "gs://bucket/laion/*.tar", *common])
        # A long brace list is checked with one listing per folder, not a request per tar.
        many = tmp_path / "gcs" / "bucket" / "many"
        many.mkdir()
        for i in range(80):
            (many / f"{i:03d}.tar").touch()
        with pytest.raises(FileNotFoundError, match=r"1 file\(s\) missing, first gs://bucket/many/080.tar"):
            mine.resolve_tars("gs://bucket/many/{000..080}.tar")
        assert len(mine.resolve_tars("gs://bucket/many/{000..079}.tar")) == 80
    assert m["num_images"] == 4 and m["mining"]["damaged_units"] == []
    mine.main(["--out", str(tmp_path / "from_local"), "--tar", str(local / "*.tar"), *common])
    a, b = _dataset_bytes(tmp_path / "from_gcs"), _dataset_bytes(tmp_path / "from_local")
    a.pop("manifest"), b.pop("manifest")
    assert a == b


def _sa1b_tar(path: Path, seed: int) -> dict:
    """SA-1B's layout: ``sa_N.jpg`` + ``sa_N.json`` (image info + SAM masks with xywh boxes); the
    JPEG is stored at half the annotated resolution (the boxes must be rescaled). Returns the
    expected kept boxes per image under the paper's rules (short edge >= 128 px, top 5 by score)."""
    rng = np.random.default_rng(seed)
    expected = {}
    with tarfile.open(path, "w") as tf:
        for i in range(2):
            name = f"sa_{seed * 10 + i}"
            jw, jh = 1600, 1200
            arr = rng.integers(0, 255, (jh // 2, jw // 2, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG")
            anns, keep = [], []
            for j in range(9):
                # boxes spread over a grid (no two overlap, so NMS keeps all); short edges 100-500 json px
                bw, bh = float(rng.integers(100, 500)), float(rng.integers(100, 380))
                x, y = (j % 3) * 530.0, (j // 3) * 400.0
                iou, stab = float(rng.uniform(0.8, 1.0)), float(rng.uniform(0.9, 1.0))
                anns.append({"id": j, "bbox": [x, y, bw, bh], "area": bw * bh, "predicted_iou": iou,
                             "stability_score": stab, "segmentation": {"size": [jh, jw], "counts": "xx"}})
                if min(bw, bh) / 2 >= 128:
                    keep.append((iou * stab, [x / 2, y / 2, (x + bw) / 2, (y + bh) / 2]))
            keep.sort(key=lambda t: -t[0])
            expected[f"{name}.jpg"] = np.asarray([b for _, b in keep[:5]], np.float32).reshape(-1, 4)
            doc = {"image": {"image_id": seed * 10 + i, "width": jw, "height": jh, "file_name": f"{name}.jpg"},
                   "annotations": anns}
            for ext, data in (("jpg", buf.getvalue()), ("json", json.dumps(doc).encode())):
                info = tarfile.TarInfo(f"{name}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return expected


def test_sa1b_tars_import_their_boxes_under_the_paper_rules(tmp_path):
    expected = {}
    for t in range(2):
        expected.update(_sa1b_tar(tmp_path / f"sa_{t:06d}.tar", seed=t + 1))
    out = tmp_path / "sa1b"
    m = mine.main(["--out", str(out), "--sa1b", str(tmp_path / "sa_{000000..000001}.tar"), "--ocr", "none",
                   "--preset", "paper"])
    assert m["mining"]["settings"]["proposals"] == mine.ANNOTATIONS
    assert m["mining"]["settings"]["max_proposals"] == 5 and m["import"]["annotation_boxes_read"] == 36
    recs = {r.image_id: r for r in records.RecordSource(out)}
    assert set(recs) == set(expected)
    for key, r in recs.items():
        assert (r.kind == records.KIND_OBJECT).all()
        np.testing.assert_allclose(r.boxes, expected[key], atol=1e-3)
        assert r.meta["file_name"] == key and r.meta["width"] == 1600
    with pytest.raises(ValueError, match="drop --proposals"):
        mine.main(["--out", str(tmp_path / "x"), "--sa1b", str(tmp_path / "sa_000000.tar"), "--proposals", "none"])
    # One dataset of web-dataset tars and SA-1B tars (the paper's mix): the proposer runs on the former only.
    captions = _webdataset_tar(tmp_path / "web-000.tar", ["w0", "w1"], seed=5, size=(400, 360))
    mixed = tmp_path / "mixed"
    m = mine.main(["--out", str(mixed), "--tar", str(tmp_path / "web-000.tar"), "--sa1b", str(tmp_path / "sa_*.tar"),
                   "--proposals", "felzenszwalb", "--ocr", "none", "--preset", "paper"])
    assert m["source"]["mined"] == {"tar": str(tmp_path / "web-000.tar"), "sa1b": str(tmp_path / "sa_*.tar")}
    assert m["mining"]["settings"]["proposals"] == "felzenszwalb" and m["num_images"] == 6
    for r in records.RecordSource(mixed):
        if r.image_id in expected:
            np.testing.assert_allclose(r.boxes, expected[r.image_id], atol=1e-3)
        else:
            assert r.meta["caption"] == captions[Path(r.image_id).stem] and 0 < r.num_regions <= 5
            assert (np.minimum(r.boxes[:, 2] - r.boxes[:, 0], r.boxes[:, 3] - r.boxes[:, 1]) >= 128).all()
    with pytest.raises(ValueError, match="holds a mining run of --sa1b and --tar input, not --images"):
        mine.main(["--out", str(mixed), "--images", str(tmp_path), "--proposals", "felzenszwalb", "--ocr", "none",
                   "--preset", "paper"])


def test_image_list_units_are_byte_ranges_that_cover_it_and_grow(tmp_path):
    """An image list is cut into byte ranges read by seeking (no process lists it whole): the
    units' lines are disjoint and cover the list whatever the line lengths; appending mines
    only the new lines; rewriting the mined part is refused."""
    rng = np.random.default_rng(0)
    names = [f"{'d' * int(rng.integers(1, 30))}/img{i:05d}.png" for i in range(500)]
    lst = tmp_path / "list.txt"
    lst.write_text("".join(n + "\n" for n in names[:300]))
    out = tmp_path / "o"
    (out / mine.MINING_DIR).mkdir(parents=True)
    settings = mine.MiningSettings()
    _, units, _ = mine.reconcile_plan(out, settings, {"image_list": str(lst)}, images_per_unit=16)
    got = [list(mine._list_lines(u)) for u in units]
    assert [n for g in got for n in g] == names[:300]
    assert 12 <= len(units) <= 28 and max(map(len, got)) <= 40
    with open(lst, "a") as f:
        f.write("".join(n + "\n" for n in names[300:]))
    _, units2, change = mine.reconcile_plan(out, settings, {"image_list": str(lst)}, images_per_unit=16)
    assert units2[:len(units)] == units and "new unit(s)" in change
    assert [n for u in units2[len(units):] for n in mine._list_lines(u)] == names[300:]
    lst.write_text("".join(n + "\n" for n in names[1:]))
    with pytest.raises(ValueError, match="rewritten, not appended"):
        mine.reconcile_plan(out, settings, {"image_list": str(lst)}, images_per_unit=16)


def test_image_list_mines_relative_and_absolute_entries(tmp_path):
    folder, truth = _image_folder(tmp_path / "imgs", 4, seed=6)
    lst = tmp_path / "imgs" / "files.txt"
    names = sorted(truth)
    lst.write_text(f"{names[0]}\n{folder / names[1]}\n# a comment\n{names[2]}\nmissing.png\n{names[3]}\n")
    m = mine.main(["--out", str(tmp_path / "o"), "--image-list", str(lst), "--proposals", "felzenszwalb",
                   "--ocr", "none", "--images-per-unit", "2"])
    assert m["num_images"] == 4 and m["import"]["skipped_missing_file"] == 1
    assert m["source"]["mined"] == {"image_list": str(lst)}


# ----------------------------------------------------------------------------- OCR results, tokenizer at scale
def test_paddle_line_results_are_indexed_once_and_read_per_image(tmp_path, capsys):
    lines = tmp_path / "ocr.jsonl"
    docs = [{"input_path": f"/data/im{i}.jpg", "rec_texts": [f"w{i}"], "rec_scores": [0.9],
             "rec_polys": [[[1, 1], [9, 1], [9, 5], [1, 5]]]} for i in range(50)]
    lines.write_text("".join(json.dumps(d) + "\n" for d in docs))
    idx = tmp_path / "index"
    eng = ocr.PaddleResults(lines, index_dir=idx).prepare()
    assert "indexed 50 PaddleOCR result lines" in capsys.readouterr().out
    stats = coco.ImportStats()
    img = np.zeros((10, 10, 3), np.uint8)
    assert [r.text for r in eng(img, "x/im7.jpg", stats)] == ["w7"]
    assert [r.text for r in eng(img, "im49.jpg", stats)] == ["w49"] and eng(img, "im50.jpg", stats) == []
    assert eng.by_name == {}            # nothing held in memory but the index
    ocr.PaddleResults(lines, index_dir=idx).prepare()
    assert "indexed" not in capsys.readouterr().out      # current index: reused
    with open(lines, "a") as f:
        f.write(json.dumps({**docs[0], "rec_texts": ["again"]}) + "\n")
    with pytest.raises(ValueError, match=r"ocr.jsonl:51: results for 'im0.jpg' appear twice"):
        ocr.PaddleResults(lines, index_dir=idx).prepare()
    with pytest.raises(ValueError, match=r"ocr.jsonl:51: results for 'im0.jpg' appear twice"):
        ocr.PaddleResults(lines)


def test_tokenizer_from_a_sample_and_adopted(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from rice_jax.data import tokenizer

    data = tmp_path / "data"
    synthetic.build(str(data), 40, seed=1, num_shards=2)
    texts = {i: tokenizer.record_transcripts(records.RecordSource(data).raw(i)) for i in range(40)}
    idx = tokenizer.sample_indices(40, 10, seed=3)
    assert len(set(idx)) == 10 and list(idx) == sorted(idx)
    np.testing.assert_array_equal(idx, tokenizer.sample_indices(40, 10, seed=3))
    assert not np.array_equal(idx, tokenizer.sample_indices(40, 10, seed=4))
    assert texts[int(idx[0])] == [t for t, k in zip(records.RecordSource(data)[int(idx[0])].text,
                                                   records.RecordSource(data)[int(idx[0])].kind) if k == 1 and t]
    tok = tokenizer.build_for_dataset(data, vocab_size=80, sample=10, seed=3, show_progress=False)
    entry = records.read_manifest(data)["tokenizer"]
    assert entry["sample"] == {"records": 10, "seed": 3} and entry["records_read"] == 10
    assert entry["trained_on"] == sum(len(texts[int(i)]) for i in idx) and entry["of_records"] == 40
    assert tok.vocab_size <= 80
    # Adopt a folder's tokenizer.json (one with start/end tokens, as CLIP's has): copied, recorded, no specials.
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(["open", "shop", "sale"])}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    hf = tmp_path / "hf_tok"
    hf.mkdir()
    t.save(str(hf / "tokenizer.json"))
    assert t.encode("shop").ids == [1, 4, 2]
    tokenizer.main(["--data", str(data), "--tokenizer", f"hf:{hf}"])
    entry = records.read_manifest(data)["tokenizer"]
    assert entry["adopted_from"] == str(hf) and entry["vocab_size"] == 6
    adopted = tokenizer.for_dataset(data)
    assert adopted.encode("Open SHOP sale shop", 5).tolist() == [3, 4, 5, -1, -1]
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        tokenizer.adopt(data, tmp_path / "nothing")


# ----------------------------------------------------------------------------- SAM's device
def test_sam_device_selection_here(tmp_path):
    import torch

    assert proposals.resolve_device("cpu") == "cpu"
    assert proposals.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="use auto, cpu, cuda"):
        proposals.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no GPU"):
            proposals.resolve_device("cuda")
    d = _tiny_sam(tmp_path / "sam")
    prop = proposals.parse(f"sam:{d},points=4,batch=8,device=auto")
    assert str(prop.device).startswith(proposals.resolve_device("auto"))
    assert prop.settings.points_per_batch == 8
    assert mine._gpus_for(mine.MiningSettings(proposals=f"sam:{d},device=cpu")) == 0
    assert mine._gpus_for(mine.MiningSettings(proposals="felzenszwalb")) == 0


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a GPU")
def test_sam_on_the_gpu_matches_the_cpu(tmp_path):
    d = _tiny_sam(tmp_path / "sam")
    img, _ = _shapes_on_photo(np.random.default_rng(2), _photos()[0], size=(300, 200))
    kw = dict(points_per_side=6, pred_iou_thresh=0.0, stability_thresh=0.0)
    gpu = proposals.Sam(str(d), proposals.SamSettings(device="cuda", **kw))
    cpu = proposals.Sam(str(d), proposals.SamSettings(device="cpu", **kw))
    assert str(gpu.device).startswith("cuda")
    (bg, sg), (bc, sc) = gpu(img), cpu(img)
    assert len(bg) == len(bc) and np.abs(bg - bc).max() <= 4.0 and np.abs(sg - sc).max() < 1e-2


def test_max_side_stores_smaller_images_with_their_boxes_scaled(tmp_path):
    """``--max-side``: a 640 x 427 photo is stored re-encoded at 320 px on its longer side, its boxes in
    the stored frame (each the same fraction of the image as mined), the source size in its meta;
    images at or under the side keep their bytes."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    photo = _photos()[0]
    Image.fromarray(photo).save(folder / "big.jpg", quality=92)
    Image.fromarray(photo[:200, :300]).save(folder / "small.png")
    settings = mine.MiningSettings(proposals="felzenszwalb", ocr="none")
    ref = mine.mine(str(tmp_path / "full"), images=str(folder), settings=settings, images_per_unit=4,
                    show_progress=False)
    small = mine.mine(str(tmp_path / "small"), images=str(folder), images_per_unit=4, show_progress=False,
                      settings=mine.MiningSettings(proposals="felzenszwalb", ocr="none", max_side=320))
    assert small["import"]["images_reencoded"] == 1 and "images_reencoded" not in ref["import"]
    full = {r.image_id: r for r in records.RecordSource(tmp_path / "full")}
    for r in records.RecordSource(tmp_path / "small"):
        f = full[r.image_id]
        im = Image.open(io.BytesIO(r.image))
        assert im.size == (r.width, r.height)
        if r.image_id.endswith("big.jpg"):
            assert (r.width, r.height) == (320, 214) and r.format == "jpeg" and r.meta["stored_from"] == [640, 427]
            np.testing.assert_allclose(r.boxes / ([r.width, r.height] * 2), f.boxes / ([f.width, f.height] * 2),
                                       atol=1e-6)
        else:
            assert r.image == f.image and (r.width, r.height) == (300, 200)
            np.testing.assert_array_equal(r.boxes, f.boxes)
