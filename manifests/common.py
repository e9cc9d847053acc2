"""What every manifest source shares: caption and image checks, duplicate-key policy, counted outcomes.

Sources read their format and hand each sample to a :class:`ManifestBuilder` (``add``), with a skip
reason when the sample is unusable. The builder stages samples on disk, decides duplicate keys over
*every* sample the source yielded, joins extra captions by key, and writes the canonical manifest
through :class:`manifests.schema.ManifestWriter`.

Outcomes recorded in ``manifest.json`` ``coverage`` (every sample a source yields is counted once in
``samples_seen`` and ends either as a row or under exactly one ``skipped_*`` reason, so
``counts.total + sum(skipped_*) == samples_seen``):

==================================  ==========================================================================
``samples_seen``                    samples the source yielded (rows read, tar key copies, JSONL lines)
``skipped_undecodable_image``       image bytes PIL cannot fully decode (HTML saved as .jpg, truncated JPEG)
``skipped_image_too_large``         an image over Pillow's pixel limit (2 x ``PIL.Image.MAX_IMAGE_PIXELS``, the
                                    decompression-bomb guard); logged as a warning
``skipped_no_image``                no image (no image member, missing file, null image cell, no path)
``skipped_ambiguous_image``         one sample with several image members (``k.jpg`` and ``k.png``)
``skipped_no_caption``              every caption empty, whitespace-only or missing (after recaption joins)
``skipped_duplicate``               a copy of a key that occurs more than once (``--on-duplicate first|skip``)
``skipped_bad_line``                a JSONL line that is not a JSON object
``skipped_no_key``                  a row whose key column is null
``duplicate_keys``                  distinct keys that occurred more than once
``empty_caption_to_null``           kept rows where at least one empty/whitespace caption became null
``sample_without_<col>``            kept rows with no joined ``<col>`` (when a join file was given)
==================================  ==========================================================================

Source-specific counts (tar read errors, recaption entries without a sample, ...) are documented by the
source module. Captions are stored verbatim (quotes, ``:"``, 50k characters, surrounding whitespace are
kept; stage 1 cleans and truncates); only an empty or whitespace-only caption becomes null.

Duplicate policy (``on_duplicate``), applied to keys over all samples in source order, before any
other check (so "first" really is the first occurrence, even when that copy is the broken one):

* ``error`` (default): raise :class:`DuplicateKeyError` naming the key and its first two locations.
* ``first``: keep the first occurrence; the later copies count as ``skipped_duplicate``.
* ``skip``: drop every copy; all count as ``skipped_duplicate``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from manifests.images import ImageTooLargeError, UndecodableImageError, decode_image
from manifests.registry import register_options
from manifests.schema import (
    CAPTION_COLUMNS,
    LONG_CAPTION,
    RAW_CAPTION,
    SCHEMA,
    SHORT_CAPTION,
    ManifestError,
    ManifestInfo,
    ManifestWriter,
)
from pipeline.paths import local_dir

log = logging.getLogger(__name__)

ON_DUPLICATE = ("error", "first", "skip")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_FLAGS = {RAW_CAPTION: "--raw-column", SHORT_CAPTION: "--short-column", LONG_CAPTION: "--long-column"}
STAGED_COLUMNS = ("key", "image_path", "image_member", "image_bytes", *CAPTION_COLUMNS, "split", "lang")
_STAGE_SCHEMA = pa.schema(
    [SCHEMA.field(name) for name in STAGED_COLUMNS]
    + [
        pa.field("_seq", pa.int64()),
        pa.field("_location", pa.string()),
        pa.field("_skip", pa.string()),
        pa.field("_notes", pa.list_(pa.string())),
    ]
)
STAGING_DIR = ".staging"


class DuplicateKeyError(ManifestError):
    """A key occurs more than once under ``on_duplicate="error"``; the message names both locations."""


def caption_or_none(text: str | None) -> str | None:
    """The caption as stored: ``None`` for missing, empty or whitespace-only text, else ``text`` unchanged."""
    if text is None or not text.strip():
        return None
    return text


def caption_value(value: Any, where: str) -> str | None:
    """A caption cell as ``str | None``. Raises :class:`ManifestError` for other types (lists, numbers)."""
    if value is None or isinstance(value, str):
        return value
    raise ManifestError(f"{where}: caption must be a string or null, got {type(value).__name__}")


def check_columns(available: Sequence[str], wanted: Mapping[str, str | None], where: str) -> None:
    """Raise :class:`ManifestError` if a named column is absent.

    Args:
        available: the columns the input has.
        wanted: ``{flag: column name or None}``, e.g. ``{"--raw-column": "title"}``; ``None`` is not checked.
        where: the input, for the message.
    """
    missing = [f"{col!r} ({flag})" for flag, col in wanted.items() if col is not None and col not in available]
    if missing:
        raise ManifestError(f"{where}: no column {', '.join(missing)}; its columns are {list(available)}")


@register_options("parquet / csv", rank=30)
def add_column_options(group: argparse._ArgumentGroup) -> None:
    """The column flags of the table sources (parquet, csv): ``--image-column`` ... ``--key-column``."""
    group.add_argument("--image-column", help="image column (default: image for parquet, filepath for csv)")
    group.add_argument("--raw-column", help="raw caption column (default: text for parquet, title for csv)")
    group.add_argument("--short-column", help="short caption column")
    group.add_argument("--long-column", help="long caption column")
    group.add_argument("--key-column", help="key column (default: see the source's docs)")


def column_options(args: argparse.Namespace, image: str, raw: str) -> dict[str, str | None]:
    """The builder arguments of :func:`add_column_options`'s flags; ``image``/``raw`` are the source's defaults
    for ``--image-column``/``--raw-column``."""
    return {
        "image_column": args.image_column or image,
        "raw_column": args.raw_column or raw,
        "short_column": args.short_column,
        "long_column": args.long_column,
        "key_column": args.key_column,
    }


def decode_text(data: bytes) -> tuple[str, bool]:
    """Decode caption bytes as UTF-8; invalid bytes become U+FFFD. Returns ``(text, had_invalid_bytes)``."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def image_problem(data: bytes | None, name: str) -> str | None:
    """Skip reason for encoded image bytes: ``"no_image"``, ``"undecodable_image"``, ``"image_too_large"`` (over
    Pillow's decompression-bomb limit, logged as a warning), or ``None`` if fine.

    Decoding is :func:`manifests.images.decode_image` (verify + full load), the project's one decoder.
    """
    if data is None:
        return "no_image"
    try:
        decode_image(data, name)
    except ImageTooLargeError as exc:
        log.warning("%s", exc)
        return exc.reason
    except UndecodableImageError as exc:
        log.debug("%s", exc)
        return exc.reason
    return None


