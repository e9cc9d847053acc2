"""WebDataset / img2dataset shards (``{key}.jpg|jpeg|png|webp``, ``{key}.txt``, ``{key}.json``) -> manifest.

Inputs are tar shards given as paths, brace patterns, folders, or webdataset ``gopen`` URLs
(``file:///data/00000.tar``, ``pipe:cat /data/00000.tar``, ``https://...``), and optionally FLAME recaption
files (``--long-captions``/``--short-captions``: a JSON list, or JSON lines, of
``{"__key__": ..., "<caption field>": ...}``) joined on the key.

The build runs in five steps, none of which holds the data set in memory:

1. **Shards**, one task per shard, ``workers`` processes: the tar is streamed with webdataset's ``gopen`` +
   ``tar_file_iterator``; members are grouped **by key within the shard** (not by adjacency: webdataset's
   ``group_by_keys`` would cut a ``.txt`` stored after another key's members off its image); every image is
   decoded as it streams past (:func:`manifests.images.decode_image`) and only its verdict is kept. The
   shard's samples are staged as one Parquet file; the task returns their 128-bit key digests (BLAKE2b) and
   skip flags.
2. **Recaptions**, one task per file in the same pool: the file is streamed once with ijson into ``P``
   Parquet bucket files by key digest (``P`` = file size / :data:`RECAPTION_BUCKET_BYTES`, at most
   :data:`MAX_RECAPTION_BUCKETS`).
3. **Duplicate keys** across all shards: the digests are sorted (numpy) and equal neighbours grouped.
4. **Join**, per recaption file and bucket: that bucket's key digests against the usable samples whose
   digest falls in the bucket (``pyarrow.Table.join``); the captions of the matches are read and written
   sorted by sample row.
5. **Parts**: one manifest part per shard, in shard order, its recaptions taken from the ``P`` sorted bucket
   outputs by a merge. The parts and ``manifest.json`` are identical for any ``workers``.

Memory does not grow with the number or length of the recaptions. Per sample, the main process holds 18
bytes (16-byte key digest, 2 flags) and, while duplicates are sorted or samples are bucketed, about 32 bytes
more (sort indices, digest copies): at most ~0.75 GB at 15M samples, besides the imported libraries. A
recaption reader buffers :data:`_WRITE_BUFFER_BYTES`; a join holds one bucket's digests (24 bytes per entry)
and the captions it matched (at most about :data:`RECAPTION_BUCKET_BYTES` of text); the part writer holds one
shard's rows and one row group of :data:`_MERGE_BATCH_ROWS` recaptions per bucket; a shard task holds one
shard's member names and captions, never its image bytes. Intermediate files live in ``<out>/.staging`` and
are deleted at the end, also on error. A key digest collision (2^-128 per pair) would be caught when a part
is written (ManifestError), never written as a wrong pairing.

Rows reference their image: ``image_path`` = the shard (a path relative to the manifest directory if the tar
lies under it, else absolute; a URL verbatim), ``image_member`` = the member name. ``raw_caption`` = the
``.txt``, or the ``json_caption_field`` of the ``.json`` when there is no ``.txt``. The key is the member name
up to its first dot (webdataset's rule). If a shard repeats a member name, the k-th member of each extension
forms copy k of that key (a duplicate key inside one shard); a kept copy is always the first, which is the
member :func:`manifests.images.load_image` opens.

Outcomes (besides those in :mod:`manifests.common`):

==============================  ============================================================================
``A.jpg B.jpg B.txt A.txt``     non-adjacent members: grouped by key, A gets A.txt (no outcome to count)
caption with ``"`` or ``:"``    kept verbatim
50,000-character caption        kept verbatim (stage 1 truncates caption tokens)
key twice in a shard / in two   ``--on-duplicate error`` (default): :class:`~.common.DuplicateKeyError`
shards                          naming the key and both ``<tar> member <name> (#<member number>)``;
                                ``first``: the first copy in shard order is kept; ``skip``: all dropped;
                                ``skipped_duplicate``
truncated JPEG, HTML as .jpg    ``skipped_undecodable_image``
sample with no image member     ``skipped_no_image``
``k.jpg`` and ``k.png``         ``skipped_ambiguous_image``
empty/whitespace caption        raw caption null (``empty_caption_to_null``); ``skipped_no_caption``
                                unless a recaption supplies a caption
non-UTF-8 bytes in ``.txt``     decoded with U+FFFD for the bad bytes, row kept, ``caption_non_utf8``
no ``.txt``, caption in         raw caption from the ``.json`` field (``--json-caption-field``, default
``.json``                       ``caption``), ``caption_from_json`` (kept rows)
no ``.txt``, ``.json`` without  raw caption null, ``json_without_caption`` (every sample read): the ``.json``
a string caption field          is not a JSON object, or the field is absent or not a string
member name without extension   ignored, ``ignored_tar_members`` (also: unknown extension, non-UTF-8 name)
unreadable / truncated tar,     the rest of that shard is lost, ``shards_with_read_errors`` (error logged);
``pipe:`` command failing       a tar cut inside a member *header* ends silently (Python's ``tarfile`` reads
                                it as the end of the archive), its lost samples are not counted
no usable row at all            :class:`~manifests.schema.ManifestError` (nothing is written)
recaption key with no row       ``<col>_without_sample`` (``long_caption_without_sample``, ...), per entry:
                                the key is absent from the shards, or its sample was skipped
row with no recaption           ``sample_without_<col>`` (also when the recaption is empty/whitespace)
recaption entry that is not an  ``<col>_bad_entry``: the entry is dropped (it does not count as a duplicate)
object, has no string
``__key__``, or whose caption
field is absent or not a string
caption field in no entry       :class:`~manifests.schema.ManifestError` naming the field and the fields the
of a file                       entries have
recaption file with a UTF-8     accepted (the BOM is skipped); JSON lines are accepted like a JSON list
BOM / in JSON lines
recaption key twice in a file   keys with a row only: ``error``: :class:`~.common.DuplicateKeyError` naming
                                the key whose second entry comes first in the file; ``first``: the first
                                entry kept; ``skip``: no recaption for that key; ``<col>_duplicate_key``
                                counts every entry after the first
==============================  ============================================================================
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand
import ijson
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from manifests.common import (
    ON_DUPLICATE,
    STAGING_DIR,
    DuplicateKeyError,
    clean_caption,
    decode_text,
    image_problem,
    reference_path,
)
from manifests.schema import DATA_DIR, MANIFEST_JSON, SCHEMA, ManifestError, ManifestInfo
from pipeline.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
JSON_EXTENSION = "json"
KNOWN_EXTENSIONS = (*IMAGE_EXTENSIONS, CAPTION_EXTENSION, JSON_EXTENSION)
RECAPTION_COLUMNS = ("long_caption", "short_caption")

RECAPTION_BUCKET_BYTES = 32 << 20
"""Recaption JSON bytes per join bucket: bounds the captions one join step holds."""
MAX_RECAPTION_BUCKETS = 256
_WRITE_BUFFER_BYTES = 16 << 20  # recaption rows buffered before they are written to their buckets
_READ_BATCH_ROWS = 8192  # recaption entries converted to Arrow at a time
_MERGE_BATCH_ROWS = 512  # rows per row group of a bucket's join output; the merge holds one per bucket
_FIELD_NAMES_SHOWN = 20
_FIELD_WARNING_AFTER = 10_000

_STAGE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("image_member", pa.string()),
        pa.field("raw_caption", pa.string()),
        pa.field("skip", pa.string()),
        pa.field("notes", pa.list_(pa.string())),
        pa.field("location", pa.string()),
        pa.field("json_without_caption", pa.bool_()),
    ]
)
_BUCKET_SCHEMA = pa.schema(
    [
        pa.field("hi", pa.uint64()),
        pa.field("lo", pa.uint64()),
        pa.field("seq", pa.int64()),
        pa.field("key", pa.string()),
        pa.field("caption", pa.string()),
    ]
)
_JOINED_SCHEMA = pa.schema(
    [pa.field("row", pa.int64()), pa.field("key", pa.string()), pa.field("caption", pa.string())]
)


# ---------------------------------------------------------------- shard names


def is_url(spec: str) -> bool:
    """True for what webdataset's ``gopen`` opens as a URL (``pipe:cmd``, ``file:///p``, ``s3://...``)."""
    return urlparse(spec).scheme != ""


