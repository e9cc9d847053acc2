"""WebDataset / img2dataset shards (``{key}.jpg|jpeg|png|webp``, ``{key}.txt``, ``{key}.json``) -> manifest.

Tar members are streamed shard by shard with the ``webdataset`` library (``gopen`` +
``tar_file_iterator``). Members are grouped **by key within a shard**, not by adjacency (webdataset's own
``group_by_keys`` starts a new sample whenever the key changes, so a ``.txt`` stored after another key's
members would be cut off): the shard's members are collected per key and flushed at the end of the shard.
Each image member is decoded as it streams past (:func:`manifests.images.decode_image`), so only the
member name and the verdict are kept, never the shard's image bytes.

Rows reference their image: ``image_path`` = the tar (relative to the manifest directory if the tar lies
under it, else absolute), ``image_member`` = the member name. ``raw_caption`` = the ``.txt`` (``.json`` is
not read). The key is the member name up to its first dot (webdataset's rule). If a shard repeats a
member name, the k-th member of each extension forms copy k of that key (a duplicate key inside one
shard); a kept copy is always the first, which is the member :func:`manifests.images.load_image` opens.

Optional FLAME recaption files (``--long-captions``/``--short-captions``: JSON lists of
``{"__key__": ..., "<caption field>": ...}``) are streamed with ijson after the shards are read; memory
holds the set of keys that will become rows and the recaptions of those keys only, never the whole file.

Outcomes (besides those in :mod:`manifests.common`):

==============================  ============================================================================
``A.jpg B.jpg B.txt A.txt``     non-adjacent members: grouped by key, A gets A.txt (no outcome to count)
caption with ``"`` or ``:"``    kept verbatim
50,000-character caption        kept verbatim (stage 1 truncates caption tokens)
key twice in a shard / in two   ``--on-duplicate error`` (default): :class:`~manifests.common.DuplicateKeyError`
shards                          naming the key and both ``<tar> member <name> (#<member number>)``;
                                ``first``: first copy kept; ``skip``: all dropped; ``skipped_duplicate``
truncated JPEG, HTML as .jpg    ``skipped_undecodable_image``
sample with no image member     ``skipped_no_image``
``k.jpg`` and ``k.png``         ``skipped_ambiguous_image``
empty/whitespace ``.txt``       raw caption null (``empty_caption_to_null``); skipped as ``skipped_no_caption``
                                unless a recaption supplies a caption
non-UTF-8 bytes in ``.txt``     decoded with U+FFFD for the bad bytes, row kept, ``caption_non_utf8``
member name without extension   ignored, ``ignored_tar_members``
unknown extension (not json)    ignored, ``ignored_tar_members``
unreadable / truncated tar      the rest of that shard is lost, ``shards_with_read_errors`` (error logged);
                                a tar cut inside a member *header* ends silently (Python's ``tarfile`` reads
                                it as the end of the archive), its lost samples are not counted
recaption key with no row       ``<col>_without_sample`` (``long_caption_without_sample``, ...): the key is
                                absent from the shards, or its sample was skipped
row with no recaption           ``sample_without_<col>``
recaption entry without key     ``<col>_bad_entry``
recaption key twice in a file   ``error``: :class:`~manifests.common.DuplicateKeyError`; ``first``: first
                                entry kept; ``skip``: no recaption for that key; counted ``<col>_duplicate_key``
==============================  ============================================================================
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import ijson
from tqdm import tqdm
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from manifests.common import (
    DuplicateKeyError,
    ManifestBuilder,
    clean_caption,
    decode_text,
    image_problem,
    reference_path,
)
from manifests.schema import ManifestError, ManifestInfo

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
KNOWN_EXTENSIONS = (*IMAGE_EXTENSIONS, CAPTION_EXTENSION, "json")


def expand_shards(specs: Iterable[str]) -> list[str]:
    """Shard paths from brace patterns (``data/{00000..00009}.tar``), folders (their ``*.tar``) or files.

    Raises:
        FileNotFoundError: a named shard does not exist, or nothing matched.
    """
    shards: list[str] = []
    for spec in specs:
        for path in braceexpand.braceexpand(str(spec)):
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


@dataclass
class _Member:
    name: str
    ordinal: int
    problem: str | None = None
    text: str | None = None
    non_utf8: bool = False


@dataclass
class _Shard:
    """One shard's members grouped by key (insertion order = first appearance), then by extension."""

    url: str
    reference: str
    keys: dict[str, dict[str, list[_Member]]] = field(default_factory=dict)
    ordinal: int = 0

    def add(self, fname: str, data: bytes, builder: ManifestBuilder) -> None:
        self.ordinal += 1
        key, ext = base_plus_ext(fname)
        ext = ext.lower() if ext else ext
        if key is None or ext not in KNOWN_EXTENSIONS:
            builder.count("ignored_tar_members")
            return
        member = _Member(fname, self.ordinal)
        if ext in IMAGE_EXTENSIONS:
            member.problem = image_problem(data, f"{self.url}:{fname}")
        elif ext == CAPTION_EXTENSION:
            member.text, member.non_utf8 = decode_text(data)
        self.keys.setdefault(key, {}).setdefault(ext, []).append(member)

    def flush(self, builder: ManifestBuilder, split: str) -> None:
        for key, by_ext in self.keys.items():
            copies = max(len(members) for members in by_ext.values())
            for k in range(copies):
                if builder.full:
                    return
                copy = {ext: members[k] for ext, members in by_ext.items() if k < len(members)}
                self._add_copy(key, copy, builder, split)
        self.keys = {}

    def _add_copy(self, key: str, copy: dict[str, _Member], builder: ManifestBuilder, split: str) -> None:
        images = [copy[ext] for ext in IMAGE_EXTENSIONS if ext in copy]
        caption = copy.get(CAPTION_EXTENSION)
        first = min(copy.values(), key=lambda m: m.ordinal)
        anchor = images[0] if len(images) == 1 else first
        location = f"{self.url} member {anchor.name} (#{anchor.ordinal})"
        skip = None
        if not images:
            skip = "no_image"
        elif len(images) > 1:
            skip = "ambiguous_image"
        elif images[0].problem:
            skip = images[0].problem
        row = {
            "key": key,
            "image_path": self.reference,
            "image_member": anchor.name if len(images) == 1 else None,
            "raw_caption": caption.text if caption else None,
            "split": split,
        }
        notes = ["caption_non_utf8"] if caption and caption.non_utf8 else []
        builder.add(row, location, skip=skip, notes=notes)


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


