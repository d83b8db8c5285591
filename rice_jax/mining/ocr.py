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
  lines, or a folder of ``<stem>_res.json``). Matched to images by file name,
  read per image (an index of line offsets, never the whole file per worker).

Quadrilaterals become their axis-aligned boxes; transcripts are NFKC-normalised
with whitespace collapsed; empty transcripts and low-confidence reads are dropped
(counted by the caller).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import re
import time
import unicodedata
from pathlib import Path

import numpy as np

from rice_jax import errors, storage

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
    """Look-up of an external PaddleOCR run's results by image file name (see module docstring).

    Built for results of 50M images, read by many mining workers at once; no worker loads them whole:

    - a **folder** (PaddleOCR 3 ``save_to_json``): the image ``.../b.png`` is looked up directly as
      ``<folder>/b_res.json`` or ``<folder>/b.json`` (one small file read per image);
    - a **line file** (``predict_system`` text or JSON lines): indexed once — image name -> byte
      offset and length of its line — into an SQLite file in ``index_dir`` (the driver calls
      :meth:`prepare` before any worker starts; a worker finding the index current just opens it;
      it is rebuilt when the results file's size or mtime changes). Each look-up is one seek.
      Without ``index_dir`` the offsets are held in memory (a few dozen bytes an image);
    - a single JSON **document** (a list of results; small by nature): loaded whole.
    """

    INDEX_VERSION = 1

    def __init__(self, path: str | os.PathLike, min_confidence: float = PAPER_MIN_CONFIDENCE,
                 index_dir: str | os.PathLike | None = None):
        self.path, self.min_confidence = storage.path(path), min_confidence
        self.index_dir = None if index_dir is None else Path(index_dir)
        if not self.path.exists():
            raise errors.MissingInput(f"{self.path} not found: --ocr paddle-json:PATH needs PaddleOCR results "
                                      "(a predict_system .txt, a JSON/JSON-lines file, or a folder of *_res.json)")
        self._file = self._db = None
        self._offsets: dict[str, tuple[int, int, int]] | None = None
        self.by_name: dict[str, list] = {}
        if self.path.is_dir():
            self.layout = "folder"
            return
        with self.path.open("rb") as f:
            first = f.readline()
            more = bool(f.read(1).strip())
        head = first.lstrip()
        if head.startswith(b"[") or (head.startswith(b"{") and not (more and _parses(first))):
            self.layout = "document"
            for d in _v3_docs(json.loads(self.path.read_text(encoding="utf-8")), str(self.path)):
                self._add(d, str(self.path))
        else:
            self.layout = "json-lines" if head.startswith(b"{") else "system"
            if self.index_dir is None:
                self._offsets = {}
                for name, off, length, n in self._scan():
                    if name in self._offsets:
                        raise self._twice(name, n)
                    self._offsets[name] = (off, length, n)

    # ------------------------------------------------------------------ index of a line file
    def _index_file(self) -> Path:
        digest = hashlib.sha256(os.fspath(self.path).encode()).hexdigest()[:12]
        return self.index_dir / f"paddle-ocr-index-{digest}.sqlite"

    def _signature(self) -> str:
        st = self.path.stat()
        return json.dumps([self.INDEX_VERSION, os.fspath(self.path), int(st.length), float(st.mtime)])

    def _scan(self):
        """(image name, byte offset, byte length, line number) of every result line, in file order."""
        pos = 0
        with self.path.open("rb") as f:
            for n, line in enumerate(f, 1):
                off, pos = pos, pos + len(line)
                if not line.strip():
                    continue
                if self.layout == "system":
                    if b"\t" not in line:
                        raise errors.InputError(f"{self.path}:{n}: expected 'image_path<TAB>[...]' "
                                                "(PaddleOCR predict_system output)")
                    image_path = line.split(b"\t", 1)[0].decode("utf-8")
                else:
                    m = _INPUT_PATH.search(line)
                    image_path = json.loads(b'"' + m.group(1) + b'"') if m else None
                    if image_path is None:
                        raise errors.InputError(f"{self.path}:{n}: a PaddleOCR 3 result line needs 'input_path'")
                yield Path(image_path).name, off, len(line), n

    def prepare(self) -> "PaddleResults":
        """Build the index of a line file in ``index_dir`` unless a current one is there (atomic)."""
        if self.layout not in ("system", "json-lines") or self.index_dir is None:
            return self
        import sqlite3

        target, sig = self._index_file(), self._signature()
        if target.exists():
            with contextlib.closing(sqlite3.connect(f"file:{target}?mode=ro", uri=True)) as db:
                if db.execute("SELECT value FROM meta WHERE key='signature'").fetchone() == (sig,):
                    return self
        self.index_dir.mkdir(parents=True, exist_ok=True)
        with storage.atomic_local(target) as tmp:
            t0, count = time.perf_counter(), 0
            with contextlib.closing(sqlite3.connect(tmp)) as db:
                db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
                db.execute("CREATE TABLE results (name TEXT PRIMARY KEY, offset INTEGER, length INTEGER, line INTEGER)")
                rows = self._scan()
                while True:
                    chunk = list(itertools.islice(rows, 100_000))
                    if not chunk:
                        break
                    try:
                        db.executemany("INSERT INTO results VALUES (?, ?, ?, ?)", chunk)
                    except sqlite3.IntegrityError:
                        # The name's first line is in the table: the later one is the duplicate to name.
                        for name, _, _, n in chunk:
                            first = db.execute("SELECT line FROM results WHERE name=?", (name,)).fetchone()
                            if first is not None and first[0] != n:
                                raise self._twice(name, n) from None
                        raise
                    count += len(chunk)
                db.execute("INSERT INTO meta VALUES ('signature', ?)", (sig,))
                db.commit()
        print(f"[ocr] indexed {count} PaddleOCR result lines of {self.path} in {time.perf_counter() - t0:.1f} s "
              f"-> {target}", flush=True)
        return self

    def _twice(self, name: str, n: int) -> Exception:
        return errors.InputError(f"{self.path}:{n}: results for {name!r} appear twice; give one result per image")

    def _line(self, name: str) -> tuple[bytes, int] | None:
        if self._offsets is not None:
            hit = self._offsets.get(name)
        else:
            if self._db is None:
                import sqlite3

                self.prepare()     # a worker started without the driver (or the file changed): index now
                self._db = sqlite3.connect(f"file:{self._index_file()}?mode=ro", uri=True, check_same_thread=False)
            hit = self._db.execute("SELECT offset, length, line FROM results WHERE name=?", (name,)).fetchone()
        if hit is None:
            return None
        if self._file is None:
            self._file = self.path.open("rb")
        self._file.seek(hit[0])
        return self._file.read(hit[1]), hit[2]

    # ------------------------------------------------------------------ parsing one image's results
    def _add(self, d: dict, where: str) -> None:
        name = Path(str(d["input_path"])).name
        if name in self.by_name:
            raise errors.InputError(f"{where}: results for {name!r} appear twice; give one result per image")
        self.by_name[name] = _v3_items(d, where)

    def _items(self, name: str) -> list | None:
        if self.layout == "document":
            return self.by_name.get(name)
        if self.layout == "folder":
            stem = name.rsplit(".", 1)[0]
            for cand in (self.path / f"{stem}_res.json", self.path / f"{stem}.json"):
                if cand.exists():
                    docs = [d for d in _v3_docs(json.loads(cand.read_text(encoding="utf-8")), str(cand))
                            if Path(str(d["input_path"])).name == name]
                    return _v3_items(docs[0], str(cand)) if docs else None
            return None
        got = self._line(name)
        if got is None:
            return None
        line, n = got
        where = f"{self.path}:{n}"
        try:
            if self.layout == "system":
                items = json.loads(line.split(b"\t", 1)[1])
                return [(it["points"], it.get("transcription", ""), it.get("score", 1.0)) for it in items]
            return _v3_items(next(iter(_v3_docs(json.loads(line), where))), where)
        except json.JSONDecodeError as e:
            raise errors.InputError(f"{where}: results are not JSON ({e.msg})") from e
        except (KeyError, TypeError) as e:
            raise errors.InputError(f"{where}: a result lacks {e} ('points' and 'transcription' per item)") from e

    def __call__(self, image: np.ndarray, key: str, stats) -> list[TextRegion]:
        items = self._items(Path(key).name)
        if items is None:
            stats["images_without_ocr_results"] += 1
            return []
        return _regions(items, self.min_confidence, stats)


