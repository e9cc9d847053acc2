"""The stage-2 command-line arguments, shared by ``flame train`` (:mod:`stage2_train_vision.cli`) and
``accelerate launch stage2_train_vision/train.py`` (:func:`stage2_train_vision.train.main`).

Only ``argparse`` here, so ``flame --help`` registers the command without importing torch, timm or accelerate.
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
