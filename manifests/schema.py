"""The canonical manifest (SPEC §4): ``manifest.json`` plus a ``data/`` directory of Parquet parts.

One row per sample, as this package's readers return it (:data:`SCHEMA`)::

    key            string   unique sample id (never null)
    image_path     string   a file path, or the tar shard that holds the image when ``image_member`` is set;
                            relative paths are relative to the manifest directory
    image_member   string   member name inside the tar ``image_path`` (null for plain files / bytes)
    image_bytes    binary   encoded image bytes (null when the image is referenced by path)
    raw_caption    string   web alt-text / original caption (nullable)
    short_caption  string   short recaption (nullable)
    long_caption   string   long recaption (nullable)
    split          string   "train" | "val" | "test" (or a source's own split names)
    lang           string   language of the captions, BCP-47 (nullable)
    labels         list<struct<key: string, value: string>>  label fields, e.g. [{"key": "category",
                            "value": "Smileys & Emotion"}] (nullable; :func:`pairs_to_dict` makes a dict)
    names          list<struct<key: string, value: string>>  per-language names for multilingual eval (nullable)

On disk (schema version 2, :data:`STORED_SCHEMA`) ``image_path`` and ``image_bytes`` are the two fields of one
column ``image: struct<bytes: binary, path: string>``, the layout Hugging Face ``datasets`` decodes as an
``Image`` feature, and each part's Arrow schema carries the ``datasets`` features (``huggingface`` metadata), so::

    datasets.load_dataset("parquet", data_files="DIR/data/*.parquet")["train"][0]["image"]   # a PIL image

decodes images stored as bytes or as plain file paths (absolute, or relative when run in ``DIR``); a webdataset
manifest's rows reference tar members (``image.path`` = the shard, ``image_member`` = the member) and declare
no ``Image`` feature. ``labels``/``names`` are lists of key/value structs on disk too (``datasets`` has no map
type). Manifests of schema version 1 (``image_path``/``image_bytes`` columns, ``map<string,string>``
labels) are still read, and returned in the same :data:`SCHEMA`.

``manifest.json`` holds ``schema_version``, ``source`` (name + arguments), ``counts`` (rows per split) and
``coverage`` (the counted reasons rows were skipped, e.g. ``{"undecodable_image": 2}``).

The parts are plain Parquet: ``pyarrow.parquet.read_table("DIR/data")`` reads them without this package.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.atomic import atomic_file, atomic_write_bytes
from pipeline.cache.lookup import key_hashes
from pipeline.errors import FlameError
from pipeline.paths import local_dir

SCHEMA_VERSION = 2
MANIFEST_JSON = "manifest.json"
DATA_DIR = "data"
RAW_CAPTION, SHORT_CAPTION, LONG_CAPTION = "raw_caption", "short_caption", "long_caption"  # the one definition
CAPTION_COLUMNS = (RAW_CAPTION, SHORT_CAPTION, LONG_CAPTION)
PAIRS = pa.list_(pa.struct([pa.field("key", pa.string()), pa.field("value", pa.string())]))
IMAGE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])  # datasets' Image storage
IMAGE_COLUMNS = ("image_path", "image_bytes")  # stored together as the struct column ``image``

SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("image_path", pa.string()),
        pa.field("image_member", pa.string()),
        pa.field("image_bytes", pa.binary()),
        pa.field("raw_caption", pa.string()),
        pa.field("short_caption", pa.string()),
        pa.field("long_caption", pa.string()),
        pa.field("split", pa.string()),
        pa.field("lang", pa.string()),
        pa.field("labels", PAIRS),
        pa.field("names", PAIRS),
    ]
)


def _hf_features(image: bool) -> bytes:
    """The ``huggingface`` schema metadata by which ``datasets`` restores the features of a part."""
    def value(dtype: str) -> dict[str, str]:
        return {"dtype": dtype, "_type": "Value"}

    pairs = {"feature": {"key": value("string"), "value": value("string")}, "_type": "List"}
    features = {"key": value("string"),
                "image": {"_type": "Image"} if image else {"bytes": value("binary"), "path": value("string")},
                "image_member": value("string"), **{c: value("string") for c in CAPTION_COLUMNS},
                "split": value("string"), "lang": value("string"), "labels": pairs, "names": pairs}
    return json.dumps({"info": {"features": features}}).encode()


def stored_schema(image_feature: bool = True) -> pa.Schema:
    """The on-disk schema of a part (schema version 2): :data:`SCHEMA` with ``image_path``/``image_bytes`` as
    the struct column ``image`` (``{bytes, path}``) in second place, and the ``datasets`` features as metadata
    (``image_feature``: declare ``image`` a ``datasets.Image``; False for parts whose images are tar members)."""
    fields = [SCHEMA.field("key"), pa.field("image", IMAGE)]
    fields += [f for f in SCHEMA if f.name not in ("key", *IMAGE_COLUMNS)]
    return pa.schema(fields, metadata={b"huggingface": _hf_features(image_feature)})


STORED_SCHEMA = stored_schema()


def to_stored(table: pa.Table, image_feature: bool | None = None) -> pa.Table:
    """A :data:`SCHEMA` table as it is written to a part (:func:`stored_schema`).

    Args:
        image_feature: declare the ``datasets`` ``Image`` feature; ``None``: unless a row has an ``image_member``.
    """
    if image_feature is None:
        image_feature = table.column("image_member").null_count == table.num_rows
    path, data = table.column("image_path").combine_chunks(), table.column("image_bytes").combine_chunks()
    image = pa.StructArray.from_arrays([data, path], fields=list(IMAGE))
    schema = stored_schema(image_feature)
    columns = {"image": image, **{n: table.column(n) for n in table.column_names if n not in IMAGE_COLUMNS}}
    return pa.table([columns[f.name] for f in schema], schema=schema)


def _stored_columns(columns: list[str] | None, names: list[str]) -> list[str] | None:
    """The file columns that hold the :data:`SCHEMA` ``columns`` in a part whose columns are ``names``."""
    if columns is None or "image" not in names:
        return columns
    out = [c for c in columns if c not in IMAGE_COLUMNS]
    if any(c in IMAGE_COLUMNS for c in columns):
        out.append("image")
    return out


def to_logical(data: pa.Table | pa.RecordBatch, columns: list[str] | None = None) -> pa.Table:
    """A part's table (schema version 1 or 2) as :data:`SCHEMA` (``columns`` of it, in that order): the ``image``
    struct split into ``image_path``/``image_bytes``, ``map<string,string>`` labels cast to key/value lists."""
    table = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
    columns = list(SCHEMA.names) if columns is None else columns
    out = []
    for name in columns:
        if name in IMAGE_COLUMNS and "image" in table.column_names:
            image = table.column("image")
            out.append(pc.struct_field(image, "path" if name == "image_path" else "bytes"))
        elif name in table.column_names:
            out.append(table.column(name).cast(SCHEMA.field(name).type))
        else:
            out.append(pa.nulls(table.num_rows, SCHEMA.field(name).type))
    return pa.table(out, schema=pa.schema([SCHEMA.field(c) for c in columns]))


def _read_part(path: Path, columns: list[str] | None) -> pa.Table:
    """One part as :data:`SCHEMA` (``columns`` of it)."""
    names = pq.ParquetFile(path).schema_arrow.names
    return to_logical(pq.read_table(path, columns=_stored_columns(columns, names)), columns)


def iter_part(path: str | Path, columns: list[str] | None, batch_rows: int = 65_536) -> Iterator[pa.Table]:
    """One part file (``DIR/data/part-NNNNN.parquet``, schema version 1 or 2) as :data:`SCHEMA` tables
    (``columns`` of it) of up to ``batch_rows`` rows: how code that streams parts by itself reads them."""
    part = pq.ParquetFile(path)
    for batch in part.iter_batches(batch_size=batch_rows, columns=_stored_columns(columns, part.schema_arrow.names)):
        yield to_logical(batch, columns)


def pairs_to_dict(value: Any) -> dict[str, str] | None:
    """A ``labels``/``names`` cell as read (``[{"key": k, "value": v}, ...]``, or ``[(k, v), ...]`` from a
    ``map`` column) as a ``dict``; ``None`` stays ``None``."""
    if value is None:
        return None
    return {p["key"]: p["value"] for p in value} if all(isinstance(p, dict) for p in value) else dict(value)


class ManifestError(FlameError, ValueError):
    """A manifest is missing, malformed, or of an unsupported schema version."""


@dataclass
class ManifestInfo:
    """The contents of ``manifest.json``.

    Attributes:
        source: ``{"name": "emoji" | "webdataset" | ..., "args": {...}}``, how the manifest was built.
        counts: number of rows per split, e.g. ``{"train": 6000, "test": 800}``; ``"total"`` is added on write.
        coverage: counted outcomes of bad or unmatched input, e.g. ``{"skipped_undecodable_image": 2}``.
        parts: Parquet part paths relative to the manifest directory (``data/part-00000.parquet``), in row order.
        schema_version: :data:`SCHEMA_VERSION` of the writer.
    """

    source: dict[str, Any]
    counts: dict[str, int] = field(default_factory=dict)
    coverage: dict[str, Any] = field(default_factory=dict)
    parts: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(
            {
                "schema_version": self.schema_version,
                "source": self.source,
                "counts": self.counts,
                "coverage": self.coverage,
                "parts": self.parts,
            },
            indent=2,
            ensure_ascii=False,
            sort_keys=False,
        )


class ManifestWriter:
    """Write rows into Parquet parts under ``out_dir``; ``close()`` writes ``manifest.json`` last.

    Rows are dicts with the :data:`SCHEMA` column names; missing columns are null. ``labels``/``names`` are
    plain ``dict[str, str]``. Keys must be unique across the manifest (sources decide duplicates before
    writing): a key repeated inside the part being filled raises :class:`ManifestError` at once, one repeated
    across parts when :meth:`close` checks every key's 64-bit hash (8 bytes per row held, the key strings of
    equal hashes compared exactly). A manifest without ``manifest.json`` is incomplete and
    :func:`read_manifest` refuses it.

    Args:
        out_dir: the manifest directory (created; an existing ``manifest.json`` there is replaced on close).
        source: see :class:`ManifestInfo`.
        rows_per_part: rows per Parquet part file.
    """

    def __init__(self, out_dir: str | Path, source: dict[str, Any], rows_per_part: int = 50_000):
        self.out_dir = local_dir(out_dir, "manifest")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / MANIFEST_JSON).unlink(missing_ok=True)
        (self.out_dir / DATA_DIR).mkdir(exist_ok=True)
        for old in (self.out_dir / DATA_DIR).glob("part-*.parquet"):
            old.unlink()
        self.info = ManifestInfo(source=source)
        self.rows_per_part = rows_per_part
        self._buffer: list[dict[str, Any]] = []
        self._part_keys: set[str] = set()
        self._hashes: list[np.ndarray] = []
        self.n_rows = 0

    def add(self, row: dict[str, Any]) -> None:
        """Append one sample row. Raises :class:`ManifestError` on a null or repeated key."""
        key = row.get("key")
        if not key:
            raise ManifestError("manifest row without a key")
        if key in self._part_keys:
            raise ManifestError(f"duplicate key {key!r} written to the manifest")
        self._part_keys.add(key)
        self.n_rows += 1
        split = row.get("split") or "train"
        self.info.counts[split] = self.info.counts.get(split, 0) + 1
        self._buffer.append(row)
        if len(self._buffer) >= self.rows_per_part:
            self._flush()

    def count(self, reason: str, n: int = 1) -> None:
        """Count one outcome of bad or unmatched input under ``coverage[reason]``."""
        self.info.coverage[reason] = int(self.info.coverage.get(reason, 0)) + n

    def _flush(self) -> None:
        if not self._buffer:
            return
        cols = {name: [_cell(r.get(name), name) for r in self._buffer] for name in SCHEMA.names}
        table = to_stored(pa.table(cols, schema=SCHEMA))
        name = f"{DATA_DIR}/part-{len(self.info.parts):05d}.parquet"
        try:
            with atomic_file(self.out_dir / name, fsync=False) as tmp:  # only manifest.json is fsynced
                pq.write_table(table, tmp, compression="zstd")
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise ManifestError(
                    f"no space left on the device writing {self.out_dir / name}: the manifest is unfinished "
                    f"(no {MANIFEST_JSON}); free space and run the same command again"
                ) from exc
            raise
        self.info.parts.append(name)
        self._hashes.append(key_hashes(table.column("key")))
        self._buffer = []
        self._part_keys = set()

    def close(self) -> ManifestInfo:
        """Flush the last part and write ``manifest.json`` (atomically, last). Returns the info written."""
        self._flush()
        self._check_unique_keys()
        self.info.counts["total"] = self.n_rows
        atomic_write_bytes(self.out_dir / MANIFEST_JSON, self.info.to_json().encode("utf-8"))
        return self.info

    def _check_unique_keys(self) -> None:
        hashes = np.concatenate(self._hashes) if self._hashes else np.zeros(0, np.uint64)
        self._hashes = []
        ordered = np.sort(hashes)
        suspects = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
        if len(suspects) == 0:
            return
        seen: set[str] = set()
        for part in self.info.parts:
            keys = pq.read_table(self.out_dir / part, columns=["key"]).column("key")
            for key in pc.filter(keys, pa.array(np.isin(key_hashes(keys), suspects))).to_pylist():
                if key in seen:
                    raise ManifestError(f"duplicate key {key!r} written to the manifest")
                seen.add(key)


def _cell(value: Any, name: str) -> Any:
    if name in ("labels", "names") and isinstance(value, dict):
        return [{"key": k, "value": v} for k, v in value.items()]
    return value


def read_manifest_info(manifest_dir: str | Path) -> ManifestInfo:
    """Read ``manifest.json``. Raises :class:`ManifestError` if absent (an unfinished build) or too new."""
    path = local_dir(manifest_dir, "manifest") / MANIFEST_JSON
    if not path.exists():
        raise ManifestError(f"{manifest_dir} is not a finished manifest (no {MANIFEST_JSON})")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("schema_version", 0) > SCHEMA_VERSION:
        raise ManifestError(
            f"manifest schema version {data['schema_version']} is newer than this package's {SCHEMA_VERSION}"
        )
    return ManifestInfo(**data)


def read_manifest(
    manifest_dir: str | Path, columns: list[str] | None = None, split: str | None = None
) -> pa.Table:
    """Read a manifest as one ``pyarrow.Table`` in row order (parts in order).

    Args:
        manifest_dir: directory written by :class:`ManifestWriter`.
        columns: subset of :data:`SCHEMA` names (``key`` is always included).
        split: keep only rows of this split.

    Raises:
        ManifestError: unfinished manifest, missing part file, or unknown column.
    """
    info = read_manifest_info(manifest_dir)
    if columns is not None:
        unknown = set(columns) - set(SCHEMA.names)
        if unknown:
            raise ManifestError(f"unknown manifest columns {sorted(unknown)}")
        columns = ["key"] + [c for c in columns if c != "key"]
        if split is not None and "split" not in columns:
            columns.append("split")
    tables = []
    for part in info.parts:
        path = Path(manifest_dir) / part
        if not path.exists():
            raise ManifestError(f"manifest part {path} is missing")
        tables.append(_read_part(path, columns))
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table().select(columns or SCHEMA.names)
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    return table


def iter_batches(
    manifest_dir: str | Path, columns: list[str], batch_rows: int = 65_536
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Stream a manifest's ``columns`` in row order as ``(position of the batch's first row, batch)``.

    Positions count every row of the manifest (parts in order, before any split filter), so they address rows
    for :class:`RowFetcher`. Memory: one batch of ``batch_rows`` rows.

    Raises:
        ManifestError: unfinished manifest, missing part file, or unknown column.
    """
    unknown = set(columns) - set(SCHEMA.names)
    if unknown:
        raise ManifestError(f"unknown manifest columns {sorted(unknown)}")
    start = 0
    for path in _part_paths(manifest_dir):
        for table in iter_part(path, columns, batch_rows):
            batch = table.combine_chunks().to_batches()[0] if table.num_rows else None
            if batch is not None:
                yield start, batch
                start += batch.num_rows


