"""`flame embed`: Stage 1: embed captions with a frozen LLM into a cache (SPEC §2)."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `flame embed`."""
    p = sub.add_parser("embed", help="Stage 1: embed captions with a frozen LLM into a cache (SPEC §2)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    print("flame embed: not yet implemented", file=sys.stderr)
    return 2