def _local_file(url: str) -> Path | None:
    parsed = urlparse(url)
    return Path(url2pathname(parsed.path)) if parsed.scheme == "file" else None


def expand_shards(specs: Iterable[str]) -> list[str]:
    """Shards from brace patterns (``data/{00000..00009}.tar``), folders (their ``*.tar``), files or URLs.

    URLs (``file://``, ``pipe:``, ``https://``, ...) are brace-expanded and kept verbatim; a ``file:`` URL
    must name an existing file, other URLs are not checked here (a failing one is counted when read).

    Raises:
        FileNotFoundError: a named shard does not exist, or nothing matched.
    """
    shards: list[str] = []
    for spec in specs:
        for path in braceexpand.braceexpand(str(spec)):
            if is_url(path):
                local = _local_file(path)
                if local is not None and not local.is_file():
                    raise FileNotFoundError(f"webdataset shard {path} does not exist")
                shards.append(path)
                continue
            p = Path(path)
            if p.is_dir():
                shards.extend(str(t) for t in sorted(p.glob("*.tar")))
            elif p.is_file():
                shards.append(str(p))
            else:
                raise FileNotFoundError(f"webdataset shard {path} does not exist")
    if not shards:
        raise FileNotFoundError(f"no .tar shards found in {list(specs)}")
    return shards