class RowFetcher:
    """Read manifest rows by position (as counted by :func:`iter_batches`), part by part.

    Positions asked for in increasing order read each part once: the last part read is kept (one part's
    ``columns``, e.g. ~50 MB of captions for a 50,000-row part).

    Args:
        manifest_dir: a finished manifest.
        columns: the columns to return.

    Raises:
        ManifestError: unfinished manifest, missing part, or a position past the last row.
    """

    def __init__(self, manifest_dir: str | Path, columns: list[str]):
        self.paths = _part_paths(manifest_dir)
        self.columns = columns
        counts = [pq.ParquetFile(p).metadata.num_rows for p in self.paths]
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._part: tuple[int, pa.Table] | None = None

    def take(self, positions: np.ndarray) -> pa.Table:
        """Rows at ``positions`` (``int64 [B]``, any order), in that order."""
        positions = np.asarray(positions, np.int64)
        if len(positions) and (positions.min() < 0 or positions.max() >= self.offsets[-1]):
            raise ManifestError(f"manifest position outside [0, {int(self.offsets[-1])}): was the manifest rewritten?")
        part = np.searchsorted(self.offsets, positions, side="right") - 1
        pieces, where = [], []
        for p in np.unique(part):
            if self._part is None or self._part[0] != p:
                self._part = (int(p), _read_part(self.paths[p], self.columns))
            sel = np.flatnonzero(part == p)
            pieces.append(self._part[1].take(pa.array(positions[sel] - self.offsets[p])))
            where.append(sel)
        if not pieces:
            return SCHEMA.empty_table().select(self.columns)
        table = pa.concat_tables(pieces)
        inverse = np.empty(len(positions), np.int64)
        inverse[np.concatenate(where)] = np.arange(len(positions))
        return table.take(pa.array(inverse))


def _part_paths(manifest_dir: str | Path) -> list[Path]:
    info = read_manifest_info(manifest_dir)
    paths = [Path(manifest_dir) / part for part in info.parts]
    for path in paths:
        if not path.exists():
            raise ManifestError(f"manifest part {path} is missing")
    return paths


def iter_rows(manifest_dir: str | Path, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Yield manifest rows as dicts (``labels``/``names`` as ``dict``), part by part, in row order."""
    for path in _part_paths(manifest_dir):
        for table in iter_part(path, columns, 65_536):
            for row in table.to_pylist():
                for name in ("labels", "names"):
                    if name in row:
                        row[name] = pairs_to_dict(row[name])
                yield row
