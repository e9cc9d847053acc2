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
from pathlib import Path

from pipeline import __version__
from pipeline.errors import run_command

# (subcommand module, in the order `flame --help` lists them)
_SUBCOMMANDS = (
    "manifests.cli",
    "stage1_embed_text.cli",
    "stage2_train_vision.cli",
    "eval.cli",
    "flame_pipeline.inspect_cli",
    "flame_pipeline.imports.cli",
    "flame_pipeline.demo.cli",
    "flame_pipeline.search_cli",
    "flame_pipeline.push",
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flame`` command; returns the process exit code.

    Bad input (a :class:`pipeline.errors.FlameError`: an unfinished manifest, a refused cache, an unknown config
    key; or a missing file) ends with a one-line ``flame COMMAND: message`` and exit code 2, caught here and
    nowhere else; ``-v`` shows the traceback as well.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs which SIMD build it fell back to
    return run_command(f"flame {args.command}", lambda: args.func(_resolved(args)), verbose=args.verbose)


def _resolved(args: argparse.Namespace) -> argparse.Namespace:
    """``flame eval --model FILE``: an official FLAME checkpoint file is imported once (``flame_pipeline.sources``)
    before eval runs; folders and hub ids are resolved by eval itself."""
    model = getattr(args, "model", None)
    if args.command == "eval" and model and Path(model).expanduser().is_file():
        from flame_pipeline.sources import resolve_model

        args.model = str(resolve_model(model, what="--model"))
    return args


if __name__ == "__main__":
    sys.exit(main())
