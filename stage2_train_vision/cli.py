"""`flame train`: Stage 2: train a ViT + projector against a cache (SPEC §5)."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `flame train`."""
    p = sub.add_parser("train", help="Stage 2: train a ViT + projector against a cache (SPEC §5)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    print("flame train: not yet implemented", file=sys.stderr)
    return 2
