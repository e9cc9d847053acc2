"""``flame manifest SOURCE [INPUTS...] --out DIR``: build a canonical manifest (SPEC §4, §8).

Sources and their inputs:

==============  ================================================================================
``emoji``       none (the embedded emoji data set, SPEC §9)
``webdataset``  tar shards: files, brace patterns (``data/{00000..00009}.tar``) or folders
``parquet``     Parquet files, folders of them, or ``datasets`` ``save_to_disk`` folders
``csv``         CSV/TSV files (open_clip ``filepath``/``title``)
``folder``      one image folder with ``captions.jsonl``
==============  ================================================================================

INPUTS follow SOURCE directly (options go before SOURCE or after the inputs). Ends by printing the rows per split and every coverage count (skip reasons and notes).
"""

from __future__ import annotations

import argparse

from manifests.common import ON_DUPLICATE
from manifests.schema import ManifestError, ManifestInfo

SOURCES = ("emoji", "webdataset", "parquet", "csv", "folder")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``flame manifest``."""
    p = sub.add_parser(
        "manifest",
        help="Build a canonical manifest (SPEC §4)",
        usage="flame manifest SOURCE [INPUT ...] --out DIR [options]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", choices=SOURCES, help="input format")
    p.add_argument("inputs", nargs="*", help="input files/folders right after SOURCE (see above; none for emoji)")
    p.add_argument("--out", required=True, help="manifest directory to write")
    p.add_argument("--split", default="train", help="split of rows whose source names none (default: train)")
    p.add_argument("--on-duplicate", choices=ON_DUPLICATE, default="error",
                   help="a key seen twice: error (default), keep the first copy, or skip every copy")
    p.add_argument("--limit", type=int, help="read at most this many samples")

    g = p.add_argument_group("webdataset")
    g.add_argument("--long-captions",
                   help="FLAME long recaptions: JSON list or JSON lines of {'__key__': ..., FIELD: ...}")
    g.add_argument("--short-captions", help="FLAME short recaptions (same format)")
    g.add_argument("--caption-field", default="minicpm", help="caption field in the recaption JSON files")
    g.add_argument("--json-caption-field", default="caption",
                   help="field of a sample's .json used as raw caption if it has no .txt (default: caption)")
    g.add_argument("--workers", type=_positive_int, default=1,
                   help="processes reading tar shards in parallel (default: 1); same output for any N")

    g = p.add_argument_group("parquet / csv")
    g.add_argument("--image-column", help="image column (default: image for parquet, filepath for csv)")
    g.add_argument("--raw-column", help="raw caption column (default: text for parquet, title for csv)")
    g.add_argument("--short-column", help="short caption column")
    g.add_argument("--long-column", help="long caption column")
    g.add_argument("--key-column", help="key column (default: see the source's docs)")
    g.add_argument("--sep", help="csv field separator (default: tab for .tsv, else sniffed)")

    g = p.add_argument_group("folder")
    g.add_argument("--captions-file", default="captions.jsonl", help="captions JSONL inside the folder")

    g = p.add_argument_group("emoji")
    g.add_argument("--vendors", default="google,twitter", help="comma-separated emoji vendors")
    g.add_argument("--seed", type=int, default=0, help="split hash seed")
    p.set_defaults(func=run)
    return p


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _columns(args: argparse.Namespace, image: str, raw: str) -> dict[str, str | None]:
    return {
        "image_column": args.image_column or image,
        "raw_column": args.raw_column or raw,
        "short_column": args.short_column,
        "long_column": args.long_column,
        "key_column": args.key_column,
    }


def _check_inputs(source: str, inputs: list[str]) -> None:
    if source == "emoji" and inputs:
        raise ManifestError(f"source 'emoji' takes no inputs, got {inputs}")
    if source == "folder" and len(inputs) != 1:
        raise ManifestError(f"source 'folder' takes exactly one folder, got {len(inputs)} inputs")
    if source not in ("emoji", "folder") and not inputs:
        raise ManifestError(f"source {source!r} needs at least one input")


def build(args: argparse.Namespace) -> ManifestInfo:
    """Run the builder of ``args.source`` with the parsed flags; returns the written manifest info.

    Raises:
        ManifestError: wrong number of inputs, bad input data (duplicate keys, missing columns).
        FileNotFoundError: an input does not exist.
    """
    common = {"split": args.split, "on_duplicate": args.on_duplicate, "limit": args.limit}
    _check_inputs(args.source, args.inputs)
    if args.source == "emoji":
        from manifests.emoji import build_emoji_manifest

        vendors = tuple(v.strip() for v in args.vendors.split(",") if v.strip())
        return build_emoji_manifest(args.out, vendors=vendors, seed=args.seed, limit=args.limit)
    if args.source == "webdataset":
        from manifests.webdataset_source import build_webdataset_manifest

        return build_webdataset_manifest(
            args.inputs, args.out, long_captions=args.long_captions, short_captions=args.short_captions,
            caption_field=args.caption_field, json_caption_field=args.json_caption_field,
            workers=args.workers, **common,
        )
    if args.source == "parquet":
        from manifests.parquet_source import build_parquet_manifest

        return build_parquet_manifest(args.inputs, args.out, **_columns(args, "image", "text"), **common)
    if args.source == "csv":
        from manifests.csv_source import build_csv_manifest

        return build_csv_manifest(args.inputs, args.out, sep=args.sep, **_columns(args, "filepath", "title"),
                                  **common)
    from manifests.folder_source import build_folder_manifest

    return build_folder_manifest(args.inputs[0], args.out, captions_file=args.captions_file, **common)


def format_summary(info: ManifestInfo, out: str) -> str:
    """The coverage summary printed at the end: rows per split, then every coverage entry."""
    lines = [f"manifest ({info.source.get('name')}) written to {out}", "rows per split:"]
    lines += [f"  {split:<28} {n}" for split, n in info.counts.items()]
    lines.append("coverage:")
    lines += [f"  {reason:<28} {n}" for reason, n in info.coverage.items()] or ["  (nothing skipped)"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``flame manifest``: build, print the summary. Bad input (:class:`ManifestError`, a missing file) reaches
    :func:`pipeline.app.cli.main`, which prints it as one line and exits 2, like every subcommand."""
    info = build(args)
    print(format_summary(info, args.out))
    return 0
