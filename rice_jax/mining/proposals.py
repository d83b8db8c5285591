"""Object proposals for region mining: image -> scored xyxy boxes.

The paper mines object regions with SAM (boxes of its automatic masks, short
edge >= 128 px). Two proposers implement one contract, ``proposer(image) ->
(boxes [N, 4] float32 xyxy pixels, scores [N] float32)``, best first, already
deduplicated (box NMS), clipped to the image and filtered by size:

- :class:`Felzenszwalb` — weight-free and the default: graph-based segments
  (scikit-image) at three scales, plus the union of every pair of touching
  segments (one step of selective-search grouping: it joins an object's outline
  to its inside, a textured object's stripes), ranked by how many scales
  reproduce the box (objects are stable across scales; texture and noise are
  not). Works out of the box, so tests and the quickstart mine real proposals
  without weights.
- :class:`Sam` — Segment Anything through ``transformers`` (``SamModel`` from a
  local directory: SAM ViT-B/L/H, SlimSAM, MedSAM...): a grid of point prompts over one image
  embedding, masks kept by predicted IoU and stability, box of each mask taken
  from the low-resolution mask logits (no upsampling to the full image: ~5x
  faster on CPU, box error below one low-res cell), NMS, top-k. No torchvision
  (the index's wheel is CUDA-linked and does not load with the CPU torch), so
  preprocessing and NMS are our own.

``parse("felzenszwalb")``, ``parse("felzenszwalb:scales=100+400,sigma=0.5")``,
``parse("sam:/path/to/sam-vit-base")``, ``parse("none")`` build them from the
command line's ``--proposals`` value.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import numpy as np

from rice_jax import errors


# ----------------------------------------------------------------------------- boxes
def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``[len(a), len(b)]`` of xyxy boxes."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, max_keep: Optional[int] = None) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best score first.

    Ties in score keep the earlier box (stable sort), so the result is deterministic."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep: list[int] = []
    boxes = np.asarray(boxes, np.float64)
    while order.size and (max_keep is None or len(keep) < max_keep):
        i = int(order[0])
        keep.append(i)
        if order.size == 1:
            break
        overlap = box_iou(boxes[i:i + 1], boxes[order[1:]])[0]
        order = order[1:][overlap <= iou]
    return np.asarray(keep, np.int64)


@dataclasses.dataclass(frozen=True)
class BoxFilter:
    """Size rules every proposer applies before NMS (pixels of the original image)."""
    min_short_edge: float = 0.0       # paper: 128 px on >= 336 px images
    max_area_frac: float = 0.9        # a box covering (almost) the whole image is background, not a region
    nms_iou: float = 0.7
    max_per_image: int = 16

    def __call__(self, boxes: np.ndarray, scores: np.ndarray, width: int, height: int):
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
        scores = np.asarray(scores, np.float32).reshape(-1)
        boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, width)
        boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, height)
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        ok = (w > 0) & (h > 0) & (np.minimum(w, h) >= self.min_short_edge) \
            & (w * h <= self.max_area_frac * width * height)
        boxes, scores = boxes[ok], scores[ok]
        keep = nms(boxes, scores, self.nms_iou, self.max_per_image)
        return boxes[keep].reshape(-1, 4), scores[keep]


# ----------------------------------------------------------------------------- Felzenszwalb
@dataclasses.dataclass(frozen=True)
class Felzenszwalb:
    """Multi-scale graph segments + adjacent-pair unions, ranked by stability across scales (:func:`_score`).

    ``work_size``: images are segmented with their long side at most this many pixels (boxes
    are mapped back), so the cost per image is bounded on large photos. ``min_segment_frac``:
    segments smaller than this share of the (working) image are merged into a neighbour by the
    segmenter itself (its ``min_size``)."""
    scales: tuple[float, ...] = (60.0, 200.0, 600.0)
    sigma: float = 0.5
    min_segment_frac: float = 0.002
    work_size: int = 512
    pairs: bool = True
    min_short_frac: float = 0.1
    filter: BoxFilter = BoxFilter()

    def __call__(self, image: np.ndarray):
        from scipy import ndimage
        from skimage.segmentation import felzenszwalb

        h, w = image.shape[:2]
        f = min(1.0, self.work_size / max(h, w))
        work = image if f == 1.0 else _resize(image, f)
        wh, ww = work.shape[:2]
        min_size = max(4, int(self.min_segment_frac * wh * ww))
        boxes, fills, scale_of = [], [], []
        for k, scale in enumerate(self.scales):
            seg = felzenszwalb(work, scale=scale, sigma=self.sigma, min_size=min_size)
            n = int(seg.max()) + 1
            area = np.bincount(seg.ravel(), minlength=n).astype(np.float64)
            slices = ndimage.find_objects(seg + 1, max_label=n)
            seg_boxes = np.array([[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in slices], np.float64)
            boxes.append(seg_boxes)
            fills.append(area / _area(seg_boxes))
            scale_of.append(np.full(n, k))
            if self.pairs and n > 1:
                a, b = _adjacent_pairs(seg)
                union = np.concatenate([np.minimum(seg_boxes[a, :2], seg_boxes[b, :2]),
                                        np.maximum(seg_boxes[a, 2:], seg_boxes[b, 2:])], axis=1)
                boxes.append(union)
                fills.append((area[a] + area[b]) / _area(union))
                scale_of.append(np.full(len(a), k))
        boxes, fills, scale_of = np.concatenate(boxes), np.concatenate(fills), np.concatenate(scale_of)
        scores = _score(boxes, fills, scale_of, len(self.scales), wh, ww, self.min_short_frac)
        return self.filter(boxes / f, scores, w, h)


def _score(boxes: np.ndarray, fills: np.ndarray, scale_of: np.ndarray, n_scales: int, h: int, w: int,
           min_short_frac: float) -> np.ndarray:
    """Objectness of each candidate box (higher first).

    ``stability`` — in how many of the segmentation scales a box with IoU >= 0.8 to it appears
    (an object's outline survives changes of scale; noise, texture cells and shadows do not) —
    dominates; ``fill`` (region pixels / box area) and the relative short edge break ties
    towards compact, whole objects rather than their parts. Boxes whose short edge is below
    ``min_short_frac`` of the image's score 0: region training needs regions that survive the
    resize to the training resolution. Measured (recall at IoU 0.5, top 16, 30 images per seed):
    ranking by fill alone found 0.13-0.18 of the quickstart's objects, stability 0.78-0.90,
    stability + fill + size 0.92-0.99 (sigma 0.5; 0.85 on the first generator design's small,
    occluding objects); shapes drawn on photos 0.98-1.0."""
    short = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / min(h, w)
    ok = short >= min_short_frac
    scores = np.zeros(len(boxes))
    if ok.any():   # only boxes that pass the size rule need a score (rows), against every box (columns)
        iou = box_iou(boxes[ok], boxes)
        stability = sum((iou[:, scale_of == k].max(1, initial=0.0) >= 0.8) for k in range(n_scales))
        scores[ok] = stability + 0.5 * fills[ok] + short[ok]
    return scores


def _area(b: np.ndarray) -> np.ndarray:
    return np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1.0)


def _adjacent_pairs(seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique unordered pairs of segment labels that touch (4-neighbourhood)."""
    pairs = np.concatenate([
        np.stack([seg[:, :-1].ravel(), seg[:, 1:].ravel()], 1),
        np.stack([seg[:-1, :].ravel(), seg[1:, :].ravel()], 1)])
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    pairs = np.unique(np.sort(pairs, axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def _resize(image: np.ndarray, f: float) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


# ----------------------------------------------------------------------------- SAM
@dataclasses.dataclass(frozen=True)
class SamSettings:
    points_per_side: int = 16         # grid of point prompts (SAM's automatic generator: 32)
    points_per_batch: int = 0         # prompts per decoder call; 0: the whole grid on a GPU, 64 on a CPU
    pred_iou_thresh: float = 0.88     # SAM's automatic-mask-generator defaults
    stability_thresh: float = 0.95
    stability_offset: float = 1.0
    device: str = "auto"              # auto (a GPU when torch sees one) | cpu | cuda | cuda:N
    filter: BoxFilter = BoxFilter()


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; anything else is checked and kept.

    Under Ray (``--ray-gpus-per-unit 1``) and in the local pool each worker process sees only its
    own GPU (``CUDA_VISIBLE_DEVICES``), so ``cuda`` is that worker's GPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise errors.InputError(f"sam device={device}: torch sees no GPU here (torch {torch.__version__}, "
                                    "CPU build?); use device=cpu or device=auto")
        return device
    if device != "cpu":
        raise errors.InputError(f"sam device={device!r}: use auto, cpu, cuda or cuda:N")
    return device


class Sam:
    """Segment Anything (``SamModel``) from a local ``transformers`` directory, on a GPU when there is one.

    One image embedding per image, then the point grid in batches (the whole grid in one decoder
    call on a GPU); each point gives the multimask outputs; a mask is kept when its predicted IoU
    and its stability score (IoU of the mask thresholded at ±offset in logit space) pass the
    thresholds. Thresholds and boxes are computed where the logits are (:meth:`_boxes_from_logits`,
    vectorised torch), so only the kept boxes and their scores come back to the host — not the
    3 x 1024 low-resolution masks of an image. Boxes come from the low-resolution logits (> 0),
    mapped from the model's input frame back to image pixels. Deterministic on a CPU (eval mode,
    no sampling); on a GPU within floating-point reduction order.

    TPUs: transformers' SAM is PyTorch, so it does not run on a TPU host's chips. Mine on GPU
    nodes (``--engine ray --ray-gpus-per-unit 1``) or with the weight-free proposer on the TPU
    hosts' CPUs, then train on the TPUs (docs/data.md, "Mining on a cluster")."""

    def __init__(self, model_dir: str, settings: SamSettings = SamSettings(), load: bool = True):
        from transformers import AutoConfig

        self.settings = settings
        path = Path(model_dir)
        if not (path / "config.json").exists():
            raise errors.MissingInput(f"{path}/config.json not found: --proposals sam:DIR needs a local "
                                    "transformers SAM directory (save_pretrained of a SamModel)")
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        self.kind = cfg.model_type
        if self.kind == "sam2":
            raise errors.InputError(f"{path}: SAM 2 folders are not supported yet (multi-level image features); use a "
                             "SamModel folder (SAM ViT-B/L/H, SlimSAM, ...)")
        if self.kind != "sam":
            raise errors.InputError(f"{path}: model_type {cfg.model_type!r} is not a SAM model")
        self.device = resolve_device(settings.device)
        self.input_size = int(cfg.prompt_encoder_config.image_size)   # the frame of points and masks
        pre = path / "preprocessor_config.json"
        p = json.loads(pre.read_text()) if pre.exists() else {}
        self.mean = np.asarray(p.get("image_mean", [0.485, 0.456, 0.406]), np.float32)
        self.std = np.asarray(p.get("image_std", [0.229, 0.224, 0.225]), np.float32)
        self.batch = settings.points_per_batch or (settings.points_per_side ** 2 if self.device != "cpu" else 64)
        self.model = None
        if load:
            import torch
            from transformers import SamModel

            self.torch = torch
            self.model = SamModel.from_pretrained(path, local_files_only=True).eval().to(self.device)

    def _preprocess(self, image: np.ndarray):
        """As SAM's processor: long side -> input size, pad bottom/right, normalise."""
        from PIL import Image

        h, w = image.shape[:2]
        s = self.input_size
        f = s / max(h, w)
        nw, nh = max(1, round(w * f)), max(1, round(h * f))
        fx = fy = f
        arr = np.asarray(Image.fromarray(image).convert("RGB").resize((nw, nh), Image.BILINEAR), np.float32) / 255.0
        arr = (arr - self.mean) / self.std
        canvas = np.zeros((s, s, 3), np.float32)
        canvas[:nh, :nw] = arr
        return canvas.transpose(2, 0, 1)[None], fx, fy, nw, nh

    def __call__(self, image: np.ndarray):
        torch, st = self.torch, self.settings
        h, w = image.shape[:2]
        pixels, fx, fy, nw, nh = self._preprocess(image)
        n = st.points_per_side
        # Grid cell centres over the resized (unpadded) image, in the model's input frame.
        gx, gy = np.meshgrid((np.arange(n) + 0.5) / n * nw, (np.arange(n) + 0.5) / n * nh)
        points = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float32)).to(self.device)
        boxes, scores = [], []
        with torch.inference_mode():
            emb = self.model.get_image_embeddings(torch.from_numpy(pixels).to(self.device))
            for i in range(0, len(points), self.batch):
                out = self.model(image_embeddings=emb, input_points=points[i:i + self.batch][None, :, None, :],
                                 multimask_output=True)
                logits = out.pred_masks[0].float()                      # [P, M, r, r] over the input frame
                b, s = self._boxes_from_logits(logits.reshape(-1, *logits.shape[-2:]),
                                               out.iou_scores[0].float().reshape(-1))
                boxes.append(b), scores.append(s)
        boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)
        scores = np.concatenate(scores) if scores else np.zeros((0,), np.float32)
        boxes = boxes * np.array([1 / fx, 1 / fy, 1 / fx, 1 / fy], np.float32)
        return st.filter(boxes, scores, w, h)

    def _boxes_from_logits(self, logits, iou):
        """Kept masks' boxes (input-frame pixels) and scores (predicted IoU x stability), as numpy.

        ``logits`` ``[N, r, r]`` and ``iou`` ``[N]`` stay where they are (torch tensors on the
        model's device, or arrays); only the kept rows are copied back."""
        import torch

        st = self.settings
        logits, iou = torch.as_tensor(logits), torch.as_tensor(iou).to(torch.as_tensor(logits).device)
        hi = (logits > st.stability_offset).sum((1, 2))
        lo = (logits > -st.stability_offset).sum((1, 2))
        stability = hi / lo.clamp(min=1)
        masks = logits > 0
        rows, cols = masks.any(2), masks.any(1)                         # [N, r]: rows / columns the mask touches
        keep = (iou >= st.pred_iou_thresh) & (stability >= st.stability_thresh) & rows.any(1)
        r = logits.shape[-1]
        idx = torch.arange(r, device=logits.device)
        first = lambda m: torch.where(m, idx, r).amin(1)                # noqa: E731
        last = lambda m: torch.where(m, idx, -1).amax(1) + 1            # noqa: E731
        cell = self.input_size / r                                      # input pixels per low-res cell
        boxes = torch.stack([first(cols), first(rows), last(cols), last(rows)], 1)[keep].float() * cell
        return (boxes.cpu().numpy().astype(np.float32),
                (iou * stability)[keep].float().cpu().numpy().astype(np.float32))


