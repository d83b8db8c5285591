"""COCO / OCR / folder importers: bad input is skipped or repaired and counted, never fatal."""
import io
import json

import numpy as np
from PIL import Image

from rice_jax.data import coco, records


def _jpeg(path, w, h, seed=0):
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def test_coco_import_handles_bad_input(tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    good = _jpeg(img_dir / "a.jpg", 80, 60)
    _jpeg(img_dir / "b.jpg", 80, 60, seed=1)
    full = (img_dir / "b.jpg").read_bytes()
    (img_dir / "b.jpg").write_bytes(full[: len(full) // 2])      # truncated JPEG
    _jpeg(img_dir / "c.jpg", 50, 50, seed=2)
    ann = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 60, "width": 80},
                   {"id": 2, "file_name": "b.jpg", "height": 60, "width": 80},
                   {"id": 3, "file_name": "missing.jpg", "height": 10, "width": 10},
                   {"id": 4, "file_name": "c.jpg", "height": 50, "width": 50}],
        "categories": [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}],
        "annotations": [
            {"image_id": 1, "bbox": [10, 10, 20, 15], "category_id": 9},
            {"image_id": 1, "bbox": [70, 50, 30, 30], "category_id": 7},           # partly outside: clipped
            {"image_id": 1, "bbox": [float("nan"), 1, 5, 5], "category_id": 7},    # NaN: dropped
            {"image_id": 1, "bbox": [5, 5, -3, 4], "category_id": 7},              # inverted: dropped
            {"image_id": 1, "bbox": [200, 200, 5, 5], "category_id": 7},           # outside: dropped
            {"image_id": 4, "bbox": [0, 0, 50, 50], "category_id": 7},
            {"image_id": 99, "bbox": [0, 0, 5, 5], "category_id": 7},              # no such image: counted
            {"image_id": 98, "bbox": [0, 0, 5, 5], "category_id": 9},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann).replace("NaN", "NaN"))
    ocr = {"1": [{"bbox": [1, 40, 30, 10], "text": "Hello"}, {"bbox": [1, 1, 5, 5], "text": "  "}],
           "c.jpg": [{"bbox": [2, 2, 20, 8], "text": "world"}],
           "nope.jpg": [{"bbox": [2, 2, 20, 8], "text": "orphan"}]}
    (tmp_path / "ocr.json").write_text(json.dumps(ocr))
    out = tmp_path / "out"
    stats = coco.ImportStats()
    m = coco.import_to_records(coco.iter_coco(tmp_path / "ann.json", img_dir, ocr=tmp_path / "ocr.json", stats=stats),
                               out, stats, 2, {"test": True})
    imp = m["import"]
    assert imp["skipped_corrupt_image"] == 1 and imp["skipped_missing_file"] == 1
    assert imp["dropped_object_nan_box"] == 1 and imp["dropped_object_empty_or_inverted_box"] == 1
    assert imp["dropped_object_box_outside_image"] == 1 and imp["clipped_object_box"] == 1
    assert imp["dropped_text_empty_transcript"] == 1
    assert imp["dropped_object_unknown_image"] == 2 and imp["dropped_text_unknown_image"] == 1
    assert imp["images_written"] == 2 and m["num_images"] == 2
    recs = {r.image_id: r for r in records.RecordSource(out)}
    a = recs["1"]
    assert a.image == good  # bytes kept as found
    np.testing.assert_allclose(a.boxes, [[10, 10, 30, 25], [70, 50, 80, 60], [1, 40, 31, 50]])
    assert a.kind.tolist() == [0, 0, 1] and a.text[2] == "Hello" and a.category.tolist() == [1, 0, -1]
    assert recs["4"].text == ["", "world"]
    # Min-size filter (the paper's short edge >= 128 px at full resolution, here 12 px).
    s2 = coco.ImportStats()
    list(coco.iter_coco(tmp_path / "ann.json", img_dir, min_short_edge=12, stats=s2))
    assert s2["dropped_object_small_box"] == 1  # the clipped 10x10 box


def test_folder_import(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    _jpeg(tmp_path / "imgs" / "x.jpg", 30, 20)
    _jpeg(tmp_path / "imgs" / "sub" / "y.jpg", 16, 16)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    stats = coco.ImportStats()
    m = coco.import_to_records(coco.iter_folder(tmp_path / "imgs", stats), tmp_path / "out", stats, 1, {})
    assert m["num_images"] == 2 and m["import"]["skipped_corrupt_image"] == 1
    recs = list(records.RecordSource(tmp_path / "out"))
    assert sorted(r.image_id for r in recs) == ["sub/y.jpg", "x.jpg"]
    x = [r for r in recs if r.image_id == "x.jpg"][0]
    np.testing.assert_array_equal(x.boxes, [[0, 0, 30, 20]])


def test_tfds_builder_on_local_coco_source(tmp_path):
    import tensorflow_datasets as tfds

    from rice_jax.data.tfds_builder import RiceRegions, to_records

    manual = tmp_path / "manual"
    (manual / "annotations").mkdir(parents=True)
    (manual / "train").mkdir()
    data = _jpeg(manual / "train" / "a.jpg", 40, 30)
    ann = {"images": [{"id": 5, "file_name": "a.jpg", "height": 30, "width": 40}],
           "categories": [{"id": 1, "name": "x"}],
           "annotations": [{"image_id": 5, "bbox": [2, 3, 10, 8], "category_id": 1},
                           {"image_id": 5, "bbox": [1, 1, 0, 5], "category_id": 1}]}
    (manual / "annotations" / "instances_train.json").write_text(json.dumps(ann))
    (manual / "annotations" / "ocr_train.json").write_text(json.dumps({"5": [{"bbox": [0, 20, 20, 8], "text": "hey"}]}))
    builder = RiceRegions(data_dir=str(tmp_path / "tfds"), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    src = builder.as_data_source(split="train")
    assert len(src) == 1
    (rec,) = to_records(src)
    assert rec.image == data and rec.image_id == "5"
    np.testing.assert_allclose(rec.boxes, [[2, 3, 12, 11], [0, 20, 20, 28]])
    assert rec.kind.tolist() == [0, 1] and rec.text == ["", "hey"] and rec.category.tolist() == [0, -1]
