"""The recaption store: FLAME recaption files in on-disk key-digest buckets, joined with the samples.

Step 2 (:func:`stream_recaptions`) streams one recaption file (a JSON list, or JSON lines, of
``{"__key__": ..., "<caption field>": ...}``) once with ijson into ``P`` Parquet bucket files by key digest
(``P`` = :func:`recaption_buckets`). Step 4 (:func:`join_recaptions`) matches, per bucket, the bucket's key
digests with the usable samples whose digest falls in the bucket, and writes the captions of the matches
sorted by sample row; :class:`SortedRuns` merges those outputs back into sample order for step 5.

Memory does not grow with the number or length of the recaptions: a reader buffers
:data:`_WRITE_BUFFER_BYTES`; a join holds one bucket's digests (24 bytes per entry) and the captions it
matched (at most about :data:`RECAPTION_BUCKET_BYTES` of text); a merge holds one row group of
:data:`_MERGE_BATCH_ROWS` rows per bucket.
"""

from __future__ import annotations

import codecs
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ijson
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from manifests.common import DuplicateKeyError, caption_or_none
from manifests.schema import LONG_CAPTION, SHORT_CAPTION, ManifestError
from manifests.wds.digests import key_digests

log = logging.getLogger("manifests.webdataset_source")

RECAPTION_COLUMNS = (LONG_CAPTION, SHORT_CAPTION)
"""The manifest columns a recaption file can fill (``--long-captions``, ``--short-captions``)."""
RECAPTION_BUCKET_BYTES = 32 << 20
"""Recaption JSON bytes per join bucket: bounds the captions one join step holds."""
MAX_RECAPTION_BUCKETS = 256
_WRITE_BUFFER_BYTES = 16 << 20  # recaption rows buffered before they are written to their buckets
_READ_BATCH_ROWS = 8192  # recaption entries converted to Arrow at a time
_MERGE_BATCH_ROWS = 512  # rows per row group of a bucket's join output; the merge holds one per bucket
_FIELD_NAMES_SHOWN = 20
_FIELD_WARNING_AFTER = 10_000

BUCKET_SCHEMA = pa.schema(
    [
        pa.field("hi", pa.uint64()),
        pa.field("lo", pa.uint64()),
        pa.field("seq", pa.int64()),
        pa.field("key", pa.string()),
        pa.field("caption", pa.string()),
    ]
)
"""A bucket file's rows: key digest (two halves), position of the entry in the file, key, caption."""
JOINED_SCHEMA = pa.schema(
    [pa.field("row", pa.int64()), pa.field("key", pa.string()), pa.field("caption", pa.string())]
)
"""A join output's rows: global sample row, key, caption; sorted by ``row``."""


def bucket_name(bucket: int) -> str:
    """File name of bucket number ``bucket`` (a store bucket or its join output): ``bucket-XXXXX.parquet``."""
    return f"bucket-{bucket:05d}.parquet"


def recaption_buckets(path: str | Path) -> int:
    """Number of join buckets for a recaption file: its size / :data:`RECAPTION_BUCKET_BYTES`, in [1, 256]."""
    size = Path(path).stat().st_size
    return min(MAX_RECAPTION_BUCKETS, max(1, math.ceil(size / RECAPTION_BUCKET_BYTES)))


# ---------------------------------------------------------------- step 2: one recaption file


@dataclass(frozen=True)
class RecaptionTask:
    """Step 2 for one recaption file: ``path``'s ``field_name`` captions for manifest column ``column``,
    into ``buckets`` bucket files under the folder ``out``; ``progress`` shows a progress bar."""

    path: str
    field_name: str
    column: str
    buckets: int
    out: str
    progress: bool


@dataclass
class RecaptionResult:
    """Counts of step 2: entries read, and entries dropped as unusable (``<col>_bad_entry``)."""

    entries: int
    bad_entries: int


def _json_entries(f: Any, path: str) -> Iterator[Any]:
    """The entries of a JSON list or of JSON lines (one value per line); a UTF-8 BOM is skipped."""
    start = len(codecs.BOM_UTF8) if f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8 else 0
    f.seek(start)
    first = b""
    while not first:
        chunk = f.read(1 << 16)
        if not chunk:
            return
        first = chunk.lstrip()[:1]
    f.seek(start)
    if first == b"[":
        yield from ijson.items(f, "item")
    elif first == b"{":
        yield from ijson.items(f, "", multiple_values=True)
    else:
        found = first.decode(errors="replace")
        raise ManifestError(f"{path}: expected a JSON list of objects or JSON lines, found {found!r}")


