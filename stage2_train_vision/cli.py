"""`flame train`: Stage 2: train a ViT + projector against a cache (SPEC §5).

The same as ``accelerate launch stage2_train_vision/train.py --config FILE [overrides]`` in one process. This
module only registers the subcommand; the arguments are :mod:`stage2_train_vision.arguments` and the command is
:func:`stage2_train_vision.train.run`.
"""

from __future__ import annotations

import argparse

from stage2_train_vision.arguments import add_arguments


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `flame train`."""
    p = sub.add_parser(
        "train",
        help="Stage 2: train a ViT + projector against a cache (SPEC §5)",
        description="Train per a TOML config with section.key=value overrides (see configs/demo-cpu.toml).",
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """`flame train`: :func:`stage2_train_vision.train.run` (load the config, train); returns the exit code."""
    # the one deferred import: train pulls in torch, timm and accelerate (seconds), which `flame --help` and
    # every other subcommand never need
    from stage2_train_vision import train

    return train.run(args)
