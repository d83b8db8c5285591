"""OCR for region mining: image -> text regions (xyxy box, transcript, confidence).

The paper reads text with PaddleOCR and keeps detections with confidence > 0.7;
a text region's transcript becomes its multi-label target (``docs/design.md``).
Engines share one contract, ``engine(image, key) -> list[TextRegion]``:

- :class:`RapidOCR` — ``rapidocr-onnxruntime`` runs PP-OCRv4 detection +
  recognition (the PaddleOCR family the paper used) from ONNX models bundled in
  its wheel: offline, CPU, ~1 s per photo on 2 cores.
- :class:`PaddleResults` — results of an external PaddleOCR run (for users who
  ran it on a GPU fleet), in either of PaddleOCR's standard outputs:
  ``predict_system`` text files (``image_path<TAB>[{"transcription", "points",
  "score"}, ...]`` per line) or PaddleOCR 3 ``save_to_json`` results
  (``{"input_path", "rec_texts", "rec_scores", "rec_polys"}``; one file, JSON
  lines, or a folder of ``*.json``). Matched to images by file name.

Quadrilaterals become their axis-aligned boxes; transcripts are NFKC-normalised
with whitespace collapsed; empty transcripts and low-confidence reads are dropped
(counted by the caller).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import unicodedata
from pathlib import Path
import numpy as np

from rice_jax import errors

PAPER_MIN_CONFIDENCE = 0.7


@dataclasses.dataclass(frozen=True)
class TextRegion:
    box: tuple[float, float, float, float]     # xyxy pixels
    text: str
    score: float


def normalize_transcript(text: str) -> str:
    """NFKC (full-width forms, ligatures), whitespace runs -> one space, stripped."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", str(text))).strip()


def quad_to_box(points) -> tuple[float, float, float, float]:
    p = np.asarray(points, np.float64).reshape(-1, 2)
    return float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max())


def _regions(items, min_confidence: float, stats) -> list[TextRegion]:
    """(points, text, score) triples -> kept :class:`TextRegion` s, counting what is dropped."""
    out = []
    for points, text, score in items:
        text = normalize_transcript(text)
        if not text:
            stats["dropped_text_empty_transcript"] += 1
            continue
        if float(score) < min_confidence:
            stats["dropped_text_low_confidence"] += 1
            continue
        out.append(TextRegion(quad_to_box(points), text, float(score)))
    return out


class NoOCR:
    def __call__(self, image: np.ndarray, key: str, stats) -> list[TextRegion]:
        return []


class RapidOCR:
    """PP-OCRv4 det + rec through ``rapidocr-onnxruntime`` (models inside its wheel; offline).

    ``threads``: ONNX Runtime intra-op threads per engine (1 when a process pool already uses
    every core). ``side``: the detector scales an image so its *short* side is at least this
    (the engine's default 736). Small images pay for that upscaling: on the quickstart's
    96-128 px images ``side=320`` read 61 of 86 words exactly at 3.6x the speed of the default
    (64 of 86); images whose short side is already above ``side`` are read at their own size.
    Input is RGB; the engine wants OpenCV's BGR order."""

    def __init__(self, min_confidence: float = PAPER_MIN_CONFIDENCE, threads: int = 0, side: int = 0):
        try:
            from rapidocr_onnxruntime import RapidOCR as Engine
        except ImportError as e:
            raise ImportError("--ocr rapidocr needs rapidocr-onnxruntime (installed by launch/_venv.sh; "
                              "see requirements-nodeps.txt)") from e
        # The engine's own score filter (text_score, default 0.5) must not be stricter than ours.
        kw = {"text_score": min(0.5, float(min_confidence))}
        if threads:
            kw.update(intra_op_num_threads=threads, inter_op_num_threads=1)
        if side:
            kw.update(det_limit_side_len=int(side))
        self.engine = Engine(**kw)
        self.min_confidence = min_confidence

    def __call__(self, image: np.ndarray, key: str, stats) -> list[TextRegion]:
        result, _ = self.engine(np.ascontiguousarray(image[:, :, ::-1]))
        return _regions(((r[0], r[1], r[2]) for r in (result or [])), self.min_confidence, stats)