class _BucketWriter:
    """Rows appended to one Parquet file per bucket (``bucket-XXXXX.parquet``), in arrival order.

    Rows are buffered up to :data:`_WRITE_BUFFER_BYTES` in all, then each bucket's share is written as a row
    group, so memory does not depend on the number of buckets or rows.
    """

    def __init__(self, folder: Path, schema: pa.Schema):
        self.folder = folder
        self.schema = schema
        self._writers: dict[int, pq.ParquetWriter] = {}
        self._pending: list[tuple[np.ndarray, pa.RecordBatch]] = []
        self._bytes = 0
        folder.mkdir(parents=True)

    def write(self, buckets: np.ndarray, batch: pa.RecordBatch) -> None:
        self._pending.append((buckets, batch))
        self._bytes += batch.nbytes
        if self._bytes >= _WRITE_BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        buckets = np.concatenate([b for b, _ in self._pending])
        order = np.argsort(buckets, kind="stable")
        table = pa.Table.from_batches([t for _, t in self._pending], schema=self.schema).take(order)
        self._pending, self._bytes = [], 0
        buckets = buckets[order]
        present = np.unique(buckets)
        for bucket, lo, hi in zip(present, np.searchsorted(buckets, present),
                                  np.searchsorted(buckets, present, side="right"), strict=True):
            bucket = int(bucket)
            if bucket not in self._writers:
                self._writers[bucket] = pq.ParquetWriter(self.folder / bucket_name(bucket), self.schema)
            self._writers[bucket].write_table(table.slice(lo, hi - lo))

    def close(self) -> None:
        self.flush()
        for writer in self._writers.values():
            writer.close()


class _FieldCheck:
    """Whether a file's entries have the caption field; the fields they have instead, for the error."""

    def __init__(self, task: RecaptionTask):
        self.task = task
        self.with_field = 0
        self.fields: set[str] = set()

    def see(self, entries: int, entry: Any) -> tuple[Any, Any]:
        """Note entry number ``entries`` (1-based); returns its ``(key, caption)`` (None where absent)."""
        key = value = None
        if isinstance(entry, dict):
            if self.task.field_name in entry:
                self.with_field += 1
            elif not self.with_field and len(self.fields) < _FIELD_NAMES_SHOWN:
                self.fields.update(list(entry)[: _FIELD_NAMES_SHOWN - len(self.fields)])
            key, value = entry.get("__key__"), entry.get(self.task.field_name)
        if entries == _FIELD_WARNING_AFTER and not self.with_field:
            log.warning("%s: none of the first %d entries has the caption field %r (fields: %s)",
                        self.task.path, entries, self.task.field_name, sorted(self.fields))
        return key, value

    def finish(self, entries: int) -> None:
        """Warn about an empty file. Raises :class:`ManifestError` if no entry had the caption field."""
        if not entries:
            log.warning("%s has no entries; expected [{\"__key__\": ..., %r: ...}]",
                        self.task.path, self.task.field_name)
        elif not self.with_field:
            raise ManifestError(
                f"{self.task.path}: no entry has the caption field {self.task.field_name!r} "
                f"(--caption-field); the entries have the fields {sorted(self.fields)}"
            )


def stream_recaptions(task: RecaptionTask) -> RecaptionResult:
    """Step 2: stream a recaption file once into ``task.out/bucket-XXXXX.parquet`` (bucket = digest % P).

    Each usable entry becomes a row ``(hi, lo, seq, key, caption)`` (:data:`BUCKET_SCHEMA`): the key digest,
    the entry's position in the file, the key, and the caption (null if empty/whitespace). Each bucket file
    holds its rows in file order. Unusable entries are counted.

    Raises:
        ManifestError: the file is not valid JSON, is neither a JSON list nor JSON lines, or no entry has
            the caption field (the message lists the fields the entries have).
    """
    entries = bad = 0
    check = _FieldCheck(task)
    keys: list[str] = []
    captions: list[str | None] = []
    seqs: list[int] = []
    writer = _BucketWriter(Path(task.out), BUCKET_SCHEMA)
    bar = tqdm(desc=f"read {Path(task.path).name}", unit="caption", disable=None if task.progress else True)
    try:
        with open(task.path, "rb") as f:
            for entry in _json_entries(f, task.path):
                entries += 1
                key, value = check.see(entries, entry)
                if not (isinstance(key, str) and key and isinstance(value, str)):
                    bad += 1
                    continue
                keys.append(key)
                captions.append(caption_or_none(value))
                seqs.append(entries - 1)
                if len(keys) == _READ_BATCH_ROWS:
                    writer.write(*_bucket_batch(keys, captions, seqs, task.buckets))
                    bar.update(len(keys))
                    keys, captions, seqs = [], [], []
        if keys:
            writer.write(*_bucket_batch(keys, captions, seqs, task.buckets))
    except ijson.JSONError as exc:
        raise ManifestError(f"{task.path}: invalid JSON ({exc})") from exc
    finally:
        writer.close()
        bar.close()
    check.finish(entries)
    return RecaptionResult(entries=entries, bad_entries=bad)


