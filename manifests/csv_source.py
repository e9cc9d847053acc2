"""CSV/TSV files in the open_clip layout (``filepath``, ``title`` columns) -> manifest.

* Separator: ``--sep`` (escapes such as ``\\t`` are understood); otherwise tab for ``.tsv`` files and
  sniffed among ``, \\t ; |`` from the first 64 KiB for other files (comma if sniffing fails).
* The first line is the header. Quoting follows the ``csv`` module's default (``"`` quotes a field, ``""``
  inside it is a literal quote), as pandas, which open_clip uses, does. Files are read as UTF-8.
* Column names by flags: ``--image-column`` (default ``filepath``), ``--raw-column`` (default ``title``),
  ``--short-column``, ``--long-column``, ``--key-column`` (default: the file path as written, so the same
  image listed twice is a duplicate key).
* Relative image paths are resolved against the CSV file's folder; rows reference the file (``image_path``,
  relative to the manifest folder if the image lies under it, else absolute).
* Image paths must lie inside the image root: ``--image-root`` (default: the CSV file's folder). A path outside
  it (absolute elsewhere, or ``..`` climbing out) is never opened and is counted as
  ``skipped_image_outside_root``; pass ``--image-root /`` to accept any path on purpose.

Outcomes (besides those in :mod:`manifests.common`): missing file or empty path cell ->
``skipped_no_image``; undecodable file -> ``skipped_undecodable_image``; a row with neither key nor path ->
``skipped_no_key``; a missing named column raises :class:`~manifests.schema.ManifestError`.
"""

from __future__ import annotations

import argparse
import codecs
import csv
import logging
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from manifests.common import (
    CAPTION_FLAGS,
    ManifestBuilder,
    check_columns,
    column_options,
    file_image_problem,
    reference_path,
)
from manifests.registry import common_options, register_options, register_source
from manifests.schema import CAPTION_COLUMNS, ManifestError, ManifestInfo
from pipeline.paths import confined_path

log = logging.getLogger(__name__)

SNIFF_BYTES = 64 * 1024
SNIFF_DELIMITERS = ",\t;|"


def detect_separator(path: Path, sep: str | None = None) -> str:
    """The field separator of ``path``: ``sep`` (with escapes decoded), tab for ``.tsv``, else sniffed.

    Raises:
        ValueError: ``sep`` is not exactly one character after decoding escapes.
    """
    if sep is not None:
        sep = codecs.decode(sep, "unicode_escape")
        if len(sep) != 1:
            raise ManifestError(f"--sep must be one character, got {sep!r}")
        return sep
    if path.suffix.lower() == ".tsv":
        return "\t"
    with open(path, encoding="utf-8", newline="") as f:
        sample = f.read(SNIFF_BYTES)
    try:
        return csv.Sniffer().sniff(sample, delimiters=SNIFF_DELIMITERS).delimiter
    except csv.Error:
        log.info("could not sniff the separator of %s; using ','", path)
        return ","


def build_csv_manifest(
    csv_paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    sep: str | None = None,
    image_column: str = "filepath",
    raw_column: str | None = "title",
    short_column: str | None = None,
    long_column: str | None = None,
    key_column: str | None = None,
    image_root: str | Path | None = None,
    split: str = "train",
    on_duplicate: str = "error",
    limit: int | None = None,
) -> ManifestInfo:
    """Build a manifest from open_clip style CSV/TSV files (module docstring).

    Args:
        csv_paths: the files, read in order.
        out_dir: the manifest directory.
        sep: field separator; ``None`` to detect (:func:`detect_separator`).
        image_column: the image path column.
        raw_column, short_column, long_column: caption columns (``None``: that caption is absent).
        key_column: the key column; ``None``: the image path as written.
        image_root: image paths must lie inside it (module docstring); ``None``: each CSV file's folder.
        split: the ``split`` of every row.
        on_duplicate: ``"error" | "first" | "skip"`` (:mod:`manifests.common`).
        limit: read at most this many rows.

    Raises:
        FileNotFoundError: a CSV file does not exist.
        ManifestError: a named column is missing from a header, or a file is not UTF-8.
        DuplicateKeyError: a repeated key under ``on_duplicate="error"``.
    """
    captions = dict(zip(CAPTION_COLUMNS, (raw_column, short_column, long_column), strict=True))
    args = {
        "inputs": [str(p) for p in csv_paths],
        "sep": sep,
        "image_column": image_column,
        "raw_column": raw_column,
        "short_column": short_column,
        "long_column": long_column,
        "key_column": key_column,
        "image_root": None if image_root is None else str(image_root),
        "split": split,
        "on_duplicate": on_duplicate,
        "limit": limit,
    }
    with ManifestBuilder(out_dir, {"name": "csv", "args": args}, on_duplicate, limit) as builder:
        for csv_path in map(Path, csv_paths):
            if not csv_path.is_file():
                raise FileNotFoundError(f"CSV file {csv_path} does not exist")
            try:
                root = Path(image_root) if image_root is not None else csv_path.parent
                _read_csv(csv_path, detect_separator(csv_path, sep), builder, image_column, captions, key_column,
                          split, Path(out_dir), root)
            except UnicodeDecodeError as exc:
                raise ManifestError(f"{csv_path} is not UTF-8 text ({exc})") from exc
            if builder.full:
                break
        return builder.finish()


def _read_csv(
    csv_path: Path,
    sep: str,
    builder: ManifestBuilder,
    image_column: str,
    captions: dict[str, str | None],
    key_column: str | None,
    split: str,
    out_dir: Path,
    root: Path,
) -> None:
    with open(csv_path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=sep)
        header = reader.fieldnames or []
        flags = {"--image-column": image_column, "--key-column": key_column}
        flags.update({CAPTION_FLAGS[c]: col for c, col in captions.items()})
        check_columns(header, flags, str(csv_path))
        for record in tqdm(reader, desc=f"read {csv_path.name}", unit="row", disable=None):
            if builder.full:
                return
            where = f"{csv_path} line {reader.line_num}"
            path = record.get(image_column) or ""
            key = record.get(key_column) if key_column else path
            if not key:
                builder.reject("no_key")
                continue
            row = {"key": key, "split": split}
            for column, source_column in captions.items():
                row[column] = record.get(source_column) if source_column else None
            full = None
            if path:  # relative to the CSV's folder, then confined to the image root
                full = confined_path(root, csv_path.parent.absolute() / path)
            if full is not None:
                skip = file_image_problem(full)
                row["image_path"] = reference_path(full, out_dir)
            elif path:
                skip = "image_outside_root"
            else:
                skip = "no_image"
            builder.add(row, where, skip=skip)


@register_options("parquet / csv", rank=40)  # after the column flags (manifests.common.add_column_options)
def _add_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--sep", help="csv field separator (default: tab for .tsv, else sniffed)")
    group.add_argument("--image-root", help="csv: image paths must lie inside this folder (default: the CSV's "
                       "folder; others are skipped and counted as skipped_image_outside_root)")


@register_source("csv", rank=40, inputs="CSV/TSV files (open_clip ``filepath``/``title``)")
def _build_from_args(args: argparse.Namespace) -> ManifestInfo:
    columns = column_options(args, "filepath", "title")
    return build_csv_manifest(args.inputs, args.out, sep=args.sep, image_root=args.image_root, **columns,
                              **common_options(args))
