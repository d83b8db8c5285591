"""The error classes a user can act on, at the bottom of the import graph (imports nothing of ours).

A :class:`UserError` is bad input the user can fix — a missing dataset or tokenizer, a damaged
shard or checkpoint, a config value out of range — and its message already names the file, record
or field and says what to do. Every ``python -m rice_jax.*`` command ends on one with a single
``error: ...`` line and exit code 2 (:func:`rice_jax.cli.run`); anything else is a bug and keeps
its traceback. The subclasses also derive from the builtin a caller would expect
(``ValueError``, ``FileNotFoundError``, ``RuntimeError``), so ``except ValueError`` still works.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix; the message says which and how."""


class InputError(UserError, ValueError):
    """A value the user gave — a flag, a config field, a spec string, file content — is wrong."""


class MissingInput(UserError, FileNotFoundError):
    """A file or folder the user pointed at does not exist or is not what was expected."""


def first_line(err: BaseException, max_chars: int = 300) -> str:
    """``"TypeName: first non-empty line of the message"``: how errors are quoted inside our own
    one-line messages (a damaged shard's reader error, an unreadable checkpoint's)."""
    lines = [l.strip() for l in str(err).splitlines() if l.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:max_chars]