def _bucket_batch(keys: list[str], captions: list[str | None], seqs: list[int], buckets: int
                  ) -> tuple[np.ndarray, pa.RecordBatch]:
    digests = key_digests(keys)
    batch = pa.record_batch(
        [
            pa.array(digests[:, 0]),
            pa.array(digests[:, 1]),
            pa.array(seqs, pa.int64()),
            pa.array(keys, pa.string()),
            pa.array(captions, pa.string()),
        ],
        schema=BUCKET_SCHEMA,
    )
    return digests[:, 0] % buckets, batch


# ---------------------------------------------------------------- step 4: join per bucket


@dataclass
class _JoinCounts:
    """``<col>_without_sample`` and ``<col>_duplicate_key`` of one file, and its earliest repeated key."""

    without: int = 0
    repeated: int = 0
    first_repeat: tuple[int, str] | None = None  # (seq, key) of the earliest second entry of a key


def join_recaptions(column: str, task: RecaptionTask, digests: np.ndarray, usable: np.ndarray, out: Path,
                    on_duplicate: str, coverage: dict[str, int]) -> list[Path]:
    """Step 4 for one recaption file: per bucket, match its entries to the usable samples.

    Args:
        column: the manifest column the file fills (``long_caption`` / ``short_caption``).
        task: the file's step-2 task (its bucket files lie in ``task.out``).
        digests: ``(n, 2)`` uint64 key digests of all samples, in sample order.
        usable: ``(n,)`` bool, the samples that may become rows (no skip reason, not a dropped duplicate).
        out: a new folder for the join outputs.
        on_duplicate: ``"error" | "first" | "skip"``, for a key listed more than once in the file.
        coverage: counts ``<col>_without_sample`` and ``<col>_duplicate_key`` are added to it.

    Writes ``out/bucket-XXXXX.parquet`` (:data:`JOINED_SCHEMA`, sorted by ``row``) per bucket with matches.

    Returns:
        the written bucket files, in bucket order.

    Raises:
        DuplicateKeyError: a key with a row is listed twice and ``on_duplicate == "error"``.
    """
    n_buckets = task.buckets
    rows = np.flatnonzero(usable)
    bucket_of_row = (digests[rows, 0] % n_buckets).astype(np.int32)
    by_bucket = np.argsort(bucket_of_row, kind="stable")
    rows, bucket_of_row = rows[by_bucket], bucket_of_row[by_bucket]
    del by_bucket
    bounds = np.searchsorted(bucket_of_row, np.arange(n_buckets + 1))
    del bucket_of_row
    out.mkdir(parents=True)
    written: list[Path] = []
    counts = _JoinCounts()
    for b in tqdm(range(n_buckets), desc=f"join {column}", unit="bucket", disable=None):
        path = Path(task.out) / bucket_name(b)
        if not path.is_file():
            continue
        bucket = pq.ParquetFile(path)
        r = rows[bounds[b]: bounds[b + 1]]
        matched = _match(bucket, pa.table({"hi": digests[r, 0], "lo": digests[r, 1], "row": r}), counts)
        matched = _resolve_repeats(bucket, matched, on_duplicate, counts)
        if matched is not None and matched.num_rows:
            found = _read_entries(bucket, matched["entry"].to_numpy(), ["key", "caption"])
            table = pa.table({"row": matched["row"], "key": found["key"], "caption": found["caption"]},
                             schema=JOINED_SCHEMA)
            written.append(out / bucket_name(b))
            pq.write_table(table, written[-1], row_group_size=_MERGE_BATCH_ROWS)  # the merge holds 1 group
    if counts.first_repeat is not None:
        raise DuplicateKeyError(
            f"{task.path}: key {counts.first_repeat[1]!r} is listed more than once; "
            "use --on-duplicate first|skip to resolve"
        )
    for reason, n in ((f"{column}_without_sample", counts.without),
                      (f"{column}_duplicate_key", counts.repeated)):
        if n:
            coverage[reason] = coverage.get(reason, 0) + n
    return written


