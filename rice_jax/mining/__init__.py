"""Stage 1, mining: raw images (folders, tars, lists) -> region records. Object proposals
(``proposals``: Felzenszwalb or SAM boxes) and OCR lines (``ocr``: PP-OCR through ONNX Runtime) per
image, written as ArrayRecord shards by ``mine``, the resumable, multi-host command."""
