"""`flame demo`: the subcommand; its options are :class:`flame_pipeline.demo.config.DemoConfig`, the run itself is
:mod:`flame_pipeline.demo.run` (imported when the demo runs, so that `flame --help` does not load torch).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flame_pipeline.demo.config import DemoConfig


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `flame demo`."""
    p = sub.add_parser("demo", help="Run the whole pipeline on the embedded emoji default",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="all 7,572 images instead of the ~10-minute subset")
    p.add_argument("--out", type=Path, help="run directory (default runs/demo-<timestamp>)")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="root of runs and reusable artifacts")
    p.add_argument("--train-bases", type=int, default=DemoConfig.train_bases, help="train concepts in the subset")
    p.add_argument("--test-bases", type=int, default=DemoConfig.test_bases, help="test concepts in the subset")
    p.add_argument("--llm", default=DemoConfig.llm, help="stage-1 LLM (embedded name, folder or hub id)")
    p.add_argument("overrides", nargs="*", help="stage-2 config overrides, e.g. train.epochs=5")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run `flame demo` with the parsed options; exit code 0."""
    from flame_pipeline.demo.run import run_demo  # torch: only when the demo runs

    run_demo(DemoConfig(runs=args.runs, out=args.out, full=args.full, train_bases=args.train_bases,
                        test_bases=args.test_bases, llm=args.llm, train_overrides=tuple(args.overrides)))
    return 0