def _match(bucket: pq.ParquetFile, wanted: pa.Table, counts: _JoinCounts) -> pa.Table:
    """The bucket's entries whose digest is a wanted sample's (``hi``, ``lo``, ``row``): ``entry`` (row in the
    bucket), ``seq``, ``row``, sorted by ``row`` then ``seq``. Unmatched entries count as ``without``."""
    entries = bucket.read(columns=["hi", "lo", "seq"])
    entries = entries.append_column("entry", pa.array(np.arange(entries.num_rows)))
    matched = entries.join(wanted, keys=["hi", "lo"], join_type="inner")
    matched = matched.sort_by([("row", "ascending"), ("seq", "ascending")])
    counts.without += entries.num_rows - matched.num_rows
    return matched


def _resolve_repeats(bucket: pq.ParquetFile, matched: pa.Table, on_duplicate: str, counts: _JoinCounts
                     ) -> pa.Table | None:
    """``matched`` (from :func:`_match`) with one entry per row under ``on_duplicate``; later entries of a row
    count as ``repeated``. Under ``"error"`` a bucket with repeats notes its earliest one and returns None."""
    row = matched["row"].to_numpy()
    first = np.ones(len(row), bool)
    first[1:] = row[1:] != row[:-1]
    if first.all():
        return matched
    counts.repeated += int((~first).sum())
    if on_duplicate == "error":
        later = np.flatnonzero(~first)
        i = int(later[np.argmin(matched["seq"].to_numpy()[later])])
        repeat_key = _read_entries(bucket, matched["entry"].to_numpy()[i : i + 1], ["key"])["key"][0]
        candidate = (int(matched["seq"][i].as_py()), repeat_key.as_py())
        counts.first_repeat = min(counts.first_repeat, candidate) if counts.first_repeat else candidate
        return None
    if on_duplicate == "first":
        return matched.filter(first)
    last = np.ones(len(row), bool)
    last[:-1] = first[1:]
    return matched.filter(first & last)


def _read_entries(bucket: pq.ParquetFile, entries: np.ndarray, columns: list[str]) -> pa.Table:
    """``columns`` of the given entries (row numbers, any order) of a bucket file, in that order.

    Reads only the row groups that hold one of them, one at a time.
    """
    order = np.argsort(entries, kind="stable")
    wanted = entries[order]
    starts = np.concatenate([[0], np.cumsum([bucket.metadata.row_group(g).num_rows
                                             for g in range(bucket.num_row_groups)])])
    pieces = []
    for g in range(bucket.num_row_groups):
        lo, hi = np.searchsorted(wanted, starts[g : g + 2])
        if hi > lo:
            pieces.append(bucket.read_row_group(g, columns=columns).take(wanted[lo:hi] - starts[g]))
    found = pa.concat_tables(pieces) if pieces else bucket.schema_arrow.empty_table().select(columns)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return found.take(inverse)


class SortedRuns:
    """Merge of bucket join outputs (each sorted by ``row``): hands out the rows below a bound, in turn.

    Holds one row group (:data:`_MERGE_BATCH_ROWS` rows) per run.
    """

    def __init__(self, paths: list[Path]):
        self._files = [pq.ParquetFile(p) for p in paths]
        self._next_group = [0] * len(paths)
        self._pending: list[pa.Table | None] = [None] * len(paths)

    def _group(self, i: int) -> pa.Table | None:
        if self._pending[i] is None and self._next_group[i] < self._files[i].num_row_groups:
            self._pending[i] = self._files[i].read_row_group(self._next_group[i], use_threads=False)
            self._next_group[i] += 1
        return self._pending[i]

    def below(self, bound: int) -> pa.Table:
        """The rows not handed out yet with ``row < bound`` from every run, any order (JOINED_SCHEMA)."""
        taken = []
        for i in range(len(self._files)):
            while (group := self._group(i)) is not None:
                cut = int(np.searchsorted(group["row"].to_numpy(), bound))
                taken.append(group.slice(0, cut))
                self._pending[i] = group.slice(cut) if cut < group.num_rows else None
                if cut < group.num_rows:
                    break
        return pa.concat_tables(taken) if taken else JOINED_SCHEMA.empty_table()
