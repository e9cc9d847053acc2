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

Keys absent from the cache are dropped (and counted) before training; an image that fails to decode is
dropped (memory) or its slot is marked invalid (stream). A key is only ever paired with its own cache row.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from torchvision.transforms.v2 import functional as TF

from manifests.images import UndecodableImageError, load_image
from manifests.schema import ManifestError, read_manifest, read_manifest_info
from pipeline.cache import CacheReader
from pipeline.errors import FlameError
from stage2_train_vision.config import ConfigError, DataConfig

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ["key", "image_path", "image_member", "image_bytes", "split"]
IMAGE_ERRORS = (UndecodableImageError, ManifestError, OSError)


class DataError(FlameError, ValueError):
    """The manifest split is empty, or the manifest and the cache share no keys."""


def sample_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (e.g. ``seed, epoch, index``), independent of call order."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def draw_facets(mask: np.ndarray, positives: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Choose up to ``positives`` distinct present facets of one sample.

    Args:
        mask: ``bool [F]`` facet presence.
        positives: P.
        rng: the sample's generator.

    Returns:
        ``int64 [P]`` facet indices (padding slots repeat facet 0) and ``bool [P]`` validity.
    """
    present = np.flatnonzero(mask)
    k = min(positives, len(present))
    idx = np.zeros(positives, np.int64)
    idx[:k] = rng.choice(present, size=k, replace=False)
    valid = np.zeros(positives, bool)
    valid[:k] = True
    return idx, valid


@dataclass
class Sample:
    """One training example (before collation)."""

    key: str
    image: torch.Tensor  # float32 [3, S, S]
    texts: torch.Tensor  # float32 [P, D]
    text_valid: torch.Tensor  # bool [P]
    image_valid: bool = True
    skip_reason: str | None = None


def make_sample(
    key: str,
    image: torch.Tensor | None,
    vectors: np.ndarray,
    mask: np.ndarray,
    transform: Callable,
    positives: int,
    seed: int,
    size: int,
    skip_reason: str | None = None,
) -> Sample:
    """Draw P facets of ``vectors`` (``[F, D]``, ``mask [F]``) and augment ``image`` (``uint8 [3, H, W]``, or
    ``None`` for a failed decode) with ``transform(image, rng)``, one generator seeded by ``seed`` for both. A
    failed image gives a zero image marked invalid."""
    rng = np.random.default_rng(seed)
    idx, valid = draw_facets(mask, positives, rng)
    texts = torch.from_numpy(np.asarray(vectors[idx], np.float32))
    if image is None:
        return Sample(key, torch.zeros(3, size, size), texts, torch.zeros(positives, dtype=torch.bool), False, skip_reason)
    return Sample(key, transform(image, rng), texts, torch.from_numpy(valid))


def collate(samples: list[Sample]) -> dict[str, Any]:
    """Batch of samples: ``images float32 [B, 3, S, S]``, ``texts float32 [B, P, D]``, ``text_valid bool [B, P]``,
    ``image_valid bool [B]``, ``keys list[str]``, ``skipped dict[str, int]`` (reasons of invalid slots)."""
    return {
        "images": torch.stack([s.image for s in samples]),
        "texts": torch.stack([s.texts for s in samples]),
        "text_valid": torch.stack([s.text_valid for s in samples]),
        "image_valid": torch.tensor([s.image_valid for s in samples]),
        "keys": [s.key for s in samples],
        "skipped": dict(Counter(s.skip_reason for s in samples if s.skip_reason)),
    }


def decode(row: dict[str, Any], manifest_dir: str | Path) -> torch.Tensor:
    """A manifest row's image as ``uint8 [3, H, W]``. Raises one of :data:`IMAGE_ERRORS` if it fails."""
    return TF.pil_to_tensor(load_image(row, manifest_dir))


def split_keys(manifest_dir: str | Path, split: str) -> list[str]:
    """Keys of ``split`` in manifest order. Raises :class:`DataError` naming the splits there are if empty."""
    keys = read_manifest(manifest_dir, columns=["key"], split=split).column("key").to_pylist()
    if not keys:
        counts = read_manifest_info(manifest_dir).counts
        raise DataError(f"manifest {manifest_dir} has no rows in split {split!r} (rows per split: {counts})")
    return keys


