"""Tar shards: their names (paths, brace patterns, folders, URLs), and step 1 for one shard.

Step 1 streams a tar once (webdataset's ``gopen`` + ``tar_file_iterator``), groups its members **by key within
the shard** (not by adjacency), decodes every image as it streams past and keeps only its verdict, and stages
the shard's samples as one Parquet file (:data:`STAGE_SCHEMA`). The outcomes are listed in
:mod:`manifests.webdataset_source`.

``webdataset`` is imported when a shard is read, not with this module: it imports torch, which the ``flame``
command line must not pay for. :data:`WORKER_IMPORTS` names what a worker process should import up front.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from manifests.common import caption_or_none, decode_text, image_problem, reference_path
from manifests.schema import RAW_CAPTION
from manifests.wds.digests import key_digests

log = logging.getLogger("manifests.webdataset_source")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
JSON_EXTENSION = "json"
KNOWN_EXTENSIONS = (*IMAGE_EXTENSIONS, CAPTION_EXTENSION, JSON_EXTENSION)
WORKER_IMPORTS = ("webdataset.gopen", "webdataset.tariterators")
"""The modules :func:`read_shard` imports on first use (a worker process preloads them)."""

STAGE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("image_member", pa.string()),
        pa.field(RAW_CAPTION, pa.string()),
        pa.field("skip", pa.string()),
        pa.field("notes", pa.list_(pa.string())),
        pa.field("location", pa.string()),
        pa.field("json_without_caption", pa.bool_()),
    ]
)
"""One staged sample (one key copy) of a shard: what step 5 needs to write its row or count its outcome."""


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


# ---------------------------------------------------------------- step 1: one shard


@dataclass
class _Member:
    name: str
    ordinal: int
    problem: str | None = None
    text: str | None = None
    non_utf8: bool = False


@dataclass(frozen=True)
class ShardTask:
    """Step 1 for one shard: read ``url`` (shard number ``index``), stage at most ``limit`` samples as
    ``stage_file``; a sample's ``.json`` field ``json_caption_field`` is its caption if it has no ``.txt``."""

    index: int
    url: str
    stage_file: str
    limit: int | None
    json_caption_field: str


@dataclass
class ShardResult:
    """What a shard task returns to the main process: 17 bytes per staged sample, never its captions."""

    index: int
    rows: int
    counts: dict[str, int]
    digests: np.ndarray  # (rows, 2) uint64
    skipped: np.ndarray  # (rows,) bool: the sample has a skip reason (image problems)


class _Shard:
    """One shard's members grouped by key (insertion order = first appearance), then by extension."""

    def __init__(self, task: ShardTask):
        self.task = task
        self.keys: dict[str, dict[str, list[_Member]]] = {}
        self.ordinal = 0
        self.ignored = 0

    def add(self, fname: str, key_ext: tuple[str | None, str | None], data: bytes) -> None:
        """Add member ``fname`` (its bytes ``data``), split by webdataset's rule into ``(key, extension)``."""
        self.ordinal += 1
        key, ext = key_ext
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
        """Staged rows (:data:`STAGE_SCHEMA`), one per key copy, at most ``task.limit``."""
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
            if caption_or_none(raw) is not None:
                notes.append("caption_from_json")
        if raw is not None and caption_or_none(raw) is None:
            raw = None
            notes.append("empty_caption_to_null")
        return {
            "key": key,
            "image_member": anchor.name if len(images) == 1 else None,
            RAW_CAPTION: raw,
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


def read_shard(task: ShardTask) -> ShardResult:
    """Step 1 for one shard: stream the tar, decode its images, stage its samples as Parquet.

    Unreadable tar data (also a failing ``pipe:`` command) ends the shard and is logged and counted, never
    raised.

    Returns:
        the number of staged samples, the shard's counts (``ignored_tar_members``,
        ``shards_with_read_errors``), and per staged sample its key digest and whether it has a skip reason.
    """
    from webdataset.gopen import gopen  # see the module docstring: webdataset imports torch
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    shard = _Shard(task)
    errors = _ShardErrors(task.url)
    stream = None
    try:
        stream = gopen(task.url)
        for member in tar_file_iterator(stream, handler=errors):
            shard.add(member["fname"], base_plus_ext(member["fname"]), member["data"])
    except (tarfile.TarError, OSError, ValueError) as exc:
        errors(exc)
    finally:
        if stream is not None:
            try:
                stream.close()
            except OSError as exc:  # a pipe: command that exited with an error status
                errors(exc)
    table = pa.Table.from_pylist(list(shard.rows()), schema=STAGE_SCHEMA)
    pq.write_table(table, task.stage_file)
    counts = {"ignored_tar_members": shard.ignored, "shards_with_read_errors": int(errors.failed)}
    return ShardResult(
        index=task.index,
        rows=table.num_rows,
        counts={k: v for k, v in counts.items() if v},
        digests=key_digests(table["key"].to_pylist()),
        skipped=table["skip"].is_valid().to_numpy(zero_copy_only=False),
    )
