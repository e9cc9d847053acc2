"""The stage-1 batch job (SPEC §2.6): manifest -> deduplicated plan -> cache shards, resumable, multi-process.

``run_embed(EmbedConfig(...))`` is what ``flame embed`` and ``python -m stage1_embed_text`` call.

* Rank ``r`` of ``W`` processes (``accelerate launch`` / ``torchrun``; one process by default) takes cache
  shards ``r, r + W, ...`` in increasing order; rank 0 plans and creates the cache, then all ranks meet at a
  barrier (:mod:`stage1_embed_text.ranks`).
* A shard with a finished marker is skipped; any other shard is computed whole
  (:mod:`stage1_embed_text.shards`) and committed atomically by :meth:`pipeline.cache.store.CacheWriter.write_shard`
  (vectors, mask, index part, marker last).
* The job's counts and speed: :mod:`stage1_embed_text.summary`.

This module imports neither torch nor an LLM backend: planning (``flame embed --plan-only``,
:func:`stage1_embed_text.plan.plan_job`) and the ``flame`` command line stay light. :func:`run_embed` loads them
when it runs (:func:`stage1_embed_text.backends.build_encoder`).
"""

from __future__ import annotations

import errno
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from manifests.schema import RowFetcher, read_manifest_info
from pipeline.cache.files import CacheFiles
from pipeline.cache.store import CacheError, CacheLock, CacheMeta, CacheWriter
from stage1_embed_text.config import EmbedConfig
from stage1_embed_text.plan.files import GROUP_COLUMNS, PlanInfo
from stage1_embed_text.plan.stored import StoredPlan
from stage1_embed_text.ranks import combine_ranks, plan_and_create, run_token, wait_for_plan
from stage1_embed_text.shards import compute_shard, index_table
from stage1_embed_text.summary import EmbedSummary, summarize

if TYPE_CHECKING:  # importing the backends loads torch
    from stage1_embed_text.backends.registry import TextEncoder

log = logging.getLogger(__name__)


def run_embed(config: EmbedConfig, encoder: TextEncoder | None = None) -> EmbedSummary:
    """Run (or resume) the job of ``config`` on this process's shards; returns the whole job's summary.

    Rank 0 plans (or reuses the stored plan) and creates the cache while the others wait for its file marker (no
    collective timeout, however long planning takes); then every rank reads only its shards' part of the plan.

    Args:
        config: the job.
        encoder: the encoder to use (a :class:`~stage1_embed_text.backends.registry.TextEncoder`, e.g. a stand-in
            of a benchmark); default the one ``config`` names, built once the manifest is known to be readable
            (:func:`stage1_embed_text.backends.build_encoder`).

    Raises:
        pipeline.cache.store.CacheIdentityError: ``out`` holds a cache of another model, prompt set or plan.
        pipeline.cache.store.CacheError: a vector that is not finite and unit-norm (the shard is not committed), the
            disk is full (finished shards are kept), or planning failed on rank 0.
        manifests.schema.ManifestError: unfinished or malformed manifest.
    """
    t0 = time.perf_counter()
    import torch  # third-party, heavy: here, not at import time (planning needs no torch)
    from accelerate import PartialState

    read_manifest_info(config.manifest)  # refuse a missing or unfinished manifest before loading the LLM
    state = PartialState(cpu=not torch.cuda.is_available())
    files = CacheFiles(config.out)
    token = run_token(state)
    if encoder is None:
        # heavy (torch, transformers): not loaded for planning or `flame --help`
        from stage1_embed_text import backends

        encoder = backends.build_encoder(backends.EncoderSpec.of_config(config, state.device), state.device)
    lock = CacheLock(files) if state.process_index == 0 else None
    try:
        return _run(config, state, files, token, encoder, lock, t0)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        done = len(files.finished_shards())
        raise CacheError(
            f"no space left on the device writing {exc.filename or config.out}: the {done} finished shards are "
            "kept; free space and rerun the same command to finish the cache"
        ) from exc
    finally:
        if lock is not None:
            lock.release()


def _run(config: EmbedConfig, state, files: CacheFiles, token: str, encoder, lock, t0: float) -> EmbedSummary:
    """Plan/create (rank 0) or wait, then compute and commit this rank's unfinished shards, build the lookup
    (rank 0) and summarize. ``state`` is the ``accelerate.PartialState``."""
    rank, world = state.process_index, state.num_processes
    prompt_set = encoder.prompt_set
    if rank == 0:
        plan_and_create(config, prompt_set, lambda info: cache_meta(config, encoder, info), files, token, lock, world)
    else:
        wait_for_plan(files, token)
    state.wait_for_everyone()
    if rank == 0:
        files.plan_ready(token).unlink(missing_ok=True)
    plan = StoredPlan(config.out)
    writer = CacheWriter.open(config.out, encoder.identity())
    mine = list(range(rank, plan.layout.n_shards, world))
    todo = [s for s in mine if not writer.is_done(s)]
    log.info("rank %d/%d: %d of its %d shards to do, %d already done", rank, world, len(todo), len(mine),
             len(mine) - len(todo))
    bar = tqdm(total=len(todo), unit="shard", desc="embed", dynamic_ncols=True,
               disable=not (config.progress and rank == 0))
    fetcher = RowFetcher(config.manifest, [GROUP_COLUMNS[g] for g in plan.groups])
    work = {"sequences": 0, "tokens": 0, "samples": 0}
    t_work = time.perf_counter()
    for shard in todo:
        arrays = compute_shard(plan, shard, encoder, writer, fetcher, bar, work, t_work)
        keys, rows = plan.keys(shard)
        writer.write_shard(shard, arrays.vectors, arrays.mask, index_table(plan, shard, keys, rows, arrays))
        work["samples"] += len(keys)
        bar.update(1)
        log.debug("rank %d: shard %d committed (%d rows, %d keys)", rank, shard, len(arrays.mask), len(keys))
    bar.close()
    work["encode_s"] = time.perf_counter() - t_work
    state.wait_for_everyone()
    if rank == 0:
        writer.build_lookup()  # the facet mask as the shards stored it (the encoder's presence, SPEC §3)
    state.wait_for_everyone()
    totals = combine_ranks(state, {**work, "written": len(todo), "skipped": len(mine) - len(todo)})
    return summarize(config, plan, prompt_set, totals, world, time.perf_counter() - t0)


def cache_meta(config: EmbedConfig, encoder, info: PlanInfo) -> CacheMeta:
    """The cache's ``meta.json`` content: the encoder's identity, the plan's layout, and the job's inputs, plan
    counts and batching settings under ``extra``."""
    return CacheMeta(
        identity=encoder.identity(),
        layout=info.layout,
        extra={
            "manifest": str(Path(config.manifest).resolve()),
            "split": config.split,
            "limit": config.limit,
            "samples": info.n_samples,
            "keys": info.n_keys,
            "empty_samples": info.n_empty,
            # per manifest part: [name, bytes, mtime_ns, {split: keys in the cache}] (stage 2 counts without lookups)
            "manifest_parts": [[*part, kept] for part, kept in zip(info.inputs.get("parts", []), info.kept_per_part)],
            "batching": {"max_batch_tokens": config.max_batch_tokens, "batch_size": config.batch_size},
        },
    )