def check_overlap(keys: list[str], rows: np.ndarray, manifest_dir: Any, cache_dir: Any) -> None:
    """Raise :class:`DataError` if no manifest key has a cache row (``rows`` all ``-1``)."""
    if len(rows) and (rows >= 0).any():
        return
    raise DataError(
        f"manifest {manifest_dir} and cache {cache_dir} have no keys in common "
        f"({len(keys)} manifest keys, e.g. {keys[:3]}); was the cache built from this manifest?"
    )


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
        transform: ``transform(image, rng)``, e.g. :func:`stage2_train_vision.transforms.train_transform`.
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
    """Read the split, drop keys without a cache row, with no present facet, or whose image fails to decode.

    Returns the dataset and the counts of dropped keys by reason (``missing_vector``, ``no_facet``,
    ``bad_image``). Raises :class:`DataError` for an empty split or no keys in common.
    """
    table = read_manifest(cfg.manifest, columns=IMAGE_COLUMNS, split=cfg.split)
    if table.num_rows == 0:
        split_keys(cfg.manifest, cfg.split)  # raises with the split counts
    keys = table.column("key").to_pylist()
    rows = reader.rows(keys)
    check_overlap(keys, rows, cfg.manifest, reader.dir)
    vectors, mask = reader.load_all()
    skipped: Counter = Counter()
    kept_keys, kept_images, kept_rows = [], [], []
    for i, row in enumerate(table.to_pylist()):
        if rows[i] < 0:
            skipped["missing_vector"] += 1
            continue
        if not mask[rows[i]].any():
            skipped["no_facet"] += 1
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
class StreamShard:
    """One manifest part: its path and how many of its split's keys have a cache row."""

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
        """Usable rows ``[first, stop)`` of one part in file order, each with ``row`` = its cache row."""
        seen = 0  # usable rows of this part passed so far
        for part in pq.ParquetFile(shard.path).iter_batches(batch_size=1024, columns=IMAGE_COLUMNS):
            if seen >= stop:
                return
            part = part.filter(pc.equal(part["split"], self.cfg.split))
            rows = self.reader.rows(part.column("key"))
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
        """This process's rows of ``epoch`` through the shuffle buffer (:meth:`rows_per_process` of them)."""
        rng = np.random.default_rng(sample_seed(self.seed, epoch, self.rank))
        buffer: list[dict[str, Any]] = []
        for shard, first, stop in self.ranges(epoch):
            for row in self._part_rows(shard, first, stop):
                buffer.append(row)
                if len(buffer) >= self.cfg.shuffle_buffer:
                    j = int(rng.integers(len(buffer)))
                    buffer[j], buffer[-1] = buffer[-1], buffer[j]
                    yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

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
            if not mask[j].any():
                reason = "no_facet"
            else:
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
    """The manifest parts with their valid-row counts, and the count of split keys without a cache row.

    Raises :class:`DataError` for an empty split or no keys in common.
    """
    info = read_manifest_info(cfg.manifest)
    counted = _counts_from_cache(cfg, reader, info)
    if counted is not None:
        return counted
    shards, skipped, n_split = [], Counter(), 0
    for part in info.parts:
        path = Path(cfg.manifest) / part
        table = pq.read_table(path, columns=["key", "split"])
        keys = table.filter(pc.equal(table["split"], cfg.split)).column("key")
        n_ok = int((reader.rows(keys) >= 0).sum())
        n_split += len(keys)
        skipped["missing_vector"] += len(keys) - n_ok
        if n_ok:
            shards.append(StreamShard(path, n_ok))
    if n_split == 0:
        split_keys(cfg.manifest, cfg.split)
    if not shards:
        raise DataError(
            f"manifest {cfg.manifest} and cache {reader.dir} have no keys in common ({n_split} keys in split "
            f"{cfg.split!r}); was the cache built from this manifest?"
        )
    return shards, skipped


def _counts_from_cache(cfg: DataConfig, reader: CacheReader, info) -> tuple[list[StreamShard], Counter] | None:
    """:func:`stream_shards` without a key lookup when the cache was built from this very manifest: stage 1 records
    every part's name, size, modification time and keys per split (``meta.json`` ``extra.manifest_parts``).
    ``None`` when that record is absent or does not match the parts on disk (another manifest, a rewritten part,
    a job with ``--limit``, or one planned on another split)."""
    extra = reader.meta.extra
    recorded = extra.get("manifest_parts")
    root = Path(cfg.manifest).resolve()
    if (not recorded or extra.get("manifest") != str(root) or extra.get("limit") is not None
            or extra.get("split") not in (None, cfg.split) or len(recorded) != len(info.parts)):
        return None
    shards, n_ok = [], 0
    for part, (name, size, mtime, kept) in zip(info.parts, recorded):
        path = root / part
        st = path.stat() if path.exists() else None
        if name != part or st is None or (st.st_size, st.st_mtime_ns) != (size, mtime):
            return None
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


@dataclass
class TrainingData:
    """A DataLoader over this process's batches plus what :func:`build_training_data` decided.

    Attributes:
        loader: yields :func:`collate` batches; call :meth:`set_epoch` before iterating each epoch.
        steps_per_epoch: micro-batches per process per epoch (a multiple of ``grad_accum``).
        n_samples: usable samples (memory) or usable rows (stream).
        skipped: keys dropped before training, by reason.
        mode: ``"memory"`` or ``"stream"``.
    """

    loader: DataLoader
    steps_per_epoch: Callable[[int], int]
    n_samples: int
    skipped: Counter = field(default_factory=Counter)
    mode: str = "memory"

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the loader yield epoch ``epoch`` from its batch ``start_batch`` on (resume)."""
        source = self.loader.batch_sampler if self.mode == "memory" else self.loader.dataset
        source.set_epoch(epoch, start_batch)


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
        return TrainingData(loader, lambda epoch: steps, n, skipped, mode)
    shards, skipped = stream_shards(cfg, reader)
    stream = StreamPairs(cfg, shards, reader, transform, batch_size, rank, world, seed, size, grad_accum)
    n = stream.n
    if stream.steps(0) == 0:
        raise DataError(
            f"{n} usable rows are fewer than one global batch ({glob} x {grad_accum} accumulation): "
            f"{stream.rows_per_process()} rows per process for {world} processes"
        )
    loader = DataLoader(stream, batch_size=None, **workers)
    return TrainingData(loader, stream.steps, n, skipped, mode)
