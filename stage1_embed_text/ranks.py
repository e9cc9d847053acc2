"""Rank coordination of a stage-1 job (SPEC §2.6): who plans, who waits, how counts are combined.

Rank 0 takes the cache's writer lock, plans in a child process, creates (or checks) the cache and writes a
plan-ready marker named by a run token all ranks share; the other ranks poll for that marker (no collective
timeout, however long planning takes). :mod:`accelerate` is imported only where several processes run.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

from pipeline.atomic import atomic_write_bytes
from pipeline.cache.files import CacheFiles
from pipeline.cache.store import CacheError, CacheLock, CacheMeta, CacheWriter
from stage1_embed_text.config import EmbedConfig
from stage1_embed_text.encode.prompts import PromptSet
from stage1_embed_text.plan import plan_job
from stage1_embed_text.plan.files import PlanInfo

log = logging.getLogger(__name__)

POLL_S = 0.5
"""How often a rank looks for another rank's finished marker, in seconds."""


def run_token(state) -> str:
    """A random id of this run (32 hex digits), the same on every rank (names rank 0's plan-ready marker).

    ``state`` is the ``accelerate.PartialState`` of this process."""
    token = [uuid.uuid4().hex]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(token, from_process=0)
    return token[0]


def plan_and_create(
    config: EmbedConfig, prompt_set: PromptSet, meta_of: Callable[[PlanInfo], CacheMeta], files: CacheFiles,
    token: str, lock: CacheLock, world: int,
) -> None:
    """Rank 0: take the cache's lock, plan, create (or check) the cache with ``meta_of(plan info)`` (the one
    place the job builds its meta; the other ranks read it from disk), remove a killed run's temporaries, then
    write the plan-ready marker (with the error, if any, so that the other ranks stop too).

    Raises:
        Whatever planning or cache creation raised (e.g. :class:`pipeline.cache.store.CacheIdentityError`), after the
        marker names it.
    """
    try:
        lock.acquire()
        info = _plan_in_child_process(config, prompt_set)
        meta = meta_of(info)
        _warn_on_changed_batching(CacheWriter.create(config.out, meta).meta, meta)
        remove_stale_temp_files(files)
    except Exception as exc:
        if world > 1:
            atomic_write_bytes(files.plan_ready(token), json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        raise
    atomic_write_bytes(files.plan_ready(token), json.dumps({"plan_hash": info.plan_hash}).encode())


def _warn_on_changed_batching(old: CacheMeta, new: CacheMeta) -> None:
    """Warn when a resumed cache was started with other batching settings (its bytes may then differ)."""
    before, now = old.extra.get("batching"), new.extra.get("batching")
    if before != now:
        log.warning(
            "resuming a cache built with batching %s using %s: vectors stay valid, but bytes may differ from a "
            "run with one setting", before, now,
        )


def _plan_in_child_process(config: EmbedConfig, prompt_set: PromptSet) -> PlanInfo:
    """:func:`stage1_embed_text.plan.plan_job` in a fresh (spawned) Python process, so that planning's memory
    (~110 bytes per sample at its peak) never adds to this process's LLM, torch and CUDA memory, and is returned
    to the system when the planner exits. Errors are raised here as the planner raised them."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(plan_job, config, prompt_set).result()


def wait_for_plan(files: CacheFiles, token: str) -> None:
    """Other ranks: wait for rank 0's plan-ready marker of this run (logging every minute).

    Raises:
        pipeline.cache.store.CacheError: rank 0 could not plan (the marker names its error).
    """
    marker, t0, told = files.plan_ready(token), time.monotonic(), 0.0
    while not marker.exists():
        if time.monotonic() - told > 60:
            log.info("waiting for rank 0 to plan the job (%.0f s so far)", time.monotonic() - t0)
            told = time.monotonic()
        time.sleep(POLL_S)
    ready = json.loads(marker.read_text(encoding="utf-8"))
    if "error" in ready:
        raise CacheError(f"rank 0 could not plan the job: {ready['error']}")


def remove_stale_temp_files(files: CacheFiles) -> None:
    """Delete temporaries a killed writer left: hidden files in ``index/``, ``done/``, ``plan/`` and hidden
    planning/lookup directories in the cache root (never read)."""
    stale = [p for d in files.temp_dirs() if d.exists() for p in d.glob(".*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    dirs = [p for p in files.root.glob(".*") if p.is_dir() and p.name.startswith((".plan-", ".lookup-"))]
    for p in dirs:
        shutil.rmtree(p, ignore_errors=True)
    if stale or dirs:
        log.info("removed %d temporary files of an interrupted run", len(stale) + len(dirs))


def combine_ranks(state, counts: dict[str, float]) -> dict[str, float]:
    """Every rank's counts summed (``encode_s``: the slowest rank's)."""
    if state.num_processes == 1:
        return counts
    from accelerate.utils import gather_object

    gathered = gather_object([counts])
    return {k: (max if k == "encode_s" else sum)(c[k] for c in gathered) for k in counts}