def file_image_problem(path: Path) -> str | None:
    """:func:`image_problem` for an image file; a missing file is ``"no_image"``."""
    if not path.is_file():
        log.debug("image file %s does not exist", path)
        return "no_image"
    return image_problem(path.read_bytes(), str(path))


def reference_path(path: str | Path, out_dir: str | Path) -> str:
    """How a manifest stores a file path: relative (POSIX) if the file lies under ``out_dir``, else absolute."""
    full = Path(path).resolve()
    try:
        return full.relative_to(Path(out_dir).resolve()).as_posix()
    except ValueError:
        return str(full)


class ManifestBuilder:
    """Collect a source's samples, resolve duplicate keys, join extra captions, write the manifest.

    Samples are staged as Parquet under ``out_dir/.staging`` (bounded memory); :meth:`finish` writes the
    manifest and removes the staging. An existing manifest in ``out_dir`` stays untouched until then. Use it
    as a context manager so that an error removes the staging too.

    Args:
        out_dir: the manifest directory.
        source: ``{"name": ..., "args": {...}}`` for ``manifest.json``.
        on_duplicate: ``"error" | "first" | "skip"`` (module docstring).
        limit: stop accepting samples after this many (``full`` turns true); ``None`` for no limit.
        rows_per_stage: staged rows per Parquet file.

    Raises:
        ValueError: unknown ``on_duplicate`` or a limit below 1.
    """

    def __init__(
        self,
        out_dir: str | Path,
        source: dict[str, Any],
        on_duplicate: str = "error",
        limit: int | None = None,
        rows_per_stage: int = 20_000,
    ):
        if on_duplicate not in ON_DUPLICATE:
            raise ManifestError(f"on_duplicate must be one of {ON_DUPLICATE}, got {on_duplicate!r}")
        if limit is not None and limit < 1:
            raise ManifestError(f"limit must be at least 1, got {limit}")
        self.out_dir = local_dir(out_dir, "manifest")
        self.source = source
        self.on_duplicate = on_duplicate
        self.limit = limit
        self.rows_per_stage = rows_per_stage
        self.seen = 0
        self.coverage: dict[str, int] = {}
        self._stage_dir = self.out_dir / STAGING_DIR
        if self._stage_dir.exists():
            shutil.rmtree(self._stage_dir)
        self._stage_dir.mkdir(parents=True)
        self._stage_parts: list[Path] = []
        self._buffer: list[dict[str, Any]] = []
        self._dropped: set[int] | None = None
        self._alive: set[str] = set()

    def __enter__(self) -> ManifestBuilder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._cleanup()

    @property
    def full(self) -> bool:
        """True once ``limit`` samples were accepted; sources stop reading then."""
        return self.limit is not None and self.seen >= self.limit

    def count(self, reason: str, n: int = 1) -> None:
        """Add ``n`` to ``coverage[reason]``."""
        self.coverage[reason] = self.coverage.get(reason, 0) + n

    def reject(self, reason: str) -> None:
        """Count a sample that has no usable key as seen and skipped (``skipped_<reason>``)."""
        self.seen += 1
        self.count(f"skipped_{reason}")

    def add(self, row: Mapping[str, Any], location: str, skip: str | None = None, notes: Iterable[str] = ()) -> None:
        """Stage one sample.

        Args:
            row: ``key`` (non-empty str), an image reference (``image_path``/``image_member``/``image_bytes``),
                captions, ``split``, ``lang``; other keys are ignored.
            location: where the sample came from, for duplicate errors (``"a.tar member k.jpg (#3)"``).
            skip: the skip reason if the sample is unusable (it still takes part in duplicate detection).
            notes: coverage counters to add if the sample becomes a row (e.g. ``"caption_non_utf8"``).

        Raises:
            ManifestError: empty key, or a call after :meth:`finish` started.
        """
        if self._dropped is not None:
            raise ManifestError("ManifestBuilder.add after duplicates were resolved")
        if not row.get("key"):
            raise ManifestError(f"{location}: sample without a key")
        staged = {name: row.get(name) for name in STAGED_COLUMNS}
        notes = list(notes)
        for name in CAPTION_COLUMNS:
            if staged[name] is not None and caption_or_none(staged[name]) is None:
                staged[name] = None
                if "empty_caption_to_null" not in notes:
                    notes.append("empty_caption_to_null")
        staged.update(_seq=self.seen, _location=location, _skip=skip, _notes=notes)
        self.seen += 1
        self._buffer.append(staged)
        if len(self._buffer) >= self.rows_per_stage:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        table = pa.Table.from_pylist(self._buffer, schema=_STAGE_SCHEMA)
        path = self._stage_dir / f"stage-{len(self._stage_parts):05d}.parquet"
        pq.write_table(table, path)
        self._stage_parts.append(path)
        self._buffer = []

    def candidate_keys(self) -> set[str]:
        """Keys that become rows if they have a caption: duplicates resolved, skipped samples excluded.

        Raises:
            DuplicateKeyError: under ``on_duplicate="error"``, for the first repeated key in source order.
        """
        self._resolve_duplicates()
        return self._alive

    def _resolve_duplicates(self) -> None:
        if self._dropped is not None:
            return
        self._flush()
        columns = ["key", "_seq", "_location", "_skip"]
        tables = [pq.read_table(p, columns=columns) for p in self._stage_parts]
        index = pa.concat_tables(tables) if tables else _STAGE_SCHEMA.empty_table().select(columns)
        counts = pc.value_counts(index["key"])
        dup_keys = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
        self._dropped = set()
        if len(dup_keys):
            dups = index.filter(pc.is_in(index["key"], value_set=dup_keys)).sort_by("_seq").to_pylist()
            if self.on_duplicate == "error":
                first_key = dups[0]["key"]
                where = [d["_location"] for d in dups if d["key"] == first_key][:2]
                raise DuplicateKeyError(
                    f"duplicate key {first_key!r} at {where[0]} and at {where[1]} "
                    f"({len(dup_keys)} duplicated key(s) in all); use --on-duplicate first|skip to resolve"
                )
            kept: set[str] = set()
            for d in dups:
                if self.on_duplicate == "first" and d["key"] not in kept:
                    kept.add(d["key"])
                else:
                    self._dropped.add(d["_seq"])
            self.count("duplicate_keys", len(dup_keys))
        alive = index.filter(pc.is_null(index["_skip"]))
        if self._dropped:
            alive = alive.filter(pc.invert(pc.is_in(alive["_seq"], value_set=pa.array(sorted(self._dropped)))))
        self._alive = set(alive["key"].to_pylist())

    def finish(self, joins: Mapping[str, Mapping[str, str | None]] | None = None) -> ManifestInfo:
        """Write the manifest and remove the staging; returns the ``manifest.json`` contents.

        Args:
            joins: ``{caption column: {key: caption}}`` filled into rows whose column is null (e.g. the
                FLAME long/short recaptions). Kept rows without a joined caption count as
                ``sample_without_<column>``.

        Raises:
            DuplicateKeyError: see :meth:`candidate_keys`.
        """
        self._resolve_duplicates()
        joins = dict(joins or {})
        writer = ManifestWriter(self.out_dir, self.source)
        with tqdm(total=self.seen, desc="write manifest", unit="sample", disable=None) as bar:
            for part in self._stage_parts:
                for batch in pq.ParquetFile(part).iter_batches(batch_size=2048):
                    for staged in batch.to_pylist():
                        self._write_one(writer, staged, joins)
                    bar.update(batch.num_rows)
        coverage = {"samples_seen": self.seen, **dict(sorted(self.coverage.items()))}
        writer.info.coverage = coverage
        info = writer.close()
        self._cleanup()
        return info

    def _write_one(self, writer: ManifestWriter, staged: dict[str, Any], joins: Mapping[str, Mapping]) -> None:
        if staged["_seq"] in self._dropped:
            self.count("skipped_duplicate")
            return
        if staged["_skip"]:
            self.count(f"skipped_{staged['_skip']}")
            return
        for column, table in joins.items():
            if staged[column] is None:
                staged[column] = caption_or_none(table.get(staged["key"]))
        if all(staged[c] is None for c in CAPTION_COLUMNS):
            self.count("skipped_no_caption")
            return
        for note in staged["_notes"]:
            self.count(note)
        for column in joins:
            if staged[column] is None:
                self.count(f"sample_without_{column}")
        writer.add({name: staged[name] for name in STAGED_COLUMNS})

    def _cleanup(self) -> None:
        shutil.rmtree(self._stage_dir, ignore_errors=True)
