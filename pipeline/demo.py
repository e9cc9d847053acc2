"""`flame demo`: the whole pipeline on the embedded default."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `flame demo`."""
    p = sub.add_parser("demo", help="Run the whole pipeline on the embedded emoji default")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    print("flame demo: not yet implemented", file=sys.stderr)
    return 2
