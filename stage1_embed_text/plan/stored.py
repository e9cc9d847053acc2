"""Read a stored stage-1 plan shard by shard (:mod:`stage1_embed_text.plan.files` describes the files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests.schema import RowFetcher
from pipeline.cache.files import KEY, ROW, CacheFiles
from pipeline.cache.store import CacheError, CacheLayout
from stage1_embed_text.encode.prompts import is_absent
from stage1_embed_text.plan.files import (
    GROUP_COLUMNS,
    PLAN_FORMAT,
    SAMPLE,
    digest_column,
    owner_column,
    read_plan_info,
    rows_schema,
)


class StoredPlan:
    """Read a stored plan shard by shard (each process reads only the shards it computes).

    Args:
        cache_dir: a cache directory holding ``plan/``.

    Raises:
        pipeline.cache.store.CacheError: no plan, or one of another format.
    """

    def __init__(self, cache_dir: str | Path):
        self.files = CacheFiles(cache_dir)
        info = read_plan_info(self.files)
        if info is None:
            raise CacheError(f"{cache_dir} holds no stage-1 plan of format {PLAN_FORMAT} (plan/plan.json)")
        self.info = info
        self._rows = pq.ParquetFile(self.files.plan_rows)
        self._keys = pq.ParquetFile(self.files.plan_keys)
        self._last: tuple[int, pa.Table] | None = None  # the shard being worked on: read once, used by every step

    @property
    def groups(self) -> tuple[str, ...]:
        return self.info.groups

    @property
    def layout(self) -> CacheLayout:
        return self.info.layout

    def rows(self, shard: int) -> pa.Table:
        """Shard ``shard``'s rows: ``row``, ``sample``, ``{g}_digest``, ``{g}_owner`` (see module docstring)."""
        if self.info.n_rows == 0:
            return rows_schema(self.groups).empty_table()
        if self._last is None or self._last[0] != shard:
            self._last = (shard, self._rows.read_row_group(shard))
        return self._last[1]

    def owner(self, shard: int) -> np.ndarray:
        """``int64 [n, G]``: owner row of each group's text of the shard's ``n`` rows (``-1`` if absent)."""
        t = self.rows(shard)
        return np.stack([t.column(owner_column(g)).to_numpy() for g in self.groups], axis=1).reshape(-1, len(self.groups))

    def keys(self, shard: int) -> tuple[pa.Array, np.ndarray]:
        """Keys whose rows lie in shard ``shard`` (ordered by row, then manifest order) and those rows (``int64``)."""
        if self.info.n_rows == 0:
            return pa.array([], pa.string()), np.zeros(0, np.int64)
        t = self._keys.read_row_group(shard)
        return t.column(KEY).combine_chunks(), t.column(ROW).to_numpy()

    def texts(self, shard: int, local_rows: np.ndarray, fetcher: RowFetcher) -> list[dict[str, str | None]]:
        """The captions of rows ``local_rows`` (indices into the shard) as ``{group: caption or None}``, as the
        manifest holds them (the encoder cleans what it embeds, SPEC §2.1).

        Texts are read from the manifest at each row's first sample. A manifest rewritten after planning is caught
        before any shard is embedded (its parts' sizes and times differ from :attr:`PlanInfo.inputs`, so the job
        plans again and the plan hash check refuses the cache); here a text whose presence differs from the plan
        is refused as well.

        Raises:
            pipeline.cache.store.CacheError: a text is present where the plan has none, or the reverse.
        """
        t = self.rows(shard)
        samples = t.column(SAMPLE).to_numpy()[local_rows]
        captions = fetcher.take(samples)
        out = [{} for _ in range(len(local_rows))]
        for g in self.groups:
            planned = ~pc.is_null(t.column(digest_column(g))).to_numpy(zero_copy_only=False)[local_rows]
            for k, caption in enumerate(captions.column(GROUP_COLUMNS[g]).to_pylist()):
                if is_absent(caption) == planned[k]:
                    raise CacheError(
                        f"manifest row {int(samples[k])} no longer matches the stored plan ({g} caption changed); "
                        "the manifest was modified after planning: embed into a new cache directory"
                    )
                out[k][g] = caption
        return out

    def sha1_hex(self, shard: int, local_rows: np.ndarray) -> dict[str, list[str | None]]:
        """Per group, the hex SHA-1 of the texts of rows ``local_rows`` of the shard (``None`` if absent)."""
        t = self.rows(shard)
        out = {}
        for g in self.groups:
            values = t.column(digest_column(g)).to_pylist()
            out[g] = [None if values[j] is None else values[j].hex() for j in local_rows.tolist()]
        return out
