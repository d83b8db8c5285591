"""Downstream evaluation on the paper's benchmarks, in light-probe form, for any backbone.

One frozen encoder (:mod:`.encoders`: ``ckpt:``, ``hf:``, ``hub:``, ``transformers:DIR`` or a model
object), one light head per task, trained the same way for every backbone:

- :mod:`.refseg` -- referring segmentation (RefCOCO / RefCOCO+ / RefCOCOg, or synthetic referring
  expressions): a text-conditioned mask decoder; cIoU and gIoU per split;
- :mod:`.semseg` -- semantic segmentation (ADE20K, or the synthetic semantic map): linear head, mIoU;
- :mod:`.regcls` -- region classification (COCO boxes, or the synthetic objects): linear probe, top-1.

Data: :mod:`.sources`; metrics: :mod:`.metrics`; the table command: ``python -m rice_jax.downstream``
(:mod:`.table`).
"""
