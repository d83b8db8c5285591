"""Referring segmentation with a frozen encoder: a light text-conditioned mask decoder, cIoU / gIoU.

The protocol (the same for every backbone of a comparison):

- Each image is resized whole to the encoder's ``S x S`` (no crop) and encoded once; the head reads
  the patch tokens at the probe layer (:class:`~rice_jax.downstream.encoders.FrozenEncoder`).
- Text: a word-level vocabulary built from the training expressions (lower-cased alphanumeric
  words; unseen words map to ``<unk>``), embedded and encoded by one self-attention block trained
  with the head -- no pretrained language model, so the comparison measures the image features.
  Or (``text_encoder``, ``--text-encoder DIR``) a local Hugging Face text encoder, frozen, whose
  last hidden states are projected into the same block.
- Decoder: patch tokens projected to ``width`` with learned grid positions; ``depth`` blocks of
  image self-attention, image-to-text cross-attention and an MLP; the pooled expression then
  attends to the image once and becomes the mask query. Each patch predicts ``r x r`` sub-patch
  logits (a learned pixel shuffle, ``r = upsample``) by a dot product with the query.
- Loss: binary cross-entropy against the area share of the mask in each output cell, plus Dice.
- Evaluation at the original resolution: logits bilinearly resized to ``H x W``, thresholded at 0
  (probability 0.5), accumulated into cIoU (cumulative intersection / cumulative union, as LISA
  reports it) and gIoU (mean per-expression IoU) per split.

This is a light probe on a frozen encoder, not LISA: numbers compare encoders with one another,
not with the paper's RefCOCO table (whose encoder sits inside a fine-tuned multimodal LLM).
"""
from __future__ import annotations

import collections
import dataclasses
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rice_jax import errors
from rice_jax.data.pipeline import image_input
from rice_jax.downstream import common, metrics
from rice_jax.downstream.encoders import FrozenEncoder, encode_images

PAD, UNK = 0, 1
EVAL_BATCH = 64


class WordVocab:
    """Words of the training expressions -> ids (0 = padding, 1 = unknown)."""

    def __init__(self, expressions, min_count: int = 1, max_len: int = 20):
        counts = collections.Counter(w for e in expressions for w in self.words(e))
        self.itos = ["<pad>", "<unk>"] + sorted(w for w, c in counts.items() if c >= min_count)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.max_len = max_len

    @staticmethod
    def words(expression: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", expression.lower())

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, expression: str) -> np.ndarray:
        ids = [self.stoi.get(w, UNK) for w in self.words(expression)][:self.max_len] or [UNK]
        return np.asarray(ids + [PAD] * (self.max_len - len(ids)), np.int32)


@dataclasses.dataclass(frozen=True)
class RefSegConfig:
    width: int = 64
    heads: int = 4
    mlp_ratio: int = 2
    depth: int = 2
    upsample: int = 4            # sub-patch logits per side: the output grid is (gh*r, gw*r)
    query_width: int = 32
    max_words: int = 20
    # "" = the word-level vocabulary of the training expressions; "DIR" = a local Hugging Face text
    # encoder folder (BERT, CLIP's text tower, ...), frozen: its last hidden states feed the head.
    text_encoder: str = ""
    train: common.HeadTraining = common.HeadTraining()


class HFTextEncoder:
    """A frozen Hugging Face text encoder from a local folder: expression -> ``(states [L, Dt], valid [L])``
    (its tokenizer, at most ``max_len`` tokens, last hidden state; PyTorch on the CPU or a GPU)."""

    def __init__(self, path: str, max_len: int):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from rice_jax import storage

        local = storage.download_dir(path)
        self.tokenizer = AutoTokenizer.from_pretrained(local)
        model = AutoModel.from_pretrained(local)
        model = getattr(model, "text_model", model) if not type(model).__name__.endswith("TextModel") else model
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.max_len = model.eval().to(self.device), max_len
        self.dim = int(getattr(model.config, "hidden_size"))

    def __call__(self, expressions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        tok = self.tokenizer(list(expressions), padding="max_length", truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        with torch.no_grad():
            out = self.model(**{k: v.to(self.device) for k, v in tok.items()})
        return (out.last_hidden_state.float().cpu().numpy().astype(np.float16),
                tok["attention_mask"].numpy().astype(bool))


class _Block(nnx.Module):
    def __init__(self, d: int, heads: int, mlp_ratio: int, cross: bool, rngs: nnx.Rngs):
        self.norm1, self.attn = nnx.LayerNorm(d, rngs=rngs), nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.cross_norm = nnx.LayerNorm(d, rngs=rngs) if cross else None
        self.cross = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs) if cross else None
        self.norm2 = nnx.LayerNorm(d, rngs=rngs)
        self.mlp1, self.mlp2 = nnx.Linear(d, mlp_ratio * d, rngs=rngs), nnx.Linear(mlp_ratio * d, d, rngs=rngs)

    def __call__(self, x, self_mask=None, context=None, context_mask=None):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, mask=self_mask)
        if self.cross is not None:
            x = x + self.cross(self.cross_norm(x), context, context, mask=context_mask)
        return x + self.mlp2(jax.nn.gelu(self.mlp1(self.norm2(x))))


