"""WebDataset / img2dataset shards (``{key}.jpg|jpeg|png|webp``, ``{key}.txt``, ``{key}.json``) -> manifest.

Inputs are tar shards given as paths, brace patterns, folders, or webdataset ``gopen`` URLs
(``file:///data/00000.tar``, ``pipe:cat /data/00000.tar``, ``https://...``), and optionally FLAME recaption
files (``--long-captions``/``--short-captions``: a JSON list, or JSON lines, of
``{"__key__": ..., "<caption field>": ...}``) joined on the key.

The build runs in five steps (their code: :mod:`manifests.wds`), none of which holds the data set in memory:

1. **Shards**, one task per shard, ``workers`` processes: the tar is streamed with webdataset's ``gopen`` +
   ``tar_file_iterator``; members are grouped **by key within the shard** (not by adjacency: webdataset's
   ``group_by_keys`` would cut a ``.txt`` stored after another key's members off its image); every image is
   decoded as it streams past (:func:`manifests.images.decode_image`) and only its verdict is kept. The
   shard's samples are staged as one Parquet file; the task returns their 128-bit key digests (BLAKE2b) and
   skip flags.
2. **Recaptions**, one task per file in the same pool: the file is streamed once with ijson into ``P``
   Parquet bucket files by key digest (``P`` = :func:`~manifests.wds.recaptions.recaption_buckets`: file
   size / 32 MiB, at most 256).
3. **Duplicate keys** across all shards: the digests are sorted (numpy) and equal neighbours grouped.
4. **Join**, per recaption file and bucket: that bucket's key digests against the usable samples whose
   digest falls in the bucket (``pyarrow.Table.join``); the captions of the matches are read and written
   sorted by sample row.
5. **Parts**: one manifest part per shard, in shard order, its recaptions taken from the ``P`` sorted bucket
   outputs by a merge. The parts and ``manifest.json`` are identical for any ``workers``.

Memory does not grow with the number or length of the recaptions. Per sample, the main process holds 18
bytes (16-byte key digest, 2 flags) and, while duplicates are sorted or samples are bucketed, about 32 bytes
more (sort indices, digest copies): at most ~0.75 GB at 15M samples, besides the imported libraries. The
recaption store and join are bounded as :mod:`manifests.wds.recaptions` says; the part writer holds one
shard's rows and one row group of recaptions per bucket; a shard task holds one shard's member names and
captions, never its image bytes. Intermediate files live in ``<out>/.staging`` and are deleted at the end,
also on error. A key digest collision (2^-128 per pair) would be caught when a part is written
(ManifestError), never written as a wrong pairing.

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

import argparse
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from manifests.common import ON_DUPLICATE, STAGING_DIR
from manifests.registry import common_options, register_options, register_source
from manifests.schema import ManifestError, ManifestInfo
from manifests.wds import recaptions as recaption_store
from manifests.wds import shards as shard_reader
from manifests.wds.parts import count, publish, write_parts
from manifests.wds.pool import process_pool
from manifests.wds.recaptions import RECAPTION_COLUMNS, RecaptionTask, join_recaptions, stream_recaptions
from manifests.wds.samples import Samples, read_shards, resolve_duplicates
from manifests.wds.shards import expand_shards

# what a worker process runs (read_shard, stream_recaptions) and imports on first use: preloaded once
_WORKER_MODULES = (shard_reader.__name__, recaption_store.__name__, *shard_reader.WORKER_IMPORTS)


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
        shards: shard paths, brace patterns, folders or ``gopen`` URLs (see
            :func:`manifests.wds.shards.expand_shards`), in order.
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
    _check_arguments(on_duplicate, limit, workers)
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
            column: RecaptionTask(str(path), caption_field, column, recaption_store.recaption_buckets(path),
                                  str(stage / "recaptions" / column), progress=workers == 1)
            for column, path in recaptions.items()
        }
        build = _Build(urls, out_dir, stage, split, on_duplicate, limit, json_caption_field, workers, tasks)
        info = build.run(source)
        publish(out_dir, stage, info)
        return info
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _check_arguments(on_duplicate: str, limit: int | None, workers: int) -> None:
    if on_duplicate not in ON_DUPLICATE:
        raise ManifestError(f"on_duplicate must be one of {ON_DUPLICATE}, got {on_duplicate!r}")
    if limit is not None and limit < 1:
        raise ManifestError(f"limit must be at least 1, got {limit}")
    if workers < 1:
        raise ManifestError(f"workers must be at least 1, got {workers}")


@dataclass
class _Build:
    """One build's arguments (as :func:`build_webdataset_manifest` checked them) and its steps."""

    urls: list[str]
    out_dir: Path
    stage: Path
    split: str
    on_duplicate: str
    limit: int | None
    json_caption_field: str
    workers: int
    tasks: dict[str, RecaptionTask]  # per recaption column

    def run(self, source: dict) -> ManifestInfo:
        """Steps 1-5 into ``stage``; returns the manifest info (its parts staged in ``stage/parts``).

        Raises:
            ManifestError: no usable row (see :func:`build_webdataset_manifest` for the other errors).
        """
        samples, dropped, coverage = self._read()
        usable = ~(samples.skipped | dropped)
        joined = {
            column: join_recaptions(column, task, samples.digests, usable, self.stage / "joined" / column,
                                    self.on_duplicate, coverage)
            for column, task in self.tasks.items()
        }
        del usable
        parts = write_parts(samples, dropped, joined, self.urls, self.out_dir, self.stage, self.split,
                            coverage)
        seen = len(samples.digests)
        rows = sum(pq.read_metadata(self.stage / "parts" / Path(p).name).num_rows for p in parts)
        if not rows:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(coverage.items())) or "no samples in the shards"
            raise ManifestError(
                f"no usable rows in {len(self.urls)} shard(s) ({seen} samples read; {reasons})"
            )
        return ManifestInfo(
            source=source,
            counts={self.split: rows, "total": rows},
            coverage={"samples_seen": seen, **dict(sorted(coverage.items()))},
            parts=parts,
        )

    def _read(self) -> tuple[Samples, np.ndarray, dict[str, int]]:
        """Steps 1-3 in the worker pool: ``(samples, dropped duplicates (bool per sample), coverage)``."""
        with process_pool(self.workers, _WORKER_MODULES) as pool:
            jobs = {column: pool.apply_async(stream_recaptions, (task,))
                    for column, task in self.tasks.items()}

            def check() -> None:  # surface a failed recaption file while shards are still being read
                for job in jobs.values():
                    if job.ready() and not job.successful():
                        job.get()

            samples = read_shards(pool, self.urls, self.stage, self.limit, self.json_caption_field,
                                  2 * self.workers, check)
            coverage = dict(samples.counts)
            dropped = resolve_duplicates(samples, self.stage, self.on_duplicate, coverage)
            for column, job in jobs.items():
                count(coverage, f"{column}_bad_entry", job.get().bad_entries)
        return samples, dropped, coverage


# ---------------------------------------------------------------- flame manifest webdataset


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


@register_options("webdataset", rank=20)
def _add_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--long-captions",
                       help="FLAME long recaptions: JSON list or JSON lines of {'__key__': ..., FIELD: ...}")
    group.add_argument("--short-captions", help="FLAME short recaptions (same format)")
    group.add_argument("--caption-field", default="minicpm", help="caption field in the recaption JSON files")
    group.add_argument(
        "--json-caption-field", default="caption",
        help="field of a sample's .json used as raw caption if it has no .txt (default: caption)",
    )
    group.add_argument("--workers", type=_positive_int, default=1,
                       help="processes reading tar shards in parallel (default: 1); same output for any N")


@register_source("webdataset", rank=20,
                 inputs="tar shards: files, brace patterns (``data/{00000..00009}.tar``) or folders")
def _build_from_args(args: argparse.Namespace) -> ManifestInfo:
    return build_webdataset_manifest(
        args.inputs, args.out, long_captions=args.long_captions, short_captions=args.short_captions,
        caption_field=args.caption_field, json_caption_field=args.json_caption_field,
        workers=args.workers, **common_options(args),
    )
