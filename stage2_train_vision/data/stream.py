"""Streamed training pairs (``data.mode = "stream"``): manifest Parquet parts read in turn, decoded on demand.

Each epoch shuffles the parts, cuts the resulting sequence of usable rows into ``world`` equal row ranges (so
every process runs the same number of steps, whatever the part sizes), and process ``r`` reads its range
through a seeded shuffle buffer and decodes only what it trains on (:class:`StreamPairs`). Which rows are usable
is decided up front, per part, by :func:`stage2_train_vision.data.samples.trainable_rows` (a key with a cache row
that has a present facet), both when the parts are counted (:func:`stream_shards`) and when they are read. An
image that fails to decode marks its batch slot invalid. :func:`stage2_train_vision.data.pairs.build_training_data`
chooses between this and the in-memory source.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from manifests.schema import iter_part, read_manifest_info
from pipeline.cache.store import CacheReader
from stage2_train_vision.config import DataConfig
from stage2_train_vision.data.samples import (
    IMAGE_COLUMNS,
    IMAGE_ERRORS,
    DataError,
    check_overlap,
    collate,
    decode,
    make_sample,
    sample_seed,
    split_keys,
    trainable_rows,
)

log = logging.getLogger(__name__)


@dataclass
class StreamShard:
    """One manifest part: its path and how many of its split's keys are trainable (:func:`trainable_rows`)."""

    path: Path
    n_valid: int