def shard_reference(shard: str, out_dir: str | Path) -> str:
    """The ``image_path`` of a shard's rows: a URL verbatim, else :func:`manifests.common.reference_path`."""
    return shard if is_url(shard) else reference_path(shard, out_dir)


def key_digests(keys: Sequence[str]) -> np.ndarray:
    """128-bit BLAKE2b digests of sample keys: a ``(len(keys), 2)`` uint64 array (first half, second half)."""
    raw = b"".join(hashlib.blake2b(k.encode("utf-8"), digest_size=16).digest() for k in keys)
    return np.frombuffer(raw, dtype="<u8").reshape(-1, 2)


# ---------------------------------------------------------------- step 1: one shard


@dataclass
class _Member:
    name: str
    ordinal: int
    problem: str | None = None
    text: str | None = None
    non_utf8: bool = False


@dataclass(frozen=True)
class _ShardTask:
    index: int
    url: str
    stage_file: str
    limit: int | None
    json_caption_field: str


@dataclass
class _ShardResult:
    index: int
    rows: int
    counts: dict[str, int]
    digests: np.ndarray  # (rows, 2) uint64
    skipped: np.ndarray  # (rows,) bool: the sample has a skip reason (image problems)


class _Shard:
    """One shard's members grouped by key (insertion order = first appearance), then by extension."""

    def __init__(self, task: _ShardTask):
        self.task = task
        self.keys: dict[str, dict[str, list[_Member]]] = {}
        self.ordinal = 0
        self.ignored = 0

    def add(self, fname: str, data: bytes) -> None:
        self.ordinal += 1
        key, ext = base_plus_ext(fname)
        ext = ext.lower() if ext else ext
        if key is None or ext not in KNOWN_EXTENSIONS or not _is_utf8(fname):
            self.ignored += 1
            return
        member = _Member(fname, self.ordinal)
        if ext in IMAGE_EXTENSIONS:
            member.problem = image_problem(data, f"{self.task.url}:{fname}")
        elif ext == CAPTION_EXTENSION:
            member.text, member.non_utf8 = decode_text(data)
        else:
            member.text = _json_caption(data, self.task.json_caption_field)
        self.keys.setdefault(key, {}).setdefault(ext, []).append(member)

    def rows(self) -> Iterator[dict[str, Any]]:
        """Staged rows (:data:`_STAGE_SCHEMA`), one per key copy, at most ``task.limit``."""
        n = 0
        for key, by_ext in self.keys.items():
            for k in range(max(len(members) for members in by_ext.values())):
                if self.task.limit is not None and n >= self.task.limit:
                    return
                n += 1
                yield self._row(key, {ext: members[k] for ext, members in by_ext.items() if k < len(members)})

    def _row(self, key: str, copy: dict[str, _Member]) -> dict[str, Any]:
        images = [copy[ext] for ext in IMAGE_EXTENSIONS if ext in copy]
        anchor = images[0] if len(images) == 1 else min(copy.values(), key=lambda m: m.ordinal)
        skip = None
        if not images:
            skip = "no_image"
        elif len(images) > 1:
            skip = "ambiguous_image"
        elif images[0].problem:
            skip = images[0].problem
        notes = []
        text, json_doc = copy.get(CAPTION_EXTENSION), copy.get(JSON_EXTENSION)
        raw = None
        if text is not None:
            raw = text.text
            if text.non_utf8:
                notes.append("caption_non_utf8")
        elif json_doc is not None and json_doc.text is not None:
            raw = json_doc.text
            if clean_caption(raw) is not None:
                notes.append("caption_from_json")
        if raw is not None and clean_caption(raw) is None:
            raw = None
            notes.append("empty_caption_to_null")
        return {
            "key": key,
            "image_member": anchor.name if len(images) == 1 else None,
            "raw_caption": raw,
            "skip": skip,
            "notes": notes,
            "location": f"{self.task.url} member {anchor.name} (#{anchor.ordinal})",
            "json_without_caption": text is None and json_doc is not None and json_doc.text is None,
        }


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # tarfile keeps undecodable name bytes as lone surrogates
        return False
    return True