class RefSegHead(nnx.Module):
    """Patch tokens ``[B, gh, gw, D]`` + word ids ``[B, L]`` -> mask logits ``[B, gh*r, gw*r]``."""

    def __init__(self, dim: int, grid: tuple[int, int], vocab_size: int, cfg: RefSegConfig, rngs: nnx.Rngs,
                 text_dim: int = 0):
        d, self.cfg, self.grid = cfg.width, cfg, grid
        self.in_norm, self.in_proj = nnx.LayerNorm(dim, rngs=rngs), nnx.Linear(dim, d, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (grid[0] * grid[1], d)))
        # Words: a trained embedding of the vocabulary; or a projection of a frozen encoder's states.
        self.embed = nnx.Embed(vocab_size, d, rngs=rngs) if not text_dim else None
        self.text_proj = nnx.Linear(text_dim, d, rngs=rngs) if text_dim else None
        self.word_pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.max_words, d)))
        self.text = _Block(d, cfg.heads, cfg.mlp_ratio, False, rngs)
        self.blocks = nnx.List([_Block(d, cfg.heads, cfg.mlp_ratio, True, rngs) for _ in range(cfg.depth)])
        self.q_norm, self.q_attn = nnx.LayerNorm(d, rngs=rngs), nnx.MultiHeadAttention(cfg.heads, d, decode=False,
                                                                                        rngs=rngs)
        self.out_norm = nnx.LayerNorm(d, rngs=rngs)
        r, e = cfg.upsample, cfg.query_width
        self.pixel = nnx.Linear(d, r * r * e, rngs=rngs)
        self.query = nnx.Linear(d, e, rngs=rngs)
        self.bias = nnx.Param(jnp.zeros(()))

    def __call__(self, patches, words=None, states=None, valid=None):
        """``words [B, L]`` ids of the vocabulary, or ``states [B, L, Dt]`` + ``valid [B, L]`` of a
        frozen text encoder."""
        b = patches.shape[0]
        gh, gw = self.grid
        r, e = self.cfg.upsample, self.cfg.query_width
        img = self.in_proj(self.in_norm(patches.astype(jnp.float32).reshape(b, gh * gw, -1))) + self.pos[...]
        if states is None:
            valid = words != PAD
            txt = self.embed(words)
        else:
            txt = self.text_proj(states.astype(jnp.float32))
        txt = txt + self.word_pos[...][: txt.shape[1]]
        txt_mask = valid[:, None, None, :]
        txt = self.text(txt, self_mask=txt_mask)
        for blk in self.blocks:
            img = blk(img, context=txt, context_mask=txt_mask)
        q = (txt * valid[..., None]).sum(1, keepdims=True) / jnp.maximum(valid.sum(1), 1)[:, None, None]
        q = q + self.q_attn(self.q_norm(q), img, img)
        pix = self.pixel(self.out_norm(img)).reshape(b, gh, gw, r, r, e)
        logits = jnp.einsum("byxijd,bd->byixj", pix, self.query(q[:, 0])) / np.sqrt(e) + self.bias[...]
        return logits.reshape(b, gh * r, gw * r)


class _TextInputs:
    """Expressions -> the head's text inputs: ``{"words"}`` ids of the training vocabulary, or
    ``{"states", "valid"}`` of a frozen HF text encoder (``cfg.text_encoder``)."""

    def __init__(self, train_expressions: list[str], cfg: RefSegConfig):
        self.hf = HFTextEncoder(cfg.text_encoder, cfg.max_words) if cfg.text_encoder else None
        self.vocab = None if self.hf else WordVocab(train_expressions, max_len=cfg.max_words)
        self.vocab_size = len(self.vocab) if self.vocab else 0
        self.dim = self.hf.dim if self.hf else 0

    def describe(self) -> str:
        return f"text encoder {self.hf.model.__class__.__name__}" if self.hf else f"vocabulary {self.vocab_size} words"

    def __call__(self, expressions: list[str]) -> dict:
        if self.hf is None:
            return {"words": np.stack([self.vocab.encode(e) for e in expressions])}
        states, valid = [], []
        for s in range(0, len(expressions), 256):
            st, va = self.hf(expressions[s:s + 256])
            states.append(st), valid.append(va)
        return {"states": np.concatenate(states), "valid": np.concatenate(valid)}


