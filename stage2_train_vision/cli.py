"""`flame train`: Stage 2: train a ViT + projector against a cache (SPEC §5).

The same as ``accelerate launch stage2_train_vision/train.py --config FILE [overrides]`` in one process. This
module registers the subcommand and owns its arguments (:func:`add_arguments`, shared with
:func:`stage2_train_vision.train.main`); the command is :func:`stage2_train_vision.train.run`. Only ``argparse``
here, so ``flame --help`` registers the command without importing torch, timm or accelerate.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config FILE``, ``--resume`` / ``--resume-from CHECKPOINT`` and ``section.key=value`` overrides to
    ``parser``; returns it. Parsed: ``args.config`` (str), ``args.resume`` (``None``, ``"latest"`` or a checkpoint
    path), ``args.overrides`` (list of str)."""
    parser.add_argument("--config", required=True, help="TOML config (configs/demo-cpu.toml, ...)")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume", action="store_const", const="latest", default=None,
        help="continue from the newest checkpoint under TRAIN.OUTPUT_DIR/checkpoints (same sample sequence)",
    )
    resume.add_argument("--resume-from", dest="resume", metavar="CHECKPOINT", help="continue from this checkpoint")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value",
        help="config overrides, e.g. data.cache=runs/cache optim.lr=1e-3 train.epochs=2",
    )
    return parser


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
