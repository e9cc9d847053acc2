"""Training pairs: manifest images + cache vectors by key (SPEC §5), deterministic and resumable.

Every random choice (epoch order, shuffle buffer, crop, facet draw) is a function of ``(seed, epoch, ...)``
through numpy generators, never of process-global state, so a resumed run sees exactly the batches an
uninterrupted run would, with any number of DataLoader workers.

Two sources share the batch format of :func:`collate`:

- :class:`MemoryPairs`: every image decoded once and held in RAM as ``uint8``; an epoch is a permutation.
- :class:`StreamPairs`: manifest Parquet parts are read in turn; each epoch shuffles the parts, cuts the
  resulting sequence of usable rows into ``world`` equal row ranges (so every process runs the same number of
  steps, whatever the part sizes), and process ``r`` reads its range through a seeded shuffle buffer and
  decodes only what it trains on.

Keys absent from the cache, or whose row has no present facet, are dropped (and counted) before training by
both sources (:func:`stage2_train_vision.data.samples.trainable_rows`); an image that fails to decode is dropped
(memory) or its slot is marked invalid (stream). A key is only ever paired with its own cache row.

This module holds the in-memory source and :func:`build_training_data`; the per-sample pieces both sources share
are :mod:`stage2_train_vision.data.samples`, the stream source :mod:`stage2_train_vision.data.stream`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from manifests.schema import read_manifest, read_manifest_info
from pipeline.cache.store import CacheReader
from stage2_train_vision.config import ConfigError, DataConfig
from stage2_train_vision.data.samples import (
    IMAGE_COLUMNS,
    IMAGE_ERRORS,
    DataError,
    Sample,
    check_overlap,
    collate,
    decode,
    make_sample,
    sample_seed,
    split_keys,
    trainable_rows,
)
from stage2_train_vision.data.stream import StreamPairs, embedded_from, stream_shards

log = logging.getLogger(__name__)


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """This process's batches of one epoch, as lists of ``(epoch, sample index)``.

    The epoch's order is ``permutation(n)`` seeded by ``(seed, epoch)``; global batch ``g`` is
    ``order[g * B * world : (g + 1) * B * world]`` and this process takes its ``rank``-th slice of ``B``.
    Incomplete global batches are dropped. :meth:`set_epoch` chooses the epoch and the first batch.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, steps: int):
        self.n, self.batch_size, self.rank, self.world, self.seed, self.steps = n, batch_size, rank, world, seed, steps
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = np.random.default_rng(sample_seed(self.seed, self.epoch)).permutation(self.n)
        glob = self.batch_size * self.world
        for g in range(self.start, self.steps):
            part = order[g * glob + self.rank * self.batch_size : g * glob + (self.rank + 1) * self.batch_size]
            yield [(self.epoch, int(i)) for i in part]


class MemoryPairs(Dataset):
    """Decoded images and their cache vectors held in RAM; item ``(epoch, index)`` -> :class:`Sample`.

    Args:
        keys: sample keys (``K``), each with its ``images[i]`` ``uint8 [3, H, W]`` and cache row ``rows[i]``.
        vectors / mask: the whole cache, ``float16 [N, F, D]`` / ``bool [N, F]``.
        transform: ``transform(image, rng)``, e.g. :func:`stage2_train_vision.data.transforms.train_transform`.
        positives, seed, size: P, the run seed, the output image side.
    """

    def __init__(self, keys, images, rows, vectors, mask, transform, positives: int, seed: int, size: int):
        self.keys, self.images, self.rows = keys, images, rows
        self.vectors, self.mask = vectors, mask
        self.transform, self.positives, self.seed, self.size = transform, positives, seed, size

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, item: tuple[int, int]) -> Sample:
        epoch, i = item
        r = self.rows[i]
        return make_sample(
            self.keys[i], self.images[i], self.vectors[r], self.mask[r], self.transform, self.positives,
            sample_seed(self.seed, epoch, i), self.size,
        )


def load_memory_pairs(
    cfg: DataConfig, reader: CacheReader, transform: Callable, seed: int, size: int
) -> tuple[MemoryPairs, Counter]:
    """Read the split, drop keys without a cache row or with no present facet (:func:`trainable_rows`), or whose
    image fails to decode.

    Returns the dataset and the counts of dropped keys by reason (``missing_vector``, ``no_facet``,
    ``bad_image``). Raises :class:`DataError` for an empty split or no keys in common.
    """
    table = read_manifest(cfg.manifest, columns=IMAGE_COLUMNS, split=cfg.split)
    if table.num_rows == 0:
        split_keys(cfg.manifest, cfg.split)  # raises with the split counts
    keys = table.column("key").to_pylist()
    rows, skipped = trainable_rows(reader, keys)
    check_overlap(len(keys), skipped, cfg.manifest, reader.dir, cfg.split)
    vectors, mask = reader.load_all()
    kept_keys, kept_images, kept_rows = [], [], []
    for i, row in enumerate(table.to_pylist()):
        if rows[i] < 0:  # counted by trainable_rows
            continue
        try:
            image = decode(row, cfg.manifest)
        except IMAGE_ERRORS as exc:
            skipped["bad_image"] += 1
            log.warning("skipping %s: %s", row["key"], exc)
            continue
        kept_keys.append(row["key"])
        kept_images.append(image)
        kept_rows.append(int(rows[i]))
    data = MemoryPairs(
        kept_keys, kept_images, np.asarray(kept_rows, np.int64), vectors, mask, transform, cfg.positives, seed, size
    )
    return data, skipped

