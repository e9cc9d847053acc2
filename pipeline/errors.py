"""The project's one error policy: bad input or a refused request is a :class:`FlameError`.

Every module that rejects user input (a manifest, a cache, a config, a checkpoint, a benchmark folder, an
asset) raises a subclass of :class:`FlameError`; the ``flame`` command (:func:`flame_pipeline.cli.main`) catches
it once and prints ``flame COMMAND: message`` with exit code 2 (``-v`` adds the traceback). Anything else is a
bug and keeps its traceback. An :class:`OSError` (a missing file, a path that is a file where a folder is
expected, no permission, a full disk, no network) describes the machine or the input, not the code, and counts
as bad input too.

Subclasses keep the built-in base they had (``ValueError`` for malformed input, ``RuntimeError`` for a refused
state), so ``except ValueError`` in user code still catches them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class FlameError(Exception):
    """Bad input or a refused request: shown to the user as one line, exit code 2, never as a traceback."""


def is_user_error(exc: BaseException) -> bool:
    """True if ``exc`` is bad input rather than a bug: a :class:`FlameError` or an :class:`OSError`."""
    return isinstance(exc, (FlameError, OSError))


def one_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (the message itself when it has one line), for the one-line report."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return lines[0] if len(lines) == 1 else f"{lines[0]} (-v shows the rest)"


def run_command(prog: str, command: Callable[[], int | None], *, verbose: bool = False) -> int:
    """Run ``command`` and return its exit code; bad input ends as one line ``PROG: message`` and exit code 2.

    Used once per entry point (``flame``, ``python -m stage1_embed_text``, ``stage2_train_vision/train.py``);
    subcommands never catch :class:`FlameError` themselves. Other exceptions (bugs) propagate with their
    traceback, and so does bad input when ``verbose``.
    """
    try:
        return int(command() or 0)
    except Exception as exc:
        if verbose or not is_user_error(exc):
            raise
        print(f"{prog}: {one_line(exc)}", file=sys.stderr)
        return 2
