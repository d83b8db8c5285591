"""User paths: local folders or any scheme ``etils.epath`` knows (``gs://``, ``s3://``, ...), one type.

Workdirs, data dirs, ``init_from`` sources and export targets go through
:func:`path`, never ``pathlib``: ``pathlib.Path("gs://b/run")`` is the *local*
folder ``gs:/b/run``, so a pod would write checkpoints and metrics to each
host's disk and lose them with the VM. Orbax, Grain and TFDS take the same
``epath.Path`` objects.

Two libraries here only write local files: tensorboardX (its GCS writer needs
google-cloud-storage) and ArrayRecord's C++ reader. Metrics and event files
for a remote workdir are therefore written to a local spool and mirrored
(:class:`Mirror`); remote ArrayRecord shards must be mounted (gcsfuse, a
shared filesystem) — :func:`require_local` says so in one line.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

from etils import epath

from rice_jax import errors

PathLike = str | os.PathLike


def path(p: PathLike) -> epath.Path:
    """The one path type for user paths; local paths are made absolute (Orbax requires it)."""
    s = os.fspath(p)
    if s.startswith("file://"):
        s = s[len("file://"):]
    return epath.Path(s) if is_remote(s) else epath.Path(os.path.abspath(s))


def is_remote(p: PathLike) -> bool:
    """True for ``scheme://...`` paths (``gs://``, ``s3://``, ...); ``file://`` counts as local."""
    s = os.fspath(p)
    return "://" in s and not s.startswith("file://")


def require_local(p: PathLike, what: str, advice: str) -> str:
    """``p`` as a local path string, or a one-line error saying why it must be local and what to do."""
    if is_remote(p):
        raise errors.InputError(f"{p}: {what} must be on a local or mounted filesystem ({advice})")
    return os.fspath(path(p))


# Every temporary file of an atomic write is ``.<name>.tmp-<pid>`` next to its target: hidden from
# globs of the real files, one per writing process (two writers never share one), and findable by a
# resumed job that clears what a killed one left (``TEMP_MARK``).
TEMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_local(target: PathLike) -> Iterator[Path]:
    """``with atomic_local(p) as tmp:`` write ``tmp`` (any writer: numpy, sqlite, ArrayRecord); on a
    clean exit it is renamed onto ``p`` in one step, on an error removed. A reader, or a crash at any
    point, sees the old file or the whole new one, never half of it. ``p`` must be local."""
    target = Path(os.fspath(target))
    tmp = target.with_name(f".{target.name}{TEMP_MARK}{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


@contextlib.contextmanager
def open_atomic(target: PathLike):
    """``with open_atomic(p) as f:`` a binary file at any scheme that appears whole or not at all: a
    local temp file renamed into place (:func:`atomic_local`), or a remote object (``gs://``),
    which an object store publishes only when the upload completes."""
    target = path(target)
    if is_remote(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as f:
            yield f
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_local(target) as tmp, open(tmp, "wb") as f:
        yield f


def write_text_atomic(p: PathLike, text: str) -> None:
    """Write a small text file so a reader never sees half of it (temp + rename; a single PUT remotely)."""
    p = path(p)
    if is_remote(p):
        p.write_text(text)
        return
    with atomic_local(p) as tmp:
        tmp.write_text(text)


def copy_file(src: PathLike, dst: PathLike) -> None:
    """Copy one file between any two schemes (bytes through this process; meant for small files)."""
    dst = path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(path(src).read_bytes())


def download_dir(src: PathLike, files: Optional[Iterable[str]] = None) -> str:
    """A local copy of a (small) remote directory, e.g. an HF model folder; local paths pass through."""
    src = path(src)
    if not is_remote(src):
        return os.fspath(src)
    local = tempfile.mkdtemp(prefix="rice_jax_dl_")
    names = list(files) if files is not None else [f.name for f in src.iterdir() if not f.is_dir()]
    for name in names:
        if (src / name).exists():
            copy_file(src / name, os.path.join(local, name))
    return local


def upload_dir(local: PathLike, dst: PathLike) -> None:
    """Copy every file under a local folder to ``dst`` (any scheme), keeping the layout."""
    local = os.fspath(local)
    for root, _, files in os.walk(local):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), local)
            copy_file(os.path.join(root, f), path(dst) / rel)


class Mirror:
    """A local folder that stands in for a remote one for writers that only do local files.

    ``local`` is the remote folder itself when it is local. Otherwise a temp
    folder, seeded with ``seed`` files already in the remote folder (so a
    resumed run appends to its ``metrics.jsonl``), and copied back by
    :meth:`sync` — every ``every_s`` seconds from :meth:`maybe_sync`, and
    always at :meth:`close`. Whole files are re-uploaded (object stores have no
    append); metrics and event files stay small.
    """

    def __init__(self, remote: PathLike, *, seed: Iterable[str] = (), every_s: float = 60.0):
        self.remote = path(remote)
        self.mirrored = is_remote(self.remote)
        self.every_s = every_s
        self._last = time.monotonic()
        if not self.mirrored:
            self.remote.mkdir(parents=True, exist_ok=True)
            self.local = os.fspath(self.remote)
            return
        self.local = tempfile.mkdtemp(prefix="rice_jax_spool_")
        for name in seed:
            if (self.remote / name).exists():
                copy_file(self.remote / name, os.path.join(self.local, name))

    def maybe_sync(self) -> None:
        if self.mirrored and time.monotonic() - self._last >= self.every_s:
            self.sync()

    def sync(self) -> None:
        if self.mirrored:
            upload_dir(self.local, self.remote)
            self._last = time.monotonic()

    def close(self) -> None:
        if self.mirrored:
            self.sync()
            shutil.rmtree(self.local, ignore_errors=True)