@dataclass
class TrainingData:
    """A DataLoader over this process's batches plus what :func:`build_training_data` decided.

    Attributes:
        loader: yields :func:`collate` batches; call :meth:`set_epoch` before iterating each epoch.
        steps_per_epoch: micro-batches per process per epoch (a multiple of ``grad_accum``).
        n_samples: usable samples (memory) or usable rows (stream).
        skipped: keys dropped before training, by reason.
        mode: ``"memory"`` or ``"stream"`` (for the log; nothing branches on it after it is chosen).
        epochs: what orders an epoch, with ``set_epoch(epoch, start_batch)``: the batch sampler (memory) or the
            streamed dataset.
    """

    loader: DataLoader
    steps_per_epoch: Callable[[int], int]
    n_samples: int
    skipped: Counter = field(default_factory=Counter)
    mode: str = "memory"
    epochs: EpochBatchSampler | StreamPairs | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the loader yield epoch ``epoch`` from its batch ``start_batch`` on (resume)."""
        self.epochs.set_epoch(epoch, start_batch)


def warn_if_manifest_changed(manifest: str | Path, reader: CacheReader) -> bool:
    """Log a warning when ``manifest`` is not the one the cache was embedded from, as stage 1 recorded it (path, and
    each part's size and modification time, ``meta.json`` ``extra``). Samples are paired with vectors by key only,
    so changed captions under the same keys would train against the old captions' vectors. Returns True if it
    warned; caches without the record are not checked."""
    if embedded_from(manifest, reader.meta.extra) is not False:
        return False
    log.warning(
        "%s is not the manifest %s was embedded from (%s, parts as recorded by stage 1): samples are paired "
        "with vectors by key, so captions changed under the same keys would train on the old captions' vectors; "
        "re-embed if the captions changed", Path(manifest).resolve(), reader.dir, reader.meta.extra["manifest"],
    )
    return True


def build_training_data(
    cfg: DataConfig, reader: CacheReader, transform: Callable, size: int, batch_size: int,
    rank: int, world: int, seed: int, grad_accum: int = 1,
) -> TrainingData:
    """Choose memory or stream (``cfg.mode``), build the dataset and a DataLoader of ``batch_size``-image batches.

    Raises:
        DataError: empty split, no keys in common, or fewer samples than one global batch (stream: fewer than
            ``world x batch_size x grad_accum`` usable rows; the message names the rows per process).
        ConfigError: ``cfg.mode`` is not memory, stream or auto.
    """
    mode = cfg.mode
    if mode == "auto":
        n_keys = read_manifest_info(cfg.manifest).counts.get(cfg.split, 0)
        mode = "memory" if n_keys <= cfg.memory_max_samples else "stream"
    if mode not in ("memory", "stream"):
        raise ConfigError(f"data.mode must be memory, stream or auto, not {cfg.mode!r}")
    if rank == 0:
        warn_if_manifest_changed(cfg.manifest, reader)
    workers = dict(num_workers=cfg.num_workers, persistent_workers=False)
    glob = batch_size * world
    if mode == "memory":
        data, skipped = load_memory_pairs(cfg, reader, transform, seed, size)
        steps = (len(data) // glob) // grad_accum * grad_accum
        n = len(data)
        if steps == 0:
            raise DataError(f"{n} usable samples are fewer than one global batch ({glob} x {grad_accum} accumulation)")
        sampler = EpochBatchSampler(n, batch_size, rank, world, seed, steps)
        loader = DataLoader(data, batch_sampler=sampler, collate_fn=collate, **workers)
        return TrainingData(loader, lambda epoch: steps, n, skipped, mode, sampler)
    shards, skipped = stream_shards(cfg, reader)
    stream = StreamPairs(cfg, shards, reader, transform, batch_size, rank, world, seed, size, grad_accum)
    n = stream.n
    if stream.steps(0) == 0:
        raise DataError(
            f"{n} usable rows are fewer than one global batch ({glob} x {grad_accum} accumulation): "
            f"{stream.rows_per_process()} rows per process for {world} processes"
        )
    loader = DataLoader(stream, batch_size=None, **workers)
    return TrainingData(loader, stream.steps, n, skipped, mode, stream)
