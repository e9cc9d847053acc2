"""Parquet files or a local Hugging Face ``datasets`` folder -> manifest.

Inputs, each read in order:

* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (it holds
  ``dataset_info.json`` or ``dataset_dict.json``): loaded with ``datasets.load_from_disk``; a
  ``DatasetDict``'s split names become the rows' ``split``;
* any other folder: every ``*.parquet`` under it (sorted), e.g. a hub dataset's ``data/`` files;
* a Parquet file.

The image column (``--image-column``, default ``image``) is the ``datasets`` Image layout, a struct
``{bytes, path}``; a plain binary column (bytes) or string column (path) works too. Bytes are decoded to
check them and stored inline (``image_bytes``); a path alone is resolved against the folder of the data
file (the dataset folder for ``save_to_disk`` output) and stored as ``image_path``. Caption columns are
named by flags (``--raw-column`` default ``text``, ``--short-column``, ``--long-column``). Keys come from
``--key-column`` (default: a ``key`` or ``__key__`` column if there is one, else ``<file stem or
split>-<row index, 8 digits>``).

Outcomes (besides those in :mod:`manifests.common`): undecodable bytes -> ``skipped_undecodable_image``;
null image / missing path -> ``skipped_no_image``; null key -> ``skipped_no_key``; a missing column or a
non-string caption raises :class:`~manifests.schema.ManifestError`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from manifests.common import (
    CAPTION_FLAGS,
    ManifestBuilder,
    caption_value,
    check_columns,
    column_options,
    file_image_problem,
    image_problem,
    reference_path,
)
from manifests.registry import common_options, register_source
from manifests.schema import CAPTION_COLUMNS, ManifestError, ManifestInfo

HF_MARKERS = ("dataset_info.json", "dataset_dict.json")
DEFAULT_KEY_COLUMNS = ("key", "__key__")
BATCH_ROWS = 1024


@dataclass
class _Table:
    """One readable table: a Parquet file or one split of a saved ``datasets`` folder."""

    label: str
    split: str | None
    base_dir: Path
    batches: Iterator[pa.Table | pa.RecordBatch]


def _tables(inputs: Sequence[str | Path]) -> Iterator[_Table]:
    for item in inputs:
        path = Path(item)
        if path.is_dir() and any((path / m).exists() for m in HF_MARKERS):
            yield from _hf_tables(path)
        elif path.is_dir():
            files = sorted(path.rglob("*.parquet"))
            if not files:
                raise FileNotFoundError(f"no .parquet files under {path}")
            for f in files:
                yield _Table(f.relative_to(path).with_suffix("").as_posix(), None, f.parent, _parquet_batches(f))
        elif path.is_file():
            yield _Table(path.stem, None, path.parent, _parquet_batches(path))
        else:
            raise FileNotFoundError(f"parquet input {path} does not exist")


def _parquet_batches(path: Path) -> Iterator[pa.RecordBatch]:
    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowInvalid as e:
        raise ManifestError(f"{path} is not a readable Parquet file ({e})") from None
    yield from parquet.iter_batches(batch_size=BATCH_ROWS)


def _hf_tables(path: Path) -> Iterator[_Table]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for name, ds in splits:
        ds = ds.with_format("arrow")
        yield _Table(name or path.name, name, path, ds.iter(batch_size=BATCH_ROWS))


def _image_fields(cell: Any) -> tuple[bytes | None, str | None]:
    if isinstance(cell, dict):
        return cell.get("bytes"), cell.get("path")
    if isinstance(cell, bytes):
        return cell, None
    if isinstance(cell, str):
        return None, cell
    return None, None


def build_parquet_manifest(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    image_column: str = "image",
    raw_column: str | None = "text",
    short_column: str | None = None,
    long_column: str | None = None,
    key_column: str | None = None,
    split: str = "train",
    on_duplicate: str = "error",
    limit: int | None = None,
) -> ManifestInfo:
    """Build a manifest from Parquet files or saved ``datasets`` folders (module docstring).

    Args:
        inputs: Parquet files, folders of Parquet files, or ``save_to_disk`` folders, read in order.
        out_dir: the manifest directory.
        image_column: the image column (struct ``{bytes, path}``, binary, or string path).
        raw_column, short_column, long_column: caption columns (``None``: that caption is absent).
        key_column: the key column; default: ``key``/``__key__`` if present, else generated.
        split: ``split`` of rows from inputs without split names.
        on_duplicate: ``"error" | "first" | "skip"`` (:mod:`manifests.common`).
        limit: read at most this many rows.

    Raises:
        FileNotFoundError: an input does not exist.
        ManifestError: a named column is missing or a caption is not a string.
        DuplicateKeyError: a repeated key under ``on_duplicate="error"``.
    """
    captions = dict(zip(CAPTION_COLUMNS, (raw_column, short_column, long_column), strict=True))
    args = {
        "inputs": [str(i) for i in inputs],
        "image_column": image_column,
        "raw_column": raw_column,
        "short_column": short_column,
        "long_column": long_column,
        "key_column": key_column,
        "split": split,
        "on_duplicate": on_duplicate,
        "limit": limit,
    }
    with ManifestBuilder(out_dir, {"name": "parquet", "args": args}, on_duplicate, limit) as builder:
        with tqdm(desc="read parquet", unit="row", disable=None) as bar:
            for table in _tables(inputs):
                _read_table(table, builder, image_column, captions, key_column, split, Path(out_dir), bar)
                if builder.full:
                    break
        return builder.finish()


def _read_table(
    table: _Table,
    builder: ManifestBuilder,
    image_column: str,
    captions: dict[str, str | None],
    key_column: str | None,
    default_split: str,
    out_dir: Path,
    bar: tqdm,
) -> None:
    row_index = 0
    key_col = key_column
    for batch in table.batches:
        names = batch.schema.names
        if row_index == 0:
            flags = {"--image-column": image_column, "--key-column": key_column}
            flags.update({CAPTION_FLAGS[c]: col for c, col in captions.items()})
            check_columns(names, flags, table.label)
            if key_col is None:
                key_col = next((c for c in DEFAULT_KEY_COLUMNS if c in names), None)
        for record in batch.to_pylist():
            if builder.full:
                return
            where = f"{table.label} row {row_index}"
            key = record[key_col] if key_col else f"{table.label}-{row_index:08d}"
            row_index += 1
            bar.update(1)
            if key is None:
                builder.reject("no_key")
                continue
            row = {"key": str(key), "split": table.split or default_split}
            for column, source_column in captions.items():
                row[column] = caption_value(record[source_column], where) if source_column else None
            data, path = _image_fields(record[image_column])
            if data is not None:
                skip = image_problem(data, where)
                row["image_bytes"] = data
            elif path:
                full = Path(path) if Path(path).is_absolute() else table.base_dir / path
                skip = file_image_problem(full)
                row["image_path"] = reference_path(full, out_dir)
            else:
                skip = "no_image"
            builder.add(row, where, skip=skip)


@register_source("parquet", rank=30,
                 inputs="Parquet files, folders of them, or ``datasets`` ``save_to_disk`` folders")
def _build_from_args(args: argparse.Namespace) -> ManifestInfo:
    return build_parquet_manifest(args.inputs, args.out, **column_options(args, "image", "text"),
                                  **common_options(args))