class PaddleResults:
    """Look-up of an external PaddleOCR run's results by image file name (see module docstring)."""

    def __init__(self, path: str | os.PathLike, min_confidence: float = PAPER_MIN_CONFIDENCE):
        self.path, self.min_confidence = Path(path), min_confidence
        if not self.path.exists():
            raise errors.MissingInput(f"{self.path} not found: --ocr paddle-json:PATH needs PaddleOCR results "
                                    "(a predict_system .txt, a JSON/JSON-lines file, or a folder of *.json)")
        self.by_name: dict[str, list] = {}
        files = sorted(self.path.rglob("*.json")) if self.path.is_dir() else [self.path]
        for f in files:
            self._load(f)

    def _add(self, image_path: str, items: list, where: str) -> None:
        name = Path(str(image_path)).name
        if name in self.by_name:
            raise errors.InputError(f"{where}: results for {name!r} appear twice; give one result per image")
        self.by_name[name] = items

    def _load(self, f: Path) -> None:
        text = f.read_text(encoding="utf-8")
        stripped = text.lstrip()
        if stripped.startswith("{") or stripped.startswith("["):
            try:
                docs = [json.loads(text)]
            except json.JSONDecodeError:
                docs = [json.loads(line) for line in text.splitlines() if line.strip()]
            for doc in docs:
                for d in (doc if isinstance(doc, list) else [doc]):
                    d = d.get("res", d)
                    if "input_path" not in d or "rec_texts" not in d:
                        raise errors.InputError(f"{f}: a PaddleOCR 3 result needs 'input_path' and 'rec_texts' "
                                         f"(found keys {sorted(d)[:8]})")
                    polys = d.get("rec_polys", d.get("dt_polys"))
                    if polys is None and "rec_boxes" in d:
                        polys = [[[b[0], b[1]], [b[2], b[3]]] for b in d["rec_boxes"]]
                    if polys is None or len(polys) != len(d["rec_texts"]):
                        raise errors.InputError(f"{f}: {d['input_path']}: rec_polys/rec_boxes missing or not one per "
                                         "rec_texts entry")
                    scores = d.get("rec_scores", [1.0] * len(d["rec_texts"]))
                    self._add(d["input_path"], list(zip(polys, d["rec_texts"], scores)), str(f))
            return
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            if "\t" not in line:
                raise errors.InputError(f"{f}:{n}: expected 'image_path<TAB>[...]' (PaddleOCR predict_system output)")
            image_path, payload = line.split("\t", 1)
            try:
                items = json.loads(payload)
            except json.JSONDecodeError as e:
                raise errors.InputError(f"{f}:{n}: results are not JSON ({e.msg})") from e
            self._add(image_path, [(it["points"], it.get("transcription", ""), it.get("score", 1.0))
                                   for it in items], f"{f}:{n}")

    def __call__(self, image: np.ndarray, key: str, stats) -> list[TextRegion]:
        items = self.by_name.get(Path(key).name)
        if items is None:
            stats["images_without_ocr_results"] += 1
            return []
        return _regions(items, self.min_confidence, stats)


def parse(spec: str, *, min_confidence: float = PAPER_MIN_CONFIDENCE, threads: int = 0):
    """``none`` | ``rapidocr[:side=N]`` | ``paddle-json:PATH``."""
    name, _, rest = spec.partition(":")
    if name == "none":
        return NoOCR()
    if name == "rapidocr":
        opts = dict(item.split("=", 1) for item in rest.split(",") if "=" in item)
        if set(opts) - {"side"} or (rest and not opts):
            raise errors.InputError(f"--ocr {spec!r}: rapidocr takes one option, side=N (e.g. rapidocr:side=320)")
        return RapidOCR(min_confidence, threads=threads, side=int(opts.get("side", 0)))
    if name == "paddle-json":
        if not rest:
            raise errors.InputError("paddle-json needs a path: --ocr paddle-json:/path/to/results")
        return PaddleResults(rest, min_confidence)
    raise errors.InputError(f"--ocr {spec!r}: use none, rapidocr or paddle-json:PATH")

