"""OCR transcripts -> token ids, the multi-label targets of text regions.

Default: a small BPE tokenizer trained with the ``tokenizers`` library on the
dataset's own transcripts and saved beside the data (``tokenizer.json``), or
any local ``tokenizer.json``. At scale it trains on a deterministic sample of
records (``--sample N``) read without decoding images, or adopts an existing
tokenizer (``--tokenizer hf:DIR``, e.g. CLIP's BPE). A region keeps up to M distinct token ids in
order of first appearance, −1 padded.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import msgpack
import numpy as np

from rice_jax import cli, errors, storage
from rice_jax.data import records

TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_file: str | os.PathLike):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"], show_progress=False)
    tok.train_from_iterator((t.lower() for t in texts), trainer=trainer)
    tok.save(str(out_file))
    return tok


class OCRTokenizer:
    """Wraps a ``tokenizers.Tokenizer``; ``encode(text, m)`` -> ``[m]`` int32 unique ids, −1 pad."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer

        path = storage.path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.exists():
            raise errors.MissingInput(f"{path}: no tokenizer.json (build one with "
                                    f"`python -m rice_jax.data.tokenizer --data {path.parent}`)")
        self.path = path
        self._tok = Tokenizer.from_str(path.read_text())
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str, max_tokens: int) -> np.ndarray:
        out = np.full(max_tokens, -1, np.int32)
        seen: list[int] = []
        # No special tokens: an adopted tokenizer's start/end markers (CLIP's) are not words of the region.
        for i in self._tok.encode(text.lower(), add_special_tokens=False).ids:
            if i not in seen:
                seen.append(i)
                if len(seen) == max_tokens:
                    break
        out[: len(seen)] = seen
        return out

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids if i >= 0])

    # The underlying Rust object is not picklable; re-open by path in Grain workers.
    def __getstate__(self):
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])


def for_dataset(data_dir: str | os.PathLike, manifest: dict | None = None) -> "OCRTokenizer | None":
    """The tokenizer a dataset's manifest names, or None if it has none (the one lookup everyone uses)."""
    manifest = records.read_manifest(data_dir) if manifest is None else manifest
    entry = manifest.get("tokenizer")
    return OCRTokenizer(storage.path(data_dir) / entry["file"]) if entry else None


def record_transcripts(raw: bytes) -> list[str]:
    """The OCR transcripts of one encoded record, without decoding (or validating) its image."""
    d = msgpack.unpackb(raw, raw=False)
    kind = np.frombuffer(d["kind"], "<i1")
    return [t for t, k in zip(d["text"], kind) if k == records.KIND_TEXT and t]


def sample_indices(num_records: int, sample: int, seed: int) -> np.ndarray:
    """``sample`` record indices drawn without replacement, sorted (reads then run shard by shard)."""
    if sample >= num_records:
        return np.arange(num_records)
    return np.sort(np.random.default_rng(seed).choice(num_records, sample, replace=False))


def _transcripts(src: "records.RecordSource", indices: np.ndarray, show_progress: bool) -> Iterator[str]:
    bar = None
    if show_progress and len(indices) > 10_000:
        from tqdm import tqdm

        bar = tqdm(total=len(indices), desc="reading transcripts", unit="rec")
    for start in range(0, len(indices), 1024):
        chunk = indices[start:start + 1024]
        for i in chunk:
            yield from record_transcripts(src.raw(int(i)))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()


