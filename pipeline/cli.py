"""The ``flame`` console command (SPEC §8).

Each subcommand lives with the package that owns it; this module only wires them together. A package exposes
``add_parser(subparsers)`` in its ``cli`` module, which registers the subcommand and sets ``func`` to a
callable taking the parsed ``argparse.Namespace`` and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline import __version__

# (subcommand module, in the order `flame --help` lists them)
_SUBCOMMANDS = (
    "manifests.cli",
    "stage1_embed_text.cli",
    "stage2_train_vision.cli",
    "eval.cli",
    "pipeline.inspect_cli",
    "pipeline.import_cli",
    "pipeline.demo",
)


def build_parser() -> argparse.ArgumentParser:
    """The full ``flame`` argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="flame", description="FLAME: frozen-LLM language-image pre-training.")
    parser.add_argument("--version", action="version", version=f"flame-pipeline {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _SUBCOMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


# Errors that describe bad input or a refused request: printed as one line (exit 2), not as a traceback.
# Named by module so that checking them never imports a heavy package.
_USER_ERRORS = (
    ("manifests.schema", "ManifestError"),
    ("pipeline.cache", "CacheError"),
    ("pipeline.assets", "AssetError"),
    ("stage2_train_vision.config", "ConfigError"),
    ("stage2_train_vision.data", "DataError"),
    ("stage2_train_vision.train", "CheckpointError"),
    ("stage1_embed_text.vllm_backend", "VllmUnavailableError"),
)


def is_user_error(exc: BaseException) -> bool:
    """True for the project's input/refusal errors and for missing files (see :data:`_USER_ERRORS`)."""
    if isinstance(exc, FileNotFoundError):
        return True
    for module, name in _USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flame`` command; returns the process exit code.

    Bad input (an unfinished manifest, a refused cache, an unknown config key, a missing file) ends with a
    one-line ``flame COMMAND: message`` and exit code 2; ``-v`` shows the traceback as well.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs which SIMD build it fell back to
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        if not is_user_error(e) or args.verbose:
            raise
        print(f"flame {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