# ----------------------------------------------------------------------------- parsing
class NoProposals:
    """``--proposals none``: keep the input's existing regions (e.g. add OCR to a COCO import)."""

    def __call__(self, image: np.ndarray):
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)


def _options(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, text.split(",")):
        if "=" not in item:
            raise errors.InputError(f"proposer option {item!r}: expected key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def parse(spec: str, *, min_short_edge: float = 0.0, max_per_image: int = 16, nms_iou: float = 0.7,
          load: bool = True):
    """``felzenszwalb[:scales=A+B+C,sigma=S,pairs=0|1,work=PX]`` |
    ``sam:DIR[,points=N,iou=T,stability=T,batch=N,device=auto|cpu|cuda]`` | ``none``. Size rules
    (short edge, top-k, NMS IoU) are shared by all proposers. ``load=False`` checks the spec (and
    a SAM folder's config) without loading weights: the driver's check, before workers start."""
    name, _, rest = spec.partition(":")
    box_filter = BoxFilter(min_short_edge=min_short_edge, max_per_image=max_per_image, nms_iou=nms_iou)
    if name == "none":
        return NoProposals()
    if name == "felzenszwalb":
        o = _options(rest)
        kw = {}
        if "scales" in o:
            kw["scales"] = tuple(float(s) for s in o.pop("scales").split("+"))
        if "sigma" in o:
            kw["sigma"] = float(o.pop("sigma"))
        if "pairs" in o:
            kw["pairs"] = o.pop("pairs") not in ("0", "false", "no")
        if "work" in o:
            kw["work_size"] = int(o.pop("work"))
        if o:
            raise errors.InputError(f"felzenszwalb: unknown option(s) {sorted(o)} (scales, sigma, pairs, work)")
        return Felzenszwalb(filter=box_filter, **kw)
    if name == "sam":
        model_dir, _, opts = rest.partition(",")
        if not model_dir:
            raise errors.InputError("sam needs a directory: --proposals sam:/path/to/local/sam (transformers format)")
        o = _options(opts)
        kw = {}
        for key, field, typ in (("points", "points_per_side", int), ("iou", "pred_iou_thresh", float),
                                ("stability", "stability_thresh", float), ("batch", "points_per_batch", int),
                                ("device", "device", str)):
            if key in o:
                kw[field] = typ(o.pop(key))
        if o:
            raise errors.InputError(f"sam: unknown option(s) {sorted(o)} (points, iou, stability, batch, device)")
        return Sam(model_dir, SamSettings(filter=box_filter, **kw), load=load)
    raise errors.InputError(f"--proposals {spec!r}: use felzenszwalb[:options], sam:DIR[,options] or none")
