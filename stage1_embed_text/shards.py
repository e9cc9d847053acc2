"""One cache shard of a stage-1 job (SPEC §2.6): encode the texts it owns, copy the others, build its index part.

Every text is embedded once per job by the row that owns it (:mod:`stage1_embed_text.plan`); a row whose text
is owned by an earlier shard copies that shard's stored float16 vectors once the shard is finished. The
encoder's batches for a shard depend only on the plan, so a resumed or multi-process run writes the same bytes
as one uninterrupted process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from manifests.schema import RowFetcher
from pipeline.cache.files import KEY, ROW, index_schema, sha1_column, tokens_column, truncated_column
from pipeline.cache.store import CacheWriter
from stage1_embed_text.encode.prompts import GROUPS, PromptSet
from stage1_embed_text.plan.stored import StoredPlan
from stage1_embed_text.ranks import POLL_S

log = logging.getLogger(__name__)


@dataclass
class ShardArrays:
    """One shard's content: vectors ``float16 [n, F, D]``, mask ``bool [n, F]``, tokens ``int32 [n, G]``,
    truncated ``bool [n, G]`` (``n`` = rows of the shard, ``G`` = groups)."""

    vectors: np.ndarray
    mask: np.ndarray
    tokens: np.ndarray
    truncated: np.ndarray


def compute_shard(
    plan: StoredPlan, shard: int, encoder, writer: CacheWriter, fetcher: RowFetcher, bar, work: dict, t_work: float
) -> ShardArrays:
    """Encode the texts shard ``shard`` owns and copy the others from their owner rows.

    Args:
        plan: the stored plan; shard: the shard's number.
        encoder: a stage-1 encoder (``facets``, ``dim``, ``prompt_set``, ``encode``) of either backend.
        writer: the cache's writer (reads rows of earlier, finished shards).
        fetcher: reads manifest rows by position (the caption columns of the plan's groups).
        bar: the tqdm bar whose postfix shows progress.
        work: this rank's ``sequences``/``tokens``/``samples`` counts, increased here.
        t_work: ``time.perf_counter()`` when this rank started its shards (for tokens/s).

    Returns:
        The shard's arrays; vectors cast to float16.
    """
    rows = plan.layout.shard_range(shard)
    n, groups = len(rows), plan.groups
    f, d = len(encoder.facets), encoder.dim
    out = ShardArrays(
        vectors=np.zeros((n, f, d), np.float16), mask=np.zeros((n, f), bool),
        tokens=np.zeros((n, len(groups)), np.int32), truncated=np.zeros((n, len(groups)), bool),
    )
    owner = plan.owner(shard)
    owned = owner == np.arange(rows.start, rows.stop)[:, None]
    enc_rows = np.flatnonzero(owned.any(axis=1))
    if len(enc_rows):
        texts = plan.texts(shard, enc_rows, fetcher)
        samples = [{g: (t[g] if owned[j, i] else None) for i, g in enumerate(groups)} for j, t in zip(enc_rows, texts)]

        def progress(n_seq: int, n_tok: int) -> None:
            bar.set_postfix(samples=work["samples"], tok_s=f"{(work['tokens'] + n_tok) / (time.perf_counter() - t_work):.0f}")

        enc = encoder.encode(samples, progress=progress)
        work["sequences"] += int(owned.sum())
        work["tokens"] += int(enc.tokens.sum())
        for i, g in enumerate(groups):
            sel, col = owned[enc_rows, i], GROUPS.index(g)
            dst, fs = enc_rows[sel], encoder.prompt_set.facet_slice(g)
            out.vectors[dst, fs] = enc.vectors[sel, fs].astype(np.float16)
            out.mask[dst, fs] = enc.mask[sel, fs]
            out.tokens[dst, i] = enc.tokens[sel, col]
            out.truncated[dst, i] = enc.truncated[sel, col]
    _copy_from_owners(plan, shard, encoder.prompt_set, owner, owned, out, writer)
    return out


def _copy_from_owners(
    plan: StoredPlan, shard: int, prompt_set: PromptSet, owners: np.ndarray, owned: np.ndarray, out: ShardArrays,
    writer: CacheWriter,
) -> None:
    """Fill the shard's texts owned by other rows: same-shard owners from ``out``, earlier shards from disk.

    ``owners``: ``int64 [n, G]`` owner row per group (-1 absent); ``owned``: ``bool [n, G]`` the row owns it."""
    rows = plan.layout.shard_range(shard)
    copied = (owners >= 0) & ~owned
    if not copied.any():
        return
    earlier = copied & (owners < rows.start)
    ext = _read_owner_rows(plan, writer, np.unique(owners[earlier])) if earlier.any() else None
    for i, g in enumerate(plan.groups):
        fs = prompt_set.facet_slice(g)
        for j in np.flatnonzero(copied[:, i]):
            o = int(owners[j, i])
            if o >= rows.start:
                src = (out.vectors[o - rows.start, fs], out.tokens[o - rows.start, i], out.truncated[o - rows.start, i])
            else:
                k = ext["pos"][o]
                src = (ext["vectors"][k, fs], ext["tokens"][k, i], ext["truncated"][k, i])
            out.vectors[j, fs], out.tokens[j, i], out.truncated[j, i] = src
            out.mask[j, fs] = True


def _read_owner_rows(plan: StoredPlan, writer: CacheWriter, owner_rows: np.ndarray) -> dict:
    """Stored vectors, token counts and truncation flags of rows in earlier shards (waits for their markers)."""
    shards = sorted({int(r) // plan.layout.shard_rows for r in owner_rows})
    for s in shards:
        if not writer.is_done(s):
            log.info("waiting for shard %d (another rank) whose texts this shard reuses", s)
            while not writer.is_done(s):
                time.sleep(POLL_S)
    vectors = writer.read_vectors(owner_rows)
    tokens = np.zeros((len(owner_rows), len(plan.groups)), np.int32)
    truncated = np.zeros((len(owner_rows), len(plan.groups)), bool)
    pos = {int(r): k for k, r in enumerate(owner_rows)}
    columns = [ROW] + [c for g in plan.groups for c in (tokens_column(g), truncated_column(g))]
    for s in shards:
        part = pq.read_table(writer.files.index_part(s), columns=columns).to_pydict()
        for k, r in enumerate(part[ROW]):
            if r in pos:
                for i, g in enumerate(plan.groups):
                    tokens[pos[r], i] = part[tokens_column(g)][k]
                    truncated[pos[r], i] = part[truncated_column(g)][k]
    return {"pos": pos, "vectors": vectors, "tokens": tokens, "truncated": truncated}


def index_table(plan: StoredPlan, shard: int, keys: pa.Array, rows: np.ndarray, arrays: ShardArrays) -> pa.Table:
    """The shard's index part (:func:`pipeline.cache.files.index_schema`): ``key``, ``row``, then per group the
    cleaned text's SHA-1 (null if absent), packed sequence length (0 if absent) and truncation flag; keys ordered
    by row, then manifest order."""
    local = rows - plan.layout.shard_range(shard).start
    hexes = plan.sha1_hex(shard, local)
    cols: dict[str, pa.Array] = {KEY: keys, ROW: pa.array(rows, pa.int64())}
    for i, g in enumerate(plan.groups):
        cols[sha1_column(g)] = pa.array(hexes[g], pa.string())
        cols[tokens_column(g)] = pa.array(arrays.tokens[local, i], pa.int32())
        cols[truncated_column(g)] = pa.array(arrays.truncated[local, i], pa.bool_())
    return pa.table(cols, schema=index_schema(plan.groups))