def _json_caption(data: bytes, field_name: str) -> str | None:
    """The string ``field_name`` of a ``.json`` member, or None (not a JSON object, field absent/not str)."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    value = doc.get(field_name) if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


class _ShardErrors:
    """webdataset exception handler for one shard: log the first error and stop reading that shard."""

    def __init__(self, url: str):
        self.url = url
        self.failed = False

    def __call__(self, exn: Exception) -> bool:
        if not self.failed:
            log.warning("%s: unreadable tar data, rest of the shard skipped: %s", self.url, exn)
        self.failed = True
        return False


def read_shard(task: _ShardTask) -> _ShardResult:
    """Step 1 for one shard: stream the tar, decode its images, stage its samples as Parquet.

    Returns:
        the number of staged samples, the shard's counts (``ignored_tar_members``,
        ``shards_with_read_errors``), and per staged sample its key digest and whether it has a skip reason.
    """
    shard = _Shard(task)
    errors = _ShardErrors(task.url)
    stream = None
    try:
        stream = gopen(task.url)
        for member in tar_file_iterator(stream, handler=errors):
            shard.add(member["fname"], member["data"])
    except (tarfile.TarError, OSError, ValueError) as exc:
        errors(exc)
    finally:
        if stream is not None:
            try:
                stream.close()
            except OSError as exc:  # a pipe: command that exited with an error status
                errors(exc)
    table = pa.Table.from_pylist(list(shard.rows()), schema=_STAGE_SCHEMA)
    pq.write_table(table, task.stage_file)
    counts = {"ignored_tar_members": shard.ignored, "shards_with_read_errors": int(errors.failed)}
    return _ShardResult(
        index=task.index,
        rows=table.num_rows,
        counts={k: v for k, v in counts.items() if v},
        digests=key_digests(table["key"].to_pylist()),
        skipped=table["skip"].is_valid().to_numpy(zero_copy_only=False),
    )


# ---------------------------------------------------------------- step 2: one recaption file


@dataclass(frozen=True)
class _RecaptionTask:
    path: str
    field_name: str
    column: str
    buckets: int
    out: str
    progress: bool


@dataclass
class _RecaptionResult:
    entries: int
    bad_entries: int


def recaption_buckets(path: str | Path) -> int:
    """Number of join buckets for a recaption file: its size / :data:`RECAPTION_BUCKET_BYTES`, in [1, 256]."""
    size = Path(path).stat().st_size
    return min(MAX_RECAPTION_BUCKETS, max(1, math.ceil(size / RECAPTION_BUCKET_BYTES)))


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
                self._writers[bucket] = pq.ParquetWriter(self.folder / _bucket_name(bucket), self.schema)
            self._writers[bucket].write_table(table.slice(lo, hi - lo))

    def close(self) -> None:
        self.flush()
        for writer in self._writers.values():
            writer.close()


def _bucket_name(bucket: int) -> str:
    return f"bucket-{bucket:05d}.parquet"


def stream_recaptions(task: _RecaptionTask) -> _RecaptionResult:
    """Step 2: stream a recaption file once into ``task.out/bucket-XXXXX.parquet`` (bucket = digest % P).

    Each usable entry becomes a row ``(hi, lo, seq, key, caption)`` (:data:`_BUCKET_SCHEMA`): the key digest,
    the entry's position in the file, the key, and the caption (null if empty/whitespace). Each bucket file
    holds its rows in file order. Unusable entries are counted.

    Raises:
        ManifestError: the file is not valid JSON, is neither a JSON list nor JSON lines, or no entry has
            the caption field (the message lists the fields the entries have).
    """
    entries = bad = with_field = 0
    fields: set[str] = set()
    keys: list[str] = []
    captions: list[str | None] = []
    seqs: list[int] = []
    writer = _BucketWriter(Path(task.out), _BUCKET_SCHEMA)
    bar = tqdm(desc=f"read {Path(task.path).name}", unit="caption", disable=None if task.progress else True)
    try:
        with open(task.path, "rb") as f:
            for entry in _json_entries(f, task.path):
                entries += 1
                key = value = None
                if isinstance(entry, dict):
                    if task.field_name in entry:
                        with_field += 1
                    elif not with_field and len(fields) < _FIELD_NAMES_SHOWN:
                        fields.update(list(entry)[: _FIELD_NAMES_SHOWN - len(fields)])
                    key, value = entry.get("__key__"), entry.get(task.field_name)
                if entries == _FIELD_WARNING_AFTER and not with_field:
                    log.warning("%s: none of the first %d entries has the caption field %r (fields: %s)",
                                task.path, entries, task.field_name, sorted(fields))
                if not (isinstance(key, str) and key and isinstance(value, str)):
                    bad += 1
                    continue
                keys.append(key)
                captions.append(clean_caption(value))
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
    if not entries:
        log.warning("%s has no entries; expected [{\"__key__\": ..., %r: ...}]", task.path, task.field_name)
    elif not with_field:
        raise ManifestError(
            f"{task.path}: no entry has the caption field {task.field_name!r} (--caption-field); "
            f"the entries have the fields {sorted(fields)}"
        )
    return _RecaptionResult(entries=entries, bad_entries=bad)


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
        schema=_BUCKET_SCHEMA,
    )
    return digests[:, 0] % buckets, batch


# ---------------------------------------------------------------- process pool


def _init_worker(level: int) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


class _Deferred:
    """``AsyncResult`` stand-in for ``workers == 1``: runs the task in this process on the first ``get``."""

    def __init__(self, fn: Callable[[Any], Any], arg: Any):
        self._fn, self._arg, self._done, self._value = fn, arg, False, None

    def get(self) -> Any:
        if not self._done:
            self._value, self._done = self._fn(self._arg), True
        return self._value

    def ready(self) -> bool:
        return self._done

    def successful(self) -> bool:
        return self._done


class _InlinePool:
    """The part of ``multiprocessing.Pool`` this module uses, running tasks in this process."""

    def apply_async(self, fn: Callable[[Any], Any], args: tuple[Any]) -> _Deferred:
        return _Deferred(fn, args[0])


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[Any]:
    """A process pool of ``workers`` (in-process for 1); on leaving, unfinished tasks are stopped."""
    if workers == 1:
        yield _InlinePool()
        return
    # not fork: the parent may hold pyarrow/tqdm threads, which a forked child must not inherit. The fork
    # server imports this module once per session, so a pool starts in milliseconds, not an import each.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    level = logging.getLogger().getEffectiveLevel()
    pool = context.Pool(workers, initializer=_init_worker, initargs=(level,))
    try:
        yield pool
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()


# ---------------------------------------------------------------- steps 1 + 3: all shards, duplicates


@dataclass
class _Samples:
    """What the main process keeps of the staged samples: 17 bytes per sample."""

    shards: list[tuple[int, int]] = field(default_factory=list)  # (shard index, samples used), in order
    counts: dict[str, int] = field(default_factory=dict)
    digests: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.uint64))
    skipped: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    @property
    def offsets(self) -> np.ndarray:
        """First global row of each used shard, and the total: ``(len(shards) + 1,)`` int64."""
        return np.concatenate([[0], np.cumsum([n for _, n in self.shards], dtype=np.int64)])


def _stage_file(stage: Path, index: int) -> Path:
    return stage / "shards" / f"shard-{index:06d}.parquet"


def _read_shards(pool: Any, urls: list[str], stage: Path, limit: int | None, json_caption_field: str,
                 window: int, check: Callable[[], None]) -> _Samples:
    samples = _Samples()
    digests, skipped = [], []
    pending: collections.deque = collections.deque()
    next_index = seen = 0
    with tqdm(total=len(urls), desc="read shards", unit="shard", disable=None) as bar:
        while True:
            while next_index < len(urls) and len(pending) < window:
                task = _ShardTask(next_index, urls[next_index], str(_stage_file(stage, next_index)), limit,
                                  json_caption_field)
                pending.append(pool.apply_async(read_shard, (task,)))
                next_index += 1
            if not pending:
                break
            result: _ShardResult = pending.popleft().get()
            take = result.rows if limit is None else min(result.rows, limit - seen)
            samples.shards.append((result.index, take))
            for reason, n in result.counts.items():
                samples.counts[reason] = samples.counts.get(reason, 0) + n
            digests.append(result.digests[:take])
            skipped.append(result.skipped[:take])
            seen += take
            bar.update()
            bar.set_postfix(samples=seen, per_s=round(seen / max(bar.format_dict["elapsed"], 1e-9)))
            check()
            if limit is not None and seen >= limit:
                break
    samples.digests = np.concatenate(digests) if digests else samples.digests
    samples.skipped = np.concatenate(skipped) if skipped else samples.skipped
    return samples


def duplicate_groups(digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose digest occurs more than once, grouped.

    Args:
        digests: ``(n, 2)`` uint64 key digests in source order.

    Returns:
        ``(rows, starts)``: the rows (int64) of every repeated digest, each group's rows consecutive and in
        ascending order; ``starts`` (bool, same length) marks the first row of each group.
    """
    order = np.lexsort((digests[:, 1], digests[:, 0]))  # stable: equal digests keep ascending rows
    hi, lo = digests[order, 0], digests[order, 1]
    same = (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])
    del hi, lo
    if not same.any():
        return np.zeros(0, np.int64), np.zeros(0, bool)
    repeated = np.zeros(len(order), bool)
    repeated[1:] |= same
    repeated[:-1] |= same
    starts = repeated & ~np.concatenate([[False], same])
    return order[repeated], starts[repeated]