def load_recaptions(
    path: str | Path, field_name: str, column: str, wanted: set[str], on_duplicate: str, builder: ManifestBuilder
) -> dict[str, str | None]:
    """Stream a FLAME recaption JSON list and keep the captions of ``wanted`` keys.

    Args:
        path: JSON file, a list of ``{"__key__": str, field_name: str}`` objects (any size; parsed with ijson).
        field_name: the caption field, e.g. ``"minicpm"``.
        column: the manifest column the captions fill (``"long_caption"``/``"short_caption"``), used to name
            the coverage counters.
        wanted: keys that will become rows; entries of other keys are counted and dropped.
        on_duplicate: policy for a key listed twice (module docstring).
        builder: receives the coverage counts.

    Returns:
        ``{key: caption or None}`` for the wanted keys present in the file.

    Raises:
        DuplicateKeyError: a wanted key is listed twice and ``on_duplicate == "error"``.
        ManifestError: the file is not valid JSON.
    """
    found: dict[str, str | None] = {}
    dropped: set[str] = set()
    entries = 0
    try:
        with open(path, "rb") as f:
            for entry in tqdm(ijson.items(f, "item"), desc=f"read {Path(path).name}", unit="caption", disable=None):
                entries += 1
                key = entry.get("__key__") if isinstance(entry, dict) else None
                if not isinstance(key, str):
                    builder.count(f"{column}_bad_entry")
                    continue
                if key not in wanted:
                    builder.count(f"{column}_without_sample")
                    continue
                if key in found or key in dropped:
                    if on_duplicate == "error":
                        raise DuplicateKeyError(
                            f"{path}: key {key!r} is listed more than once; use --on-duplicate first|skip to resolve"
                        )
                    builder.count(f"{column}_duplicate_key")
                    if on_duplicate == "skip" and key in found:
                        del found[key]
                        dropped.add(key)
                    continue
                text = entry.get(field_name)
                found[key] = clean_caption(text) if isinstance(text, str) else None
    except ijson.JSONError as exc:
        raise ManifestError(f"{path}: invalid JSON ({exc})") from exc
    if not entries:
        log.warning("%s has no entries; expected a JSON list of {\"__key__\": ..., %r: ...}", path, field_name)
    return found


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
) -> ManifestInfo:
    """Build a manifest from img2dataset/WebDataset shards, optionally joined with FLAME recaptions.

    Args:
        shards: shard paths, brace patterns or folders (see :func:`expand_shards`), read in order.
        out_dir: the manifest directory.
        split: the ``split`` of every row.
        on_duplicate: ``"error" | "first" | "skip"`` (:mod:`manifests.common`).
        limit: read at most this many samples (before duplicate resolution).
        long_captions, short_captions: FLAME recaption JSON files, joined on ``__key__``.
        caption_field: the caption field in the recaption files.

    Returns:
        the written ``manifest.json`` contents (coverage per the module docstrings).

    Raises:
        FileNotFoundError: a shard or recaption file does not exist.
        DuplicateKeyError: a repeated key under ``on_duplicate="error"``.
    """
    urls = expand_shards(shards)
    for path in (long_captions, short_captions):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"recaption file {path} does not exist")
    args = {
        "shards": urls,
        "split": split,
        "on_duplicate": on_duplicate,
        "limit": limit,
        "long_captions": str(long_captions) if long_captions else None,
        "short_captions": str(short_captions) if short_captions else None,
        "caption_field": caption_field,
    }
    with ManifestBuilder(out_dir, {"name": "webdataset", "args": args}, on_duplicate, limit) as builder:
        _read_shards(urls, out_dir, split, builder)
        joins = {}
        for column, path in (("long_caption", long_captions), ("short_caption", short_captions)):
            if path:
                wanted = builder.candidate_keys()
                joins[column] = load_recaptions(path, caption_field, column, wanted, on_duplicate, builder)
        return builder.finish(joins)


def _read_shards(urls: list[str], out_dir: str | Path, split: str, builder: ManifestBuilder) -> None:
    for url in tqdm(urls, desc="read shards", unit="shard", disable=None):
        shard = _Shard(url, reference_path(url, out_dir))
        errors = _ShardErrors(url)
        stream = gopen(url)
        try:
            for member in tar_file_iterator(stream, handler=errors):
                shard.add(member["fname"], member["data"], builder)
        except (tarfile.TarError, OSError) as exc:
            errors(exc)
        finally:
            stream.close()
        if errors.failed:
            builder.count("shards_with_read_errors")
        shard.flush(builder, split)
        if builder.full:
            return