def build_for_dataset(data_dir: str | os.PathLike, vocab_size: int = 512, *, sample: int = 0, seed: int = 0,
                      show_progress: bool = True) -> OCRTokenizer:
    """Train on a dataset's transcripts, save ``tokenizer.json`` there, record it in the manifest.

    ``sample=0`` reads every record; ``sample=N`` a deterministic draw of N records (``seed``).
    Either way only the records' bytes are read — no image is decoded — and the transcripts
    stream into the trainer. At the paper's scale (400M images, ~50M with text) a draw of a few
    million records gives the BPE merges of the whole at a fraction of the reading."""
    src = records.RecordSource(data_dir)
    indices = sample_indices(len(src), sample, seed) if sample else np.arange(len(src))
    counter = {"texts": 0}

    def texts():
        for t in _transcripts(src, indices, show_progress):
            counter["texts"] += 1
            yield t

    out = Path(data_dir) / TOKENIZER_FILE
    with storage.atomic_local(out) as tmp:
        train_tokenizer(texts(), vocab_size, tmp)
        if not counter["texts"]:
            raise errors.InputError(f"{data_dir}: no text regions to train a tokenizer on"
                                    + (f" in a sample of {len(indices)} records (raise --sample)" if sample else ""))
    tok = OCRTokenizer(out)
    m = records.read_manifest(data_dir)
    m["tokenizer"] = {"file": TOKENIZER_FILE, "vocab_size": tok.vocab_size, "trained_on": counter["texts"],
                      "records_read": int(len(indices)), "of_records": len(src),
                      **({"sample": {"records": int(sample), "seed": int(seed)}} if sample else {})}
    records.write_manifest(data_dir, m)
    return tok


def adopt(data_dir: str | os.PathLike, source: str | os.PathLike) -> OCRTokenizer:
    """Use an existing tokenizer (a folder with ``tokenizer.json``, e.g. CLIP's, or that file) for a dataset.

    The file is copied beside the data, so the dataset stays self-contained; a folder holding only
    a slow tokenizer (``vocab.json`` + ``merges.txt``) is converted with ``transformers``. Special
    tokens (CLIP's start/end of text) are never part of a region's targets (see :meth:`OCRTokenizer.encode`)."""
    src = storage.path(source)
    file = src / TOKENIZER_FILE if src.is_dir() else src
    out = Path(data_dir) / TOKENIZER_FILE
    if file.exists():
        text = file.read_text()
    elif src.is_dir() and (src / "vocab.json").exists():
        from transformers import AutoTokenizer

        text = AutoTokenizer.from_pretrained(os.fspath(src), local_files_only=True).backend_tokenizer.to_str()
    else:
        raise errors.MissingInput(f"--tokenizer hf:{source}: no tokenizer.json (nor vocab.json + merges.txt) there; "
                                  "save one with `AutoTokenizer.from_pretrained(...).save_pretrained(DIR)`")
    storage.write_text_atomic(out, text)
    tok = OCRTokenizer(out)
    m = records.read_manifest(data_dir)
    m["tokenizer"] = {"file": TOKENIZER_FILE, "vocab_size": tok.vocab_size, "adopted_from": os.fspath(source)}
    records.write_manifest(data_dir, m)
    return tok


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description="The OCR tokenizer of a dataset (saved as DATA/tokenizer.json, recorded "
                                             "in the manifest): trained on its transcripts, or adopted.")
    ap.add_argument("--data", required=True)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--sample", type=int, default=0,
                    help="train on a deterministic draw of N records (0: all); at scale, a few million")
    ap.add_argument("--seed", type=int, default=0, help="the draw of --sample")
    ap.add_argument("--tokenizer", help="hf:DIR — adopt an existing tokenizer (e.g. CLIP's BPE, V = 49,408) "
                                        "instead of training one")
    a = ap.parse_args(argv)
    if a.tokenizer:
        if not a.tokenizer.startswith("hf:"):
            raise errors.InputError(f"--tokenizer {a.tokenizer!r}: use hf:DIR (a folder with tokenizer.json)")
        tok = adopt(a.data, a.tokenizer[3:])
        print(f"adopted {a.tokenizer[3:]} as {tok.path} (vocab {tok.vocab_size})")
    else:
        tok = build_for_dataset(a.data, a.vocab_size, sample=a.sample, seed=a.seed)
        print(f"wrote {tok.path} (vocab {tok.vocab_size})")


if __name__ == "__main__":
    cli.run(main)