_INPUT_PATH = re.compile(rb'"input_path"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _parses(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def _v3_docs(doc, where: str):
    """PaddleOCR 3 result dicts in a parsed JSON value (one result, a list, or ``{"res": ...}`` wrapped)."""
    for d in (doc if isinstance(doc, list) else [doc]):
        d = d.get("res", d) if isinstance(d, dict) else d
        if not isinstance(d, dict) or "input_path" not in d or "rec_texts" not in d:
            keys = sorted(d)[:8] if isinstance(d, dict) else type(d).__name__
            raise errors.InputError(f"{where}: a PaddleOCR 3 result needs 'input_path' and 'rec_texts' (found {keys})")
        yield d


def _v3_items(d: dict, where: str) -> list:
    polys = d.get("rec_polys", d.get("dt_polys"))
    if polys is None and "rec_boxes" in d:
        polys = [[[b[0], b[1]], [b[2], b[3]]] for b in d["rec_boxes"]]
    if polys is None or len(polys) != len(d["rec_texts"]):
        raise errors.InputError(f"{where}: {d['input_path']}: rec_polys/rec_boxes missing or not one per "
                                "rec_texts entry")
    scores = d.get("rec_scores", [1.0] * len(d["rec_texts"]))
    return list(zip(polys, d["rec_texts"], scores))


def parse(spec: str, *, min_confidence: float = PAPER_MIN_CONFIDENCE, threads: int = 0,
          index_dir: str | os.PathLike | None = None, load: bool = True):
    """``none`` | ``rapidocr[:side=N]`` | ``paddle-json:PATH``.

    ``index_dir``: where a paddle-json line file's index lives (the mining run's folder).
    ``load=False``: check the spec only (the driver, before workers start): RapidOCR's models are
    not loaded and paddle results not indexed."""
    name, _, rest = spec.partition(":")
    if name == "none":
        return NoOCR()
    if name == "rapidocr":
        opts = dict(item.split("=", 1) for item in rest.split(",") if "=" in item)
        if set(opts) - {"side"} or (rest and not opts):
            raise errors.InputError(f"--ocr {spec!r}: rapidocr takes one option, side=N (e.g. rapidocr:side=320)")
        if not load:
            import importlib.util

            if importlib.util.find_spec("rapidocr_onnxruntime") is None:
                raise ImportError("--ocr rapidocr needs rapidocr-onnxruntime (installed by launch/_venv.sh)")
            return NoOCR()
        return RapidOCR(min_confidence, threads=threads, side=int(opts.get("side", 0)))
    if name == "paddle-json":
        if not rest:
            raise errors.InputError("paddle-json needs a path: --ocr paddle-json:/path/to/results")
        if not load:
            if not storage.path(rest).exists():
                raise errors.MissingInput(f"--ocr {spec}: {rest} not found (PaddleOCR results: a predict_system "
                                          ".txt, a JSON/JSON-lines file, or a folder of *_res.json)")
            return NoOCR()
        return PaddleResults(rest, min_confidence, index_dir=index_dir)
    raise errors.InputError(f"--ocr {spec!r}: use none, rapidocr or paddle-json:PATH")