def loss_fn(head: RefSegHead, batch) -> jax.Array:
    logits = head(batch["patches"], **{k: batch[k] for k in ("words", "states", "valid") if k in batch})
    t = batch["target"].astype(jnp.float32)
    bce = jnp.mean(jnp.maximum(logits, 0) - logits * t + jnp.log1p(jnp.exp(-jnp.abs(logits))))
    p = jax.nn.sigmoid(logits)
    dice = 1 - (2 * (p * t).sum((1, 2)) + 1) / (p.sum((1, 2)) + t.sum((1, 2)) + 1)
    return bce + dice.mean()


def _gather(source, split, size, limit, target_hw):
    """Model inputs and per-image ``(expression, training target at target_hw)`` lists of one split
    (each mask becomes its target at once: the full-resolution masks are not kept)."""
    images, exprs = [], []
    for img, items in source.examples("referring", split, limit):
        images.append(image_input(img, size))
        exprs.append([(e, common.area_resize(m, *target_hw).astype(np.float16)) for e, m in items])
    return images, exprs


def run(encoder: FrozenEncoder, source, *, train_split: str = "train", eval_splits=None,
        cfg: RefSegConfig = RefSegConfig(), train_images: int | None = None, eval_images: int | None = None,
        log=print) -> dict:
    """Train the head on ``train_split`` and report cIoU / gIoU on every split of ``eval_splits``
    (default: every other split of the source)."""
    t0 = time.perf_counter()
    quiet = log is None            # None: no log lines, no progress bars
    log = log or (lambda s: None)
    gh, gw = encoder.grid
    r = cfg.upsample
    oh, ow = gh * r, gw * r
    images, exprs = _gather(source, train_split, encoder.image_size, train_images, (oh, ow))
    if not images:
        raise errors.InputError(f"{source.__class__.__name__}: split {train_split!r} has no referring expression")
    feats = encode_images(encoder, images, progress=None if quiet else "encoding (train)")["patches"]
    texts = [e for items in exprs for e, _ in items]
    text = _TextInputs(texts, cfg)
    index = np.asarray([i for i, items in enumerate(exprs) for _ in items])
    targets = np.stack([m for items in exprs for _, m in items])
    train_text = text(texts)
    batch_of = lambda idx: {"patches": feats[index[idx]], "target": targets[idx],
                            **{k: v[idx] for k, v in train_text.items()}}
    log(f"refseg: {len(images)} train images, {len(index)} expressions, {text.describe()}, "
        f"features {feats.shape[1:]} -> masks {oh}x{ow}")
    head = RefSegHead(encoder.dim, (gh, gw), text.vocab_size, cfg, nnx.Rngs(cfg.train.seed), text.dim)
    t1 = time.perf_counter()
    losses = common.train_head(head, loss_fn, batch_of, len(index), cfg.train, log=None if quiet else log)
    log(f"refseg: head trained in {time.perf_counter() - t1:.0f} s")
    predict = nnx.jit(lambda head, p, t: head(p, **t))
    results = {}
    for split in eval_splits or [s for s in source.splits if s != train_split]:
        acc = metrics.ReferringIoU()
        examples = source.examples("referring", split, eval_images)
        for chunk in common.chunks(examples, 256):
            ev = encode_images(encoder, [image_input(img, encoder.image_size) for img, _ in chunk])["patches"]
            flat = [(i, e, m) for i, (_, items) in enumerate(chunk) for e, m in items]
            for s in range(0, len(flat), EVAL_BATCH):   # fixed-size batches: one compiled shape
                part = flat[s:s + EVAL_BATCH]
                idx = np.asarray([i for i, _, _ in part] + [0] * (EVAL_BATCH - len(part)))
                t = text([e for _, e, _ in part] + [""] * (EVAL_BATCH - len(part)))
                logits = np.asarray(predict(head, jnp.asarray(ev[idx]), jax.tree.map(jnp.asarray, t)))
                for (_, _, m), lg in zip(part, logits):
                    acc.update(common.upsample(lg, *m.shape)[None] > 0, m[None])
        if not acc.count:
            continue
        results[split] = acc.result()
        log(f"refseg {split}: cIoU {results[split]['ciou']:.4f}, gIoU {results[split]['giou']:.4f} "
            f"({results[split]['expressions']} expressions)")
    return {"task": "refseg", "splits": results, "train_expressions": int(len(index)), "train_images": len(images),
            "text": text.describe(), "head_loss": losses, "skipped": dict(source.skipped),
            "seconds": time.perf_counter() - t0, "config": dataclasses.asdict(cfg)}
