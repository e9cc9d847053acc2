"""`flame eval`: Zero-shot evaluation (SPEC §6)."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `flame eval`."""
    p = sub.add_parser("eval", help="Zero-shot evaluation (SPEC §6)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    print("flame eval: not yet implemented", file=sys.stderr)
    return 2
