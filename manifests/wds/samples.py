"""Steps 1 and 3 over all shards: shard tasks in a window, the per-sample state kept, duplicate keys.

The main process keeps 17 bytes per sample (:class:`Samples`: 16-byte key digest, skip flag); the captions and
locations stay in the staged shard files (:func:`stage_file`) and are read back only for an error message.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from manifests.common import DuplicateKeyError
from manifests.wds.digests import duplicate_groups
from manifests.wds.shards import ShardResult, ShardTask, read_shard


@dataclass
class Samples:
    """What the main process keeps of the staged samples: 17 bytes per sample."""

    shards: list[tuple[int, int]] = field(default_factory=list)  # (shard index, samples used), in order
    counts: dict[str, int] = field(default_factory=dict)
    digests: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.uint64))
    skipped: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    @property
    def offsets(self) -> np.ndarray:
        """First global row of each used shard, and the total: ``(len(shards) + 1,)`` int64."""
        return np.concatenate([[0], np.cumsum([n for _, n in self.shards], dtype=np.int64)])


def stage_file(stage: Path, index: int) -> Path:
    """The staged samples of shard number ``index`` (:data:`manifests.wds.shards.STAGE_SCHEMA`)."""
    return stage / "shards" / f"shard-{index:06d}.parquet"


def read_shards(pool: Any, urls: list[str], stage: Path, limit: int | None, json_caption_field: str,
                window: int, check: Callable[[], None]) -> Samples:
    """Step 1 for every shard, at most ``window`` tasks in flight, results taken in shard order.

    Args:
        pool: :func:`manifests.wds.pool.process_pool`'s pool.
        urls: the shards, in order.
        stage: the staging folder (shard files go to ``stage/shards``, which must exist).
        limit: stop after this many samples in shard order (the last shard used is cut); None for all.
        json_caption_field: see :class:`manifests.wds.shards.ShardTask`.
        window: shard tasks submitted ahead of the one being collected.
        check: called after each shard (raises to stop the build, e.g. when a recaption task failed).
    """
    samples = Samples()
    digests, skipped = [], []
    pending: collections.deque = collections.deque()
    next_index = seen = 0
    with tqdm(total=len(urls), desc="read shards", unit="shard", disable=None) as bar:
        while True:
            while next_index < len(urls) and len(pending) < window:
                task = ShardTask(next_index, urls[next_index], str(stage_file(stage, next_index)), limit,
                                 json_caption_field)
                pending.append(pool.apply_async(read_shard, (task,)))
                next_index += 1
            if not pending:
                break
            result: ShardResult = pending.popleft().get()
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


def _locate(samples: Samples, stage: Path, row: int) -> tuple[str, str]:
    """``(key, location)`` of a global sample row, read from its staged shard."""
    offsets = samples.offsets
    i = int(np.searchsorted(offsets, row, side="right")) - 1
    table = pq.read_table(stage_file(stage, samples.shards[i][0]), columns=["key", "location"])
    found = table.slice(row - int(offsets[i]), 1).to_pylist()[0]
    return found["key"], found["location"]


def resolve_duplicates(samples: Samples, stage: Path, on_duplicate: str, coverage: dict[str, int]
                       ) -> np.ndarray:
    """Step 3: the rows dropped as duplicates (``(n,)`` bool, one per sample); counts ``duplicate_keys``.

    Raises:
        DuplicateKeyError: under ``on_duplicate="error"``, naming the repeated key that occurs first in
            source order and the locations of its first two copies.
    """
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
