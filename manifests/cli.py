"""`flame manifest`: Build a canonical manifest (SPEC §4)."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `flame manifest`."""
    p = sub.add_parser("manifest", help="Build a canonical manifest (SPEC §4)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    print("flame manifest: not yet implemented", file=sys.stderr)
    return 2
