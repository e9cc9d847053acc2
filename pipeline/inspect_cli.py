"""`flame inspect`: cache inspection (identity, counts, norms, facet statistics, neighbours)."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `flame inspect`."""
    p = sub.add_parser("inspect", help="Inspect a stage-1 cache")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    print("flame inspect: not yet implemented", file=sys.stderr)
    return 2
