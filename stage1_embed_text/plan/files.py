"""The stored form of a stage-1 plan (SPEC §2.6, §11): file columns, :class:`PlanInfo` (``plan/plan.json``).

A plan lives in the cache directory (:class:`pipeline.cache.files.CacheFiles`): ``plan.json`` (counts, layout,
hash, the inputs it was made from), ``rows.parquet`` (per row: the manifest position of its first sample, each
group's text SHA-1 and owner row) and ``keys.parquet`` (key, row, ordered by row); Parquet row group ``s`` of both
files is cache shard ``s``. :mod:`stage1_embed_text.plan.planner` writes them, :mod:`stage1_embed_text.plan.stored`
reads them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from manifests.schema import CAPTION_COLUMNS
from pipeline.cache.files import ROW, CacheFiles
from pipeline.cache.store import CacheLayout

PLAN_FORMAT = 2
GROUP_COLUMNS = {column.removesuffix("_caption"): column for column in CAPTION_COLUMNS}
"""Prompt group -> the manifest column holding its caption (``raw`` -> ``raw_caption``, ...)."""
DIGEST_BYTES = 20  # SHA-1 of a cleaned text
SAMPLE = "sample"  # plan column: manifest position of a row's first sample


def digest_column(group: str) -> str:
    """Plan column of a group's text SHA-1 (``fixed_size_binary(20)``, null if absent)."""
    return f"{group}_digest"


def owner_column(group: str) -> str:
    """Plan column of the row that embeds a group's text (``int64``, ``-1`` if absent)."""
    return f"{group}_owner"


@dataclass
class PlanInfo:
    """What ``plan/plan.json`` holds.

    Attributes:
        groups: group names in the prompt set's storage order (e.g. ``("raw", "short", "long")``).
        n_samples: manifest rows considered (after ``split`` and ``limit``).
        n_keys: kept sample keys (at least one caption); n_rows: distinct caption sets = cache rows.
        n_empty: samples without any caption (no row, not in the cache index); empty_examples: up to 3 keys.
        n_unique_texts: packed sequences the job embeds (one per distinct group text).
        absent: ``{group: rows whose text of that group is absent}``.
        layout: rows per shard / chunk and the plan hash.
        inputs: what the plan was made from (manifest, its parts' sizes and times, split, limit, prompt set);
            a job whose inputs are equal reuses the stored plan instead of planning again.
        kept_per_part: per manifest part (``inputs["parts"]`` order), ``{split: kept samples}``: how many keys of
            each split the cache holds, so that a reader of the same manifest needs no key lookup to count them.
    """

    groups: tuple[str, ...]
    n_samples: int
    n_keys: int
    n_rows: int
    n_empty: int
    empty_examples: list[str]
    n_unique_texts: int
    absent: dict[str, int]
    layout: CacheLayout
    inputs: dict[str, Any] = field(default_factory=dict)
    kept_per_part: list[dict[str, int]] = field(default_factory=list)
    format: int = PLAN_FORMAT

    @property
    def plan_hash(self) -> str:
        return self.layout.plan_hash

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["groups"] = list(self.groups)
        return json.dumps(d, indent=2, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> PlanInfo:
        d = json.loads(text)
        d["groups"] = tuple(d["groups"])
        d["layout"] = CacheLayout(**d["layout"])
        return cls(**d)



def read_plan_info(files: CacheFiles) -> PlanInfo | None:
    """The :class:`PlanInfo` of the plan stored in ``files``, or ``None`` if there is no complete plan of this
    format (a missing file, unreadable JSON or another :data:`PLAN_FORMAT`)."""
    if not (files.plan_json.exists() and files.plan_rows.exists() and files.plan_keys.exists()):
        return None
    try:
        info = PlanInfo.from_json(files.plan_json.read_text(encoding="utf-8"))
    except (ValueError, TypeError, KeyError):
        return None
    return info if info.format == PLAN_FORMAT else None


def digest_schema(groups: tuple[str, ...]) -> pa.Schema:
    """Schema of the planner's per-sample digest file: one ``fixed_size_binary(20)`` column per group."""
    return pa.schema([pa.field(digest_column(g), pa.binary(DIGEST_BYTES)) for g in groups])


def rows_schema(groups: tuple[str, ...]) -> pa.Schema:
    """Schema of ``rows.parquet``: ``row``, ``sample``, then per group ``{g}_digest`` and ``{g}_owner``."""
    fields = [pa.field(ROW, pa.int64()), pa.field(SAMPLE, pa.int64())]
    for g in groups:
        fields += [pa.field(digest_column(g), pa.binary(DIGEST_BYTES)), pa.field(owner_column(g), pa.int64())]
    return pa.schema(fields)