class StreamPairs(IterableDataset):
    """Streamed batches (``batch_size=None`` in the DataLoader): manifest parts read in turn, rows shuffled in
    a seeded buffer, images decoded only for the batches this process and worker produce.

    Epoch ``e``: the parts are shuffled by ``(seed, e)``; their usable rows (split and cache filters passed), in
    that order, form one sequence of ``n`` rows, and process ``rank`` takes rows ``[rank * q, (rank + 1) * q)``
    of it, ``q = n // world`` (a part may be shared by two processes; the last ``n % world`` rows sit the epoch
    out). Those rows go through a buffer of ``buffer`` rows seeded by ``(seed, e, rank)``; batch ``b`` is rows
    ``[b * B, (b + 1) * B)`` of that stream and is built by worker ``(b - start) % workers``. Every process
    yields :meth:`steps` batches in every epoch. Samples of a batch are seeded by
    ``(seed, epoch, rank, position)``.

    Raises:
        DataError: (when iterating) a part has fewer usable rows than counted when the run started (the manifest
            or cache changed under a running job).
    """

    def __init__(
        self, cfg: DataConfig, shards: list[StreamShard], reader: CacheReader, transform: Callable,
        batch_size: int, rank: int, world: int, seed: int, size: int, multiple: int = 1,
    ):
        self.cfg, self.shards, self.reader, self.transform = cfg, shards, reader, transform
        self.batch_size, self.rank, self.world, self.seed, self.size = batch_size, rank, world, seed, size
        self.multiple = multiple
        self.n = sum(s.n_valid for s in shards)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def rows_per_process(self) -> int:
        """``q = n // world``: usable rows each process reads per epoch."""
        return self.n // self.world

    def steps(self, epoch: int) -> int:
        """Batches per process in ``epoch``: ``q // B`` rounded down to a multiple of ``multiple`` (the
        accumulation steps); the same on every process and in every epoch."""
        return self.rows_per_process() // self.batch_size // self.multiple * self.multiple

    def ranges(self, epoch: int, rank: int | None = None) -> list[tuple[StreamShard, int, int]]:
        """The row ranges process ``rank`` (default: this one) reads in ``epoch``: ``(part, first, stop)`` with
        ``first``/``stop`` counted in that part's usable rows; their lengths sum to :meth:`rows_per_process`."""
        rank = self.rank if rank is None else rank
        q = self.rows_per_process()
        lo, hi = rank * q, (rank + 1) * q
        order = np.random.default_rng(sample_seed(self.seed, epoch)).permutation(len(self.shards))
        out, offset = [], 0
        for i in order.tolist():
            shard = self.shards[i]
            first, stop = max(lo, offset) - offset, min(hi, offset + shard.n_valid) - offset
            if first < stop:
                out.append((shard, first, stop))
            offset += shard.n_valid
        return out

    def _part_rows(self, shard: StreamShard, first: int, stop: int) -> Iterator[dict[str, Any]]:
        """Usable rows ``[first, stop)`` of one part in file order (:func:`trainable_rows`), each with ``row`` = its
        cache row."""
        seen = 0  # usable rows of this part passed so far
        for part in iter_part(shard.path, IMAGE_COLUMNS, batch_rows=1024):
            if seen >= stop:
                return
            part = part.filter(pc.equal(part["split"], self.cfg.split))
            rows, _ = trainable_rows(self.reader, part.column("key"))  # skips were counted by stream_shards
            ok = rows >= 0
            n_ok = int(ok.sum())
            a, b = max(first - seen, 0), min(stop - seen, n_ok)
            seen += n_ok
            if a >= b:
                continue
            part, rows = part.filter(pa.array(ok)).slice(a, b - a), rows[ok][a:b]
            for row, r in zip(part.to_pylist(), rows.tolist()):
                row["row"] = r
                yield row
        if seen < stop:
            raise DataError(
                f"manifest part {shard.path} has {seen} usable rows now but {shard.n_valid} when the run started; "
                "was the manifest or the cache changed under a running job?"
            )

    def _rows(self, epoch: int) -> Iterator[dict[str, Any]]:
        """This process's rows of ``epoch`` through webdataset's shuffle buffer (:attr:`DataConfig.shuffle_buffer`
        rows, filled before the first row leaves, seeded by ``(seed, epoch, rank)``): :meth:`rows_per_process`."""
        rows = (row for shard, first, stop in self.ranges(epoch) for row in self._part_rows(shard, first, stop))
        size = max(1, self.cfg.shuffle_buffer)
        yield from wds.shuffle(size, initial=size, seed=sample_seed(self.seed, epoch, self.rank))(rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        steps = self.steps(self.epoch)
        rows = self._rows(self.epoch)
        for b in range(steps):
            batch_rows = [next(rows) for _ in range(self.batch_size)]
            if b >= self.start and (b - self.start) % workers == worker:
                yield self._batch(batch_rows, b)

    def _batch(self, batch_rows: list[dict[str, Any]], b: int) -> dict[str, Any]:
        vectors, mask = self.reader.read_rows(np.array([r["row"] for r in batch_rows], np.int64))
        samples = []
        for j, row in enumerate(batch_rows):
            reason, image = None, None
            try:
                image = decode(row, self.cfg.manifest)
            except IMAGE_ERRORS as exc:
                reason = "bad_image"
                log.warning("skipping %s: %s", row["key"], exc)
            seed = sample_seed(self.seed, self.epoch, self.rank, b * self.batch_size + j)
            samples.append(
                make_sample(row["key"], image, vectors[j], mask[j], self.transform, self.cfg.positives, seed, self.size, reason)
            )
        return collate(samples)


def stream_shards(cfg: DataConfig, reader: CacheReader) -> tuple[list[StreamShard], Counter]:
    """The manifest parts with their trainable-row counts, and the split's skipped keys counted by reason
    (``missing_vector``, ``no_facet``: :func:`trainable_rows`, the rule :meth:`StreamPairs._part_rows` reads by).

    Raises :class:`DataError` for an empty split or no keys in common.
    """
    info = read_manifest_info(cfg.manifest)
    counted = _counts_from_cache(cfg, reader, info)
    if counted is not None:
        return counted
    shards, skipped, n_split = [], Counter({"missing_vector": 0}), 0  # named even when 0, as the recorded path does
    for part in info.parts:
        path = Path(cfg.manifest) / part
        table = pq.read_table(path, columns=["key", "split"])
        keys = table.filter(pc.equal(table["split"], cfg.split)).column("key")
        rows, why = trainable_rows(reader, keys)
        n_ok = int((rows >= 0).sum())
        n_split += len(keys)
        skipped.update(why)
        if n_ok:
            shards.append(StreamShard(path, n_ok))
    if n_split == 0:
        split_keys(cfg.manifest, cfg.split)
    check_overlap(n_split, skipped, cfg.manifest, reader.dir, cfg.split)
    return shards, skipped


def embedded_from(manifest: str | Path, extra: dict) -> bool | None:
    """Whether ``manifest`` is the one stage 1 embedded the cache from, by the job's record in ``meta.json``
    ``extra`` (the manifest path and each part's name, size and modification time); ``None`` without a record."""
    recorded = extra.get("manifest_parts")
    if not recorded or not extra.get("manifest"):
        return None
    root = Path(manifest).resolve()
    if str(root) != extra["manifest"]:
        return False
    for name, size, mtime, *_ in recorded:
        st = (root / name).stat() if (root / name).exists() else None
        if st is None or (st.st_size, st.st_mtime_ns) != (size, mtime):
            return False
    return True


def _counts_from_cache(cfg: DataConfig, reader: CacheReader, info) -> tuple[list[StreamShard], Counter] | None:
    """:func:`stream_shards` without a key lookup when the cache was built from this very manifest: stage 1 records
    every part's name, size, modification time and keys per split (``meta.json`` ``extra.manifest_parts``).
    ``None`` when that record is absent or does not match the parts on disk (another manifest, a rewritten part,
    a job with ``--limit``, or one planned on another split).

    Every key stage 1 kept has a row with a present facet (the planner keeps only samples with a caption, and a
    present caption's facets are all present), so the recorded counts are the :func:`trainable_rows` counts and
    nothing is ``no_facet``; were it otherwise, reading the part would find fewer rows and raise."""
    extra = reader.meta.extra
    recorded = extra.get("manifest_parts")
    if (not embedded_from(cfg.manifest, extra) or extra.get("limit") is not None
            or extra.get("split") not in (None, cfg.split) or [r[0] for r in recorded] != list(info.parts)):
        return None
    shards, n_ok = [], 0
    for part, (_, _, _, kept) in zip(info.parts, recorded):
        n = int(kept.get(cfg.split, 0))
        n_ok += n
        if n:
            shards.append(StreamShard(Path(cfg.manifest) / part, n))
    n_split = int(info.counts.get(cfg.split, 0))
    if n_split == 0:
        split_keys(cfg.manifest, cfg.split)
    if not shards:
        return None  # let the counting path name the problem
    return shards, Counter({"missing_vector": n_split - n_ok})
