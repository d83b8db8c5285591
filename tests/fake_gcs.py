"""An offline stand-in for Google Cloud Storage at the library boundary (tests only).

``gs://BUCKET/KEY`` is served from ``ROOT/BUCKET/KEY`` on local disk for the two
ways the code base reaches storage: ``etils.epath`` (through fsspec's ``gcs``
protocol) and Orbax's TensorStore kvstore spec. Nothing contacts a network;
everything above the boundary (our path handling, Orbax's and epath's own
logic) runs as it would against a bucket.
"""
from __future__ import annotations

import contextlib
import os

import fsspec
from fsspec.implementations.local import LocalFileSystem


def _make_fs(root: str):
    class FakeGCSFileSystem(LocalFileSystem):
        protocol = ("gs", "gcs")
        root_marker = ""

        @classmethod
        def _strip_protocol(cls, path):
            path = os.fspath(path)
            for p in ("gs://", "gcs://"):
                if path.startswith(p):
                    return os.path.join(root, path[len(p):])
            return LocalFileSystem._strip_protocol(path)

        # Like gcsfs, listings name objects as "bucket/key" (epath adds the gs:// back).
        def _rel(self, p: str) -> str:
            return os.path.relpath(p, root) if os.path.isabs(p) and p.startswith(root) else p

        def glob(self, path, **kw):
            return [self._rel(p) for p in super().glob(path, **kw)]

    return FakeGCSFileSystem


@contextlib.contextmanager
def fake_gcs(root: str):
    """Within the context, ``gs://`` paths live under ``root`` (a local folder)."""
    from etils.epath import backend as epath_backend
    from orbax.checkpoint._src.path import gcs_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils

    os.makedirs(root, exist_ok=True)
    cls = _make_fs(root)
    saved = {p: fsspec.registry.get(p) for p in ("gs", "gcs")}
    for p in ("gs", "gcs"):
        fsspec.register_implementation(p, cls, clobber=True)
    epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear()

    # TensorStore (Orbax's array I/O): a gs:// directory becomes the local folder under root.
    orig_normalize = tensorstore_utils._normalize_path

    def normalize(p: str) -> str:
        p = os.fspath(p)
        if p.startswith("gs://"):
            p = os.path.join(root, p[len("gs://"):])
        return orig_normalize(p)

    tensorstore_utils._normalize_path = normalize
    orig_hns = gcs_utils.is_hierarchical_namespace_enabled
    gcs_utils.is_hierarchical_namespace_enabled = lambda p: False
    try:
        yield root
    finally:
        tensorstore_utils._normalize_path = orig_normalize
        gcs_utils.is_hierarchical_namespace_enabled = orig_hns
        for p, impl in saved.items():
            if impl is None:
                fsspec.registry.pop(p, None) if hasattr(fsspec.registry, "pop") else None
            else:
                fsspec.register_implementation(p, impl, clobber=True)
        epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear()
