"""`flame train`: Stage 2: train a ViT + projector against a cache (SPEC §5).

The same as ``accelerate launch stage2_train_vision/train.py --config FILE [overrides]`` in one process.
Heavy imports (torch, timm, accelerate) happen only when the command runs, so ``flame --help`` stays fast.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The stage-2 arguments, shared by ``flame train`` and ``stage2_train_vision/train.py``."""
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
    """Load the config named by ``args`` and train; returns the exit code."""
    from stage2_train_vision.config import load_config
    from stage2_train_vision.train import train

    train(load_config(args.config, args.overrides), resume=args.resume)
    return 0
