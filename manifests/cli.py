"""``flame manifest SOURCE [INPUTS...] --out DIR``: build a canonical manifest (SPEC §4, §8).

The sources, their inputs and their own flags come from :mod:`manifests.registry`, where each source module
registers itself when imported; this module imports them, builds the parser and dispatches to the builder.
``flame manifest --help`` lists the sources with their inputs. The command ends by printing the rows per split
and every coverage count (skip reasons and notes).
"""

from __future__ import annotations

import argparse

from manifests import csv_source, emoji, folder_source, parquet_source, registry, webdataset_source
from manifests.common import ON_DUPLICATE
from manifests.schema import ManifestInfo


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (``--limit 0`` would build an empty manifest)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


SOURCE_MODULES = (csv_source, emoji, folder_source, parquet_source, webdataset_source)
"""The modules that define the sources; importing one registers it (:mod:`manifests.registry`)."""

_USAGE = "flame manifest SOURCE [INPUT ...] --out DIR [options]"
_HEAD = "``flame manifest SOURCE [INPUTS...] --out DIR``: build a canonical manifest (SPEC §4, §8)."
_TAIL = (
    "INPUTS follow SOURCE directly (options go before SOURCE or after the inputs). Ends by printing the rows "
    "per split and every coverage count (skip reasons and notes)."
)


def description() -> str:
    """The text ``flame manifest --help`` shows above the flags: the sources and their inputs as a table."""
    sources = registry.sources()
    names = [f"``{s.name}``" for s in sources]
    width = max(len(n) for n in names)
    rule = "=" * width + "  " + "=" * max(80, *(len(s.inputs) for s in sources))
    table = [rule, *(f"{n:<{width}}  {s.inputs}" for n, s in zip(names, sources, strict=True)), rule]
    return "\n".join([_HEAD, "", "Sources and their inputs:", "", *table, "", _TAIL, ""])


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``flame manifest``: the common flags, then each registered option group."""
    p = sub.add_parser(
        "manifest",
        help="Build a canonical manifest (SPEC §4)",
        usage=_USAGE,
        description=description(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", choices=[s.name for s in registry.sources()], help="input format")
    p.add_argument("inputs", nargs="*",
                   help="input files/folders right after SOURCE (see above; none for emoji)")
    p.add_argument("--out", required=True, help="manifest directory to write")
    p.add_argument("--split", default="train", help="split of rows whose source names none (default: train)")
    p.add_argument("--on-duplicate", choices=ON_DUPLICATE, default="error",
                   help="a key seen twice: error (default), keep the first copy, or skip every copy")
    p.add_argument("--limit", type=positive_int, help="read at most this many samples")
    for title, adders in registry.option_groups():
        group = p.add_argument_group(title)
        for add in adders:
            add(group)
    p.set_defaults(func=run)
    return p


def build(args: argparse.Namespace) -> ManifestInfo:
    """Run the builder of ``args.source`` with the parsed flags; returns the written manifest info.

    Raises:
        ManifestError: wrong number of inputs, bad input data (duplicate keys, missing columns).
        FileNotFoundError: an input does not exist.
    """
    source = registry.source(args.source)
    source.check_inputs(source.name, args.inputs)
    return source.build(args)


def format_summary(info: ManifestInfo, out: str) -> str:
    """The coverage summary printed at the end: rows per split, then every coverage entry."""
    lines = [f"manifest ({info.source.get('name')}) written to {out}", "rows per split:"]
    lines += [f"  {split:<28} {n}" for split, n in info.counts.items()]
    lines.append("coverage:")
    lines += [f"  {reason:<28} {n}" for reason, n in info.coverage.items()] or ["  (nothing skipped)"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``flame manifest``: build, print the summary; returns 0.

    Bad input (:class:`~manifests.schema.ManifestError`, a missing file) reaches :func:`flame_pipeline.cli.main`,
    which prints it as one line and exits 2, like every subcommand.
    """
    info = build(args)
    print(format_summary(info, args.out))
    return 0
