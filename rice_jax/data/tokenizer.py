"""OCR transcripts -> token ids, the multi-label targets of text regions.

Default: a small BPE tokenizer trained with the ``tokenizers`` library on the
dataset's own transcripts and saved beside the data (``tokenizer.json``), or
any local ``tokenizer.json``. A region keeps up to M distinct token ids in
order of first appearance, −1 padded.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

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
        for i in self._tok.encode(text.lower()).ids:
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


def build_for_dataset(data_dir: str | os.PathLike, vocab_size: int = 512) -> OCRTokenizer:
    """Train on every transcript of a dataset, save ``tokenizer.json`` there, record it in the manifest."""
    src = records.RecordSource(data_dir)
    texts = [t for rec in src for t, k in zip(rec.text, rec.kind) if k == records.KIND_TEXT]
    if not texts:
        raise errors.InputError(f"{data_dir}: no text regions to train a tokenizer on")
    out = Path(data_dir) / TOKENIZER_FILE
    train_tokenizer(texts, vocab_size, out)
    tok = OCRTokenizer(out)
    m = records.read_manifest(data_dir)
    m["tokenizer"] = {"file": TOKENIZER_FILE, "vocab_size": tok.vocab_size, "trained_on": len(texts)}
    records.write_manifest(data_dir, m)
    return tok


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description="Train the OCR tokenizer on a dataset's transcripts "
                                             "(saved as DATA/tokenizer.json, recorded in the manifest).")
    ap.add_argument("--data", required=True)
    ap.add_argument("--vocab-size", type=int, default=512)
    a = ap.parse_args(argv)
    tok = build_for_dataset(a.data, a.vocab_size)
    print(f"wrote {tok.path} (vocab {tok.vocab_size})")


if __name__ == "__main__":
    cli.run(main)