def _locate(samples: _Samples, stage: Path, row: int) -> tuple[str, str]:
    """``(key, location)`` of a global sample row, read from its staged shard."""
    offsets = samples.offsets
    i = int(np.searchsorted(offsets, row, side="right")) - 1
    table = pq.read_table(_stage_file(stage, samples.shards[i][0]), columns=["key", "location"])
    found = table.slice(row - int(offsets[i]), 1).to_pylist()[0]
    return found["key"], found["location"]


def _resolve_duplicates(samples: _Samples, stage: Path, on_duplicate: str, coverage: dict[str, int]
                        ) -> np.ndarray:
    """Step 3: the rows dropped as duplicates (bool, one per sample). Raises DuplicateKeyError under error."""
    dropped = np.zeros(len(samples.digests), bool)
    rows, starts = duplicate_groups(samples.digests)
    if not len(rows):
        return dropped
    n_keys = int(starts.sum())
    if on_duplicate == "error":
        heads = np.flatnonzero(starts)
        g = int(heads[np.argmin(rows[heads])])  # the repeated key that occurs first in source order
        key, first = _locate(samples, stage, int(rows[g]))
        _, second = _locate(samples, stage, int(rows[g + 1]))
        raise DuplicateKeyError(
            f"duplicate key {key!r} at {first} and at {second} "
            f"({n_keys} duplicated key(s) in all); use --on-duplicate first|skip to resolve"
        )
    coverage["duplicate_keys"] = n_keys
    dropped[rows[~starts] if on_duplicate == "first" else rows] = True
    return dropped


