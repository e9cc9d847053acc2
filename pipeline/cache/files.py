"""Where everything of a stage-1 cache lives on disk, and the schema of its key index (SPEC §3).

This module is the one owner of the cache's file layout; every other module asks it for paths and column names::

    meta.json                     identity + row layout (:class:`pipeline.cache.store.CacheMeta`)
    store.zarr/vectors            float16 [N, F, D], one Zarr shard per cache shard
    store.zarr/mask               bool    [N, F] facet presence
    index/shard-SSSSS.parquet     key -> row of the rows of shard S, per group text SHA-1, tokens, truncation
    done/shard-SSSSS.json         finished marker of shard S, written last, with the SHA-256 of its vector,
                                  mask and index files (:mod:`pipeline.cache.verify`)
    plan/plan.json                the job plan's counts, layout and hash (:mod:`stage1_embed_text.plan`)
    plan/rows.parquet             one row per cache row: first manifest sample, per group text SHA-1 and owner row;
                                  Parquet row group S = cache shard S
    plan/keys.parquet             (key, row) of every kept sample, ordered by row; row group S = cache shard S
    writer.lock                   the running job's lock (host, pid), removed when it ends
    lookup/                       the compact key -> row lookup and facet mask readers memory-map
                                  (:mod:`pipeline.cache.lookup`), built once when the cache is complete

Temporary files are hidden (``.NAME...``) in the directory of the file they replace and are never read.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from pipeline.paths import local_dir

META_JSON = "meta.json"
STORE = "store.zarr"
INDEX_DIR = "index"
DONE_DIR = "done"
PLAN_DIR = "plan"
LOOKUP_DIR = "lookup"

_SHARD = "shard-{:05d}"  # file stem of shard S in index/ and done/

KEY = "key"
ROW = "row"


def sha1_column(group: str) -> str:
    """Index column of a group's cleaned-text SHA-1 (hex string, null if absent), e.g. ``"long_sha1"``."""
    return f"{group}_sha1"


def tokens_column(group: str) -> str:
    """Index column of a group's packed-sequence length (``int32``, 0 if absent), e.g. ``"raw_tokens"``."""
    return f"{group}_tokens"


def truncated_column(group: str) -> str:
    """Index column of whether a group's caption tokens were cut (``bool``), e.g. ``"short_truncated"``."""
    return f"{group}_truncated"


def index_schema(groups: tuple[str, ...]) -> pa.Schema:
    """Schema of an index part: ``key``, ``row``, then per group SHA-1, tokens and truncation flag."""
    fields = [pa.field(KEY, pa.string()), pa.field(ROW, pa.int64())]
    for g in groups:
        fields += [
            pa.field(sha1_column(g), pa.string()),
            pa.field(tokens_column(g), pa.int32()),
            pa.field(truncated_column(g), pa.bool_()),
        ]
    return pa.schema(fields)


class CacheFiles:
    """Paths of one cache directory (nothing is created or read here).

    Args:
        root: the cache directory.
    """

    def __init__(self, root: str | Path):
        self.root = local_dir(root, "cache")

    @property
    def meta(self) -> Path:
        return self.root / META_JSON

    @property
    def store(self) -> Path:
        return self.root / STORE

    @property
    def vectors(self) -> Path:
        """The Zarr array directory of the vectors (``store.zarr/vectors``)."""
        return self.store / "vectors"

    @property
    def index_dir(self) -> Path:
        return self.root / INDEX_DIR

    @property
    def done_dir(self) -> Path:
        return self.root / DONE_DIR

    def index_part(self, shard: int) -> Path:
        return self.index_dir / f"{_SHARD.format(shard)}.parquet"

    def marker(self, shard: int) -> Path:
        return self.done_dir / f"{_SHARD.format(shard)}.json"

    def finished_shards(self) -> set[int]:
        """Numbers of the shards whose finished marker is there (empty when ``done/`` is absent); one directory
        listing."""
        if not self.done_dir.exists():
            return set()
        return {int(p.stem.removeprefix("shard-")) for p in self.done_dir.glob("shard-*.json")}

    @property
    def plan_dir(self) -> Path:
        return self.root / PLAN_DIR

    @property
    def plan_json(self) -> Path:
        return self.plan_dir / "plan.json"

    @property
    def plan_rows(self) -> Path:
        return self.plan_dir / "rows.parquet"

    @property
    def plan_keys(self) -> Path:
        return self.plan_dir / "keys.parquet"

    def plan_ready(self, token: str) -> Path:
        """Hidden marker by which the planning process tells the others that the plan of run ``token`` is there."""
        return self.plan_dir / f".ready-{token}.json"

    @property
    def lock(self) -> Path:
        """The writing job's lock (:class:`pipeline.cache.store.CacheLock`), present only while a job runs."""
        return self.root / "writer.lock"

    @property
    def lookup_dir(self) -> Path:
        return self.root / LOOKUP_DIR

    def temp_dirs(self) -> list[Path]:
        """Directories whose hidden files are temporaries of an interrupted writer."""
        return [self.index_dir, self.done_dir, self.plan_dir]
