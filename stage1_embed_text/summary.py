"""The summary of a stage-1 job (``flame embed`` prints it): counts of the whole cache, work and speed of this run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from pipeline.cache.files import ROW, CacheFiles, truncated_column
from stage1_embed_text.config import EmbedConfig
from stage1_embed_text.encode.prompts import PromptSet
from stage1_embed_text.plan.stored import StoredPlan


@dataclass
class EmbedSummary:
    """What a job did (whole cache for the counts; this run for work and speed).

    Attributes:
        cache: cache directory.
        samples: manifest rows considered; empty_samples: those without any caption (not in the cache).
        keys: keys in the cache index; rows: unique rows N; dedup_ratio: keys / rows.
        unique_texts: packed sequences the plan embeds (one per distinct group text).
        absent_texts: ``{group: rows whose text of that group is absent}``.
        absent_facets: facet slots ``[row, facet]`` masked absent (each absent text masks its group's facets).
        truncated_rows: rows with at least one cut caption; truncated_texts: per group.
        shards: total shards; shards_written / shards_skipped: by this run (all ranks).
        sequences, tokens: embedded by this run (all ranks).
        tokens_per_s: tokens / encode_s; encode_s: seconds the slowest rank spent on its shards (encoding,
            copying, writing; model loading and planning excluded).
        wall_s: seconds from start to the end barrier (model loading included).
        world_size: processes.
    """

    cache: str
    samples: int
    empty_samples: int
    keys: int
    rows: int
    dedup_ratio: float
    unique_texts: int
    absent_texts: dict[str, int]
    absent_facets: int
    truncated_rows: int
    truncated_texts: dict[str, int]
    shards: int
    shards_written: int
    shards_skipped: int
    sequences: int
    tokens: int
    tokens_per_s: float
    encode_s: float
    wall_s: float
    world_size: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarize(
    config: EmbedConfig, plan: StoredPlan, prompt_set: PromptSet, totals: dict[str, float], world: int, wall: float
) -> EmbedSummary:
    """The job's summary: counts of the whole cache (from the plan and every index part on disk), this run's work
    (``totals``: ``written``, ``skipped``, ``sequences``, ``tokens``, ``encode_s`` of all ranks), ``world``
    processes and ``wall`` seconds."""
    info = plan.info
    files = CacheFiles(config.out)
    trunc = dict.fromkeys(plan.groups, 0)
    any_trunc = 0
    for s in range(plan.layout.n_shards):  # one index part at a time; a row's keys all lie in its shard's part
        if not files.index_part(s).exists():
            continue
        part = pq.read_table(files.index_part(s), columns=[ROW] + [truncated_column(g) for g in plan.groups])
        _, first = np.unique(part.column(ROW).to_numpy(), return_index=True)
        flags = np.stack([part.column(truncated_column(g)).to_numpy(zero_copy_only=False)[first] for g in plan.groups])
        for g, f in zip(plan.groups, flags):
            trunc[g] += int(f.sum())
        any_trunc += int(flags.any(axis=0).sum())
    return EmbedSummary(
        cache=str(config.out),
        samples=info.n_samples,
        empty_samples=info.n_empty,
        keys=info.n_keys,
        rows=info.n_rows,
        dedup_ratio=round(info.n_keys / max(info.n_rows, 1), 4),
        unique_texts=info.n_unique_texts,
        absent_texts=info.absent,
        absent_facets=sum(n * len(prompt_set.group(g).facet_names) for g, n in info.absent.items()),
        truncated_rows=any_trunc,
        truncated_texts=trunc,
        shards=plan.layout.n_shards,
        shards_written=totals["written"],
        shards_skipped=totals["skipped"],
        sequences=totals["sequences"],
        tokens=totals["tokens"],
        tokens_per_s=round(totals["tokens"] / max(totals["encode_s"], 1e-9), 1),
        encode_s=round(totals["encode_s"], 2),
        wall_s=round(wall, 2),
        world_size=world,
    )