# ---------------------------------------------------------------- step 4: join per bucket


def _join_recaptions(column: str, task: _RecaptionTask, digests: np.ndarray, usable: np.ndarray, out: Path,
                     on_duplicate: str, coverage: dict[str, int]) -> list[Path]:
    """Step 4 for one recaption file: per bucket, match its entries to the usable samples.

    Writes ``out/bucket-XXXXX.parquet`` (:data:`_JOINED_SCHEMA`, sorted by ``row``) per bucket with matches
    and counts ``<col>_without_sample`` and ``<col>_duplicate_key``.

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
    without = repeated = 0
    first_repeat: tuple[int, str] | None = None  # (seq, key) of the earliest second entry of a key
    for b in tqdm(range(n_buckets), desc=f"join {column}", unit="bucket", disable=None):
        path = Path(task.out) / _bucket_name(b)
        if not path.is_file():
            continue
        bucket = pq.ParquetFile(path)
        entries = bucket.read(columns=["hi", "lo", "seq"])
        entries = entries.append_column("entry", pa.array(np.arange(entries.num_rows)))
        r = rows[bounds[b]: bounds[b + 1]]
        wanted = pa.table({"hi": digests[r, 0], "lo": digests[r, 1], "row": r})
        matched = entries.join(wanted, keys=["hi", "lo"], join_type="inner")
        matched = matched.sort_by([("row", "ascending"), ("seq", "ascending")])
        without += entries.num_rows - matched.num_rows
        del entries, wanted
        row = matched["row"].to_numpy()
        first = np.ones(len(row), bool)
        first[1:] = row[1:] != row[:-1]
        if not first.all():
            repeated += int((~first).sum())
            if on_duplicate == "error":
                later = np.flatnonzero(~first)
                i = int(later[np.argmin(matched["seq"].to_numpy()[later])])
                repeat_key = _read_entries(bucket, matched["entry"].to_numpy()[i : i + 1], ["key"])["key"][0]
                candidate = (int(matched["seq"][i].as_py()), repeat_key.as_py())
                first_repeat = min(first_repeat, candidate) if first_repeat else candidate
                continue
            if on_duplicate == "first":
                matched = matched.filter(first)
            else:
                last = np.ones(len(row), bool)
                last[:-1] = first[1:]
                matched = matched.filter(first & last)
        if matched.num_rows:
            found = _read_entries(bucket, matched["entry"].to_numpy(), ["key", "caption"])
            table = pa.table({"row": matched["row"], "key": found["key"], "caption": found["caption"]},
                             schema=_JOINED_SCHEMA)
            written.append(out / _bucket_name(b))
            pq.write_table(table, written[-1], row_group_size=_MERGE_BATCH_ROWS)  # the merge holds 1 group
    if first_repeat is not None:
        raise DuplicateKeyError(
            f"{task.path}: key {first_repeat[1]!r} is listed more than once; "
            "use --on-duplicate first|skip to resolve"
        )
    for reason, n in ((f"{column}_without_sample", without), (f"{column}_duplicate_key", repeated)):
        if n:
            coverage[reason] = coverage.get(reason, 0) + n
    return written


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


class _SortedRuns:
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
        """The not yet handed out rows with ``row < bound`` from every run (any order)."""
        taken = []
        for i in range(len(self._files)):
            while (group := self._group(i)) is not None:
                cut = int(np.searchsorted(group["row"].to_numpy(), bound))
                taken.append(group.slice(0, cut))
                self._pending[i] = group.slice(cut) if cut < group.num_rows else None
                if cut < group.num_rows:
                    break
        return pa.concat_tables(taken) if taken else _JOINED_SCHEMA.empty_table()


# ---------------------------------------------------------------- step 5: parts


def _count(coverage: dict[str, int], reason: str, n: int) -> None:
    if n:
        coverage[reason] = coverage.get(reason, 0) + int(n)


def _write_parts(samples: _Samples, dropped: np.ndarray, joined: dict[str, list[Path]], urls: list[str],
                 out_dir: Path, stage: Path, split: str, coverage: dict[str, int]) -> list[str]:
    """Step 5: one part per shard with rows, into ``stage/parts``; returns their names (``data/part-*``)."""
    runs = {column: _SortedRuns(paths) for column, paths in joined.items()}
    (stage / "parts").mkdir()
    parts: list[str] = []
    offsets = samples.offsets
    rows_written = 0
    bar = tqdm(samples.shards, desc="write manifest", unit="shard", disable=None)
    for i, (index, take) in enumerate(bar):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        staged = pq.read_table(_stage_file(stage, index)).slice(0, take)
        captions = {c: staged["raw_caption"] if c == "raw_caption" else pa.nulls(take, pa.string())
                    for c in ("raw_caption", *RECAPTION_COLUMNS)}
        for column, merge in runs.items():
            found = merge.below(hi)
            pos = found["row"].to_numpy() - lo
            if not pc.all(pc.equal(found["key"], staged["key"].take(pos)), min_count=0).as_py():
                raise ManifestError(f"{urls[index]}: key digest collision in the {column} join")
            where = np.full(take, -1, np.int64)
            where[pos] = np.arange(len(pos))
            captions[column] = found["caption"].take(pa.array(where, mask=where < 0))

        dup = dropped[lo:hi]
        has_skip = staged["skip"].is_valid().to_numpy(zero_copy_only=False)
        usable = ~dup & ~has_skip
        has_caption = np.zeros(take, bool)
        for values in captions.values():
            has_caption |= values.is_valid().to_numpy(zero_copy_only=False)
        kept = usable & has_caption
        _count(coverage, "skipped_duplicate", dup.sum())
        for reason in pc.value_counts(staged["skip"].filter(~dup & has_skip)).to_pylist():
            _count(coverage, f"skipped_{reason['values']}", reason["counts"])
        _count(coverage, "skipped_no_caption", (usable & ~has_caption).sum())
        _count(coverage, "json_without_caption", pc.sum(staged["json_without_caption"]).as_py() or 0)
        for note in pc.value_counts(pc.list_flatten(staged["notes"].filter(kept))).to_pylist():
            _count(coverage, note["values"], note["counts"])
        for column in runs:
            _count(coverage, f"sample_without_{column}", (kept & ~captions[column].is_valid().to_numpy(
                zero_copy_only=False)).sum())

        n = int(kept.sum())
        if n:
            mask = pa.array(kept)
            columns = {
                "key": staged["key"].filter(mask),
                "image_path": pa.array([shard_reference(urls[index], out_dir)] * n, pa.string()),
                "image_member": staged["image_member"].filter(mask),
                **{c: values.filter(mask) for c, values in captions.items()},
                "split": pa.array([split] * n, pa.string()),
            }
            table = pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in SCHEMA},
                             schema=SCHEMA)
            name = f"{DATA_DIR}/part-{len(parts):05d}.parquet"
            pq.write_table(table, stage / "parts" / Path(name).name, compression="zstd")
            parts.append(name)
            rows_written += n
        bar.set_postfix(rows=rows_written)
    return parts


def _publish(out_dir: Path, stage: Path, info: ManifestInfo) -> None:
    """Replace the manifest in ``out_dir`` by the staged parts; ``manifest.json`` is written last."""
    data = out_dir / DATA_DIR
    data.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_JSON).unlink(missing_ok=True)
    for old in data.glob("part-*.parquet"):
        old.unlink()
    for name in info.parts:
        os.replace(stage / "parts" / Path(name).name, out_dir / name)
    atomic_write_bytes(out_dir / MANIFEST_JSON, info.to_json().encode("utf-8"))


# ---------------------------------------------------------------- the source


def build_webdataset_manifest(
    shards: Sequence[str],
    out_dir: str | Path,
    *,
    split: str = "train",
    on_duplicate: str = "error",
    limit: int | None = None,
    long_captions: str | Path | None = None,
    short_captions: str | Path | None = None,
    caption_field: str = "minicpm",
    json_caption_field: str = "caption",
    workers: int = 1,
) -> ManifestInfo:
    """Build a manifest from img2dataset/WebDataset shards, optionally joined with FLAME recaptions.

    Args:
        shards: shard paths, brace patterns, folders or ``gopen`` URLs (see :func:`expand_shards`), in order.
        out_dir: the manifest directory; an existing manifest there is replaced only when the build succeeds.
        split: the ``split`` of every row.
        on_duplicate: ``"error" | "first" | "skip"`` (:mod:`manifests.common`), for sample keys and for
            recaption keys.
        limit: read at most this many samples (before duplicate resolution), in shard order.
        long_captions, short_captions: FLAME recaption files (JSON list or JSON lines), joined on ``__key__``.
        caption_field: the caption field in the recaption files.
        json_caption_field: the caption field of a sample's ``.json``, read when the sample has no ``.txt``.
        workers: processes reading shards (and recaption files) in parallel; the output does not depend on it.
            Above 1, a calling script must guard its entry point (``if __name__ == "__main__":``), as
            :mod:`multiprocessing` requires: the worker processes import the main module.

    Returns:
        the written ``manifest.json`` contents (coverage per the module docstrings).

    Raises:
        FileNotFoundError: a shard or recaption file does not exist.
        DuplicateKeyError: a repeated key under ``on_duplicate="error"``.
        ManifestError: unreadable recaption file, a caption field in no entry, or no usable row.
        ValueError: ``on_duplicate``, ``limit`` or ``workers`` out of range.
    """
    if on_duplicate not in ON_DUPLICATE:
        raise ValueError(f"on_duplicate must be one of {ON_DUPLICATE}, got {on_duplicate!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    urls = expand_shards(shards)
    recaptions = {c: p for c, p in zip(RECAPTION_COLUMNS, (long_captions, short_captions), strict=True) if p}
    for path in recaptions.values():
        if not Path(path).is_file():
            raise FileNotFoundError(f"recaption file {path} does not exist")
    out_dir = Path(out_dir)
    source = {
        "name": "webdataset",
        "args": {
            "shards": urls,
            "split": split,
            "on_duplicate": on_duplicate,
            "limit": limit,
            "long_captions": str(long_captions) if long_captions else None,
            "short_captions": str(short_captions) if short_captions else None,
            "caption_field": caption_field,
            "json_caption_field": json_caption_field,
        },
    }
    stage = out_dir / STAGING_DIR
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "shards").mkdir(parents=True)
    try:
        tasks = {
            column: _RecaptionTask(str(path), caption_field, column, recaption_buckets(path),
                                   str(stage / "recaptions" / column), progress=workers == 1)
            for column, path in recaptions.items()
        }
        with _pool(workers) as pool:
            jobs = {column: pool.apply_async(stream_recaptions, (task,)) for column, task in tasks.items()}

            def check() -> None:  # surface a failed recaption file while shards are still being read
                for job in jobs.values():
                    if job.ready() and not job.successful():
                        job.get()

            samples = _read_shards(pool, urls, stage, limit, json_caption_field, 2 * workers, check)
            coverage = dict(samples.counts)
            dropped = _resolve_duplicates(samples, stage, on_duplicate, coverage)
            for column, job in jobs.items():
                _count(coverage, f"{column}_bad_entry", job.get().bad_entries)
        usable = ~(samples.skipped | dropped)
        joined = {
            column: _join_recaptions(column, task, samples.digests, usable, stage / "joined" / column,
                                     on_duplicate, coverage)
            for column, task in tasks.items()
        }
        del usable
        parts = _write_parts(samples, dropped, joined, urls, out_dir, stage, split, coverage)
        seen = len(samples.digests)
        rows = sum(pq.read_metadata(stage / "parts" / Path(p).name).num_rows for p in parts)
        if not rows:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(coverage.items())) or "no samples in the shards"
            raise ManifestError(f"no usable rows in {len(urls)} shard(s) ({seen} samples read; {reasons})")
        info = ManifestInfo(
            source=source,
            counts={split: rows, "total": rows},
            coverage={"samples_seen": seen, **dict(sorted(coverage.items()))},
            parts=parts,
        )
        _publish(out_dir, stage, info)
        return info
    finally:
        shutil.rmtree(stage, ignore_errors=True)
