"""How every ``python -m rice_jax.*`` command ends on bad input: one line, exit code 2.

Bad input is a :class:`rice_jax.errors.UserError` — a missing dataset or tokenizer, a damaged
shard or checkpoint, a config value out of range — whose message already names the file or field
and the command to run; a traceback would bury that line. Anything else is a bug and keeps its
traceback. Set ``RICE_JAX_TRACEBACK=1`` to get the traceback of a user error too.

Config mistakes on absl commands (``--config FILE:VARIANT``, ``--config.key=value``) are caught
while the flags are parsed (:func:`parse_absl_flags`) and reported the same way, instead of absl's
"FATAL Flags parsing error" around a traceback.
"""
from __future__ import annotations

import ast
import os
import sys
from typing import Callable

from rice_jax import errors

EXIT_BAD_INPUT = 2


def run(fn: Callable[[], object]) -> object:
    """Call ``fn()``; on a user error print ``error: <first line>`` to stderr and exit 2."""
    try:
        return fn()
    except errors.UserError as e:
        if os.environ.get("RICE_JAX_TRACEBACK"):
            raise
        lines = [l for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
        print(f"error: {lines[0]}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


def _config_flag_message(err: BaseException) -> str:
    """The words of an absl/ml_collections flag error that say what is wrong.

    ``config_flags`` wraps the config file's own exception (our ``InputError`` for an unknown
    variant) in a message that embeds its whole traceback; an unknown ``--config.a.b`` key surfaces
    as an ``AttributeError`` whose text is the repr of "'lrr'\\nDid you mean "lr"...": keep the
    innermost message, unquoted, on one line."""
    if isinstance(err, (AttributeError, KeyError)):
        text = str(err.args[0]) if err.args else str(err)
        if text[:1] in "'\"":  # the repr of the real message
            try:
                text = str(ast.literal_eval(text))
            except (ValueError, SyntaxError):
                pass
        parts = [p.strip().strip("'\"") for p in text.replace("\\n", "\n").splitlines() if p.strip()]
        key = parts[0] if parts else "?"
        hint = " ".join(parts[1:])
        return f"unknown config field {key!r}" + (f": {hint}" if hint else "")
    lines = [l.strip() for l in str(err).splitlines() if l.strip()]
    missing = [l for l in lines if "No such file or directory" in l]
    if missing:
        return f"--config: {missing[-1].split(']', 1)[-1].strip()} (give configs/FILE.py or FILE.py:VARIANT)"
    for line in reversed(lines):
        for marker in ("UserError: ", "InputError: ", "MissingInput: ", "ValueError: "):
            if marker in line:
                return line.split(marker, 1)[1]
    return lines[-1] if lines else type(err).__name__


def parse_absl_flags(argv: list[str]) -> list[str]:
    """absl ``flags_parser``: parse ``argv``; a flag or config error becomes one :class:`InputError` line."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
        raise errors.InputError(_config_flag_message(e)) from e


def absl_config(name: str = "config"):
    """The value of an ml_collections config flag; config files load lazily (on first access), so a
    missing or failing file is reported here, as one :class:`InputError` line."""
    from absl import flags

    try:
        value = getattr(flags.FLAGS, name)
        value.keys()  # a file that failed to load is a placeholder that raises on first use
        return value
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
        raise errors.InputError(_config_flag_message(e)) from e


def run_absl(main: Callable[[list[str]], object]) -> None:
    """``absl.app.run(main)`` with flag and config errors, and user errors from ``main``, as one line."""
    from absl import app

    run(lambda: app.run(main, flags_parser=parse_absl_flags))


def define_config_flag(name: str = "config") -> None:
    """The ``--config FILE[:VARIANT]`` flag every absl command takes (locked: a mistyped key fails)."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(name, None, "configs/FILE.py or rice_jax/configs/rice.py:VARIANT",
                                    lock_config=True)


def emit_json(result: dict, out: str = "") -> None:
    """A command's result as one JSON line on stdout, and as a file at ``out`` when given (atomic)."""
    import json

    from rice_jax import storage

    print(json.dumps(result), flush=True)
    if out:
        storage.write_text_atomic(out, json.dumps(result, indent=1) + "\n")
