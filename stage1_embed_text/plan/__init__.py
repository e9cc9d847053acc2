"""The embedding plan of a stage-1 job (SPEC §2.6, §11): which rows exist, which keys point at them, who computes what.

From the manifest rows (in manifest order, after ``split`` and ``limit``) the planner cleans each sample's three
captions ``(raw, short, long)`` (SPEC §2.1; absent = ``None``/empty/whitespace) and

* drops samples whose three captions are all absent (counted, a few examples kept);
* dedupes identical caption sets: one cache **row** per distinct set, rows in first-occurrence order, many
  keys -> one row;
* dedupes identical **texts** across rows: the packed sequence of group ``g`` with text ``t`` is computed
  once, by the first row that has it (its *owner*); other rows copy the owner's stored float16 vectors, token
  count and truncation flag. A row only copies from rows before it, so a shard depends only on itself and
  earlier shards, and every stored byte is a function of the plan alone (whatever process computes a shard,
  and whether the job was resumed).

Deduplication works on fixed-size digests, never on strings held in dicts: a text is its SHA-1 (20 bytes) and
a caption set is a 16-byte digest of its three text digests; rows and owners come from sorting those digests
(:mod:`stage1_embed_text.plan.dedup`). Computing a plan is :class:`stage1_embed_text.plan.planner.Planner`.

The plan is computed once (:func:`make_plan`, :func:`plan_job`) and stored in the cache directory
(:class:`pipeline.cache.files.CacheFiles`, :mod:`stage1_embed_text.plan.files`): ``plan.json`` (counts, layout, hash, the inputs it was made from), ``rows.parquet`` (per row: the
manifest position of its first sample, each group's text SHA-1 and owner row) and ``keys.parquet`` (key, row,
ordered by row); Parquet row group ``s`` of both files is cache shard ``s``, so a process reads only its shards'
rows (:class:`stage1_embed_text.plan.stored.StoredPlan`) and fetches their texts from the manifest by position.

The plan hash digests the prompt set hash, the groups, every row's text digests and every kept key with its row
(in manifest order); a resumed job must arrive at the same hash (and layout) as the cache on disk.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from manifests.schema import read_manifest_info
from pipeline.atomic import KeepExisting, atomic_directory, atomic_write_bytes
from pipeline.cache.files import CacheFiles
from pipeline.cache.store import CacheError
from stage1_embed_text.config import EmbedConfig, check_shard_layout, default
from stage1_embed_text.encode.prompts import PromptSet, get_prompt_set
from stage1_embed_text.plan.files import PLAN_FORMAT, PlanInfo, read_plan_info
from stage1_embed_text.plan.planner import Planner

log = logging.getLogger(__name__)


def plan_inputs(manifest_dir: str | Path, prompt_set: PromptSet, split: str | None, limit: int | None,
                shard_rows: int, chunk_rows: int) -> dict[str, Any]:
    """The inputs a plan depends on, comparable between runs: the manifest (path, ``manifest.json`` digest, each
    part's size and modification time), split, limit, prompt set hash and row layout."""
    info = read_manifest_info(manifest_dir)
    root = Path(manifest_dir).resolve()
    parts = []
    for part in info.parts:
        st = (root / part).stat()
        parts.append([part, st.st_size, st.st_mtime_ns])
    return {
        "manifest": str(root),
        "manifest_json_sha1": hashlib.sha1((root / "manifest.json").read_bytes()).hexdigest(),
        "parts": parts, "split": split, "limit": limit, "prompt_set_hash": prompt_set.content_hash,
        "groups": list(prompt_set.group_names), "shard_rows": shard_rows, "chunk_rows": chunk_rows,
        "format": PLAN_FORMAT,
    }


def make_plan(
    manifest_dir: str | Path,
    prompt_set: PromptSet,
    cache_dir: str | Path,
    shard_rows: int = default("shard_rows"),
    chunk_rows: int = default("chunk_rows"),
    split: str | None = None,
    limit: int | None = None,
    progress: bool = False,
) -> PlanInfo:
    """Plan a job over a manifest and store the plan in ``cache_dir/plan`` (or reuse the stored one).

    If ``cache_dir`` already holds a plan made from equal inputs (:func:`plan_inputs`), it is returned as is.
    Otherwise the plan is computed into a hidden sibling directory and renamed into place
    (:func:`pipeline.atomic.atomic_directory`), unless a plan with the same hash is already there (then it is
    kept, byte for byte, and only its ``plan.json`` gets the newer inputs). A stored plan with another hash is replaced
    only while the cache has no ``meta.json`` (nothing was embedded against it yet); otherwise
    :class:`pipeline.cache.store.CacheIdentityError` is raised by the caller's layout check, not here.

    Args:
        manifest_dir: the manifest (SPEC §4).
        prompt_set: the prompt set; only its groups are used, and its content hash enters the plan hash.
        cache_dir: the cache directory (created if absent).
        shard_rows: rows per cache shard (the unit of work, resumption and multi-process split).
        chunk_rows: rows per Zarr chunk inside a shard; must divide ``shard_rows``.
        split: only rows of this split; limit: only the first ``limit`` of those.
        progress: show tqdm bars.

    Returns:
        The :class:`PlanInfo` of the plan now stored in ``cache_dir/plan``.

    Raises:
        stage1_embed_text.config.EmbedConfigError: ``shard_rows``/``chunk_rows`` below 1 or ``chunk_rows`` not dividing
            ``shard_rows``.
        manifests.schema.ManifestError: unfinished or malformed manifest.
    """
    check_shard_layout(shard_rows, chunk_rows)
    files = CacheFiles(cache_dir)
    _refuse_foreign_folder(files)
    inputs = plan_inputs(manifest_dir, prompt_set, split, limit, shard_rows, chunk_rows)
    stored = read_plan_info(files)
    if stored is not None and stored.inputs == inputs:
        log.info("reusing the stored plan of %s (same manifest and arguments)", files.plan_dir)
        return stored
    with atomic_directory(files.plan_dir) as tmp:
        info = Planner(manifest_dir, prompt_set, tmp, shard_rows, chunk_rows, split, limit, progress).run()
        info.inputs = inputs
        (tmp / files.plan_json.name).write_text(info.to_json(), encoding="utf-8")
        if stored is not None and (stored.plan_hash == info.plan_hash or files.meta.exists()):
            # same plan: keep its files; another plan while the cache has vectors: the caller's layout check
            # names the difference, and the stored plan stays
            raise KeepExisting
    if stored is not None and stored.plan_hash == info.plan_hash:
        atomic_write_bytes(files.plan_json, info.to_json().encode())  # same plan, newer inputs
    return info


def _refuse_foreign_folder(files: CacheFiles) -> None:
    """Raise :class:`pipeline.cache.store.CacheError` if the cache directory holds files but no cache (no ``meta.json``,
    no ``plan/``): e.g. the manifest folder given as ``--out`` by mistake, which a job would write into."""
    if not files.root.is_dir():
        return
    # hidden entries are a killed job's temporaries (``.plan-<pid>-...``), which a rerun cleans up
    others = sorted(p.name for p in files.root.iterdir() if p != files.lock and not p.name.startswith("."))
    if others and not (files.meta.exists() or files.plan_dir.exists()):
        raise CacheError(
            f"{files.root} is not empty ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}) and is not a "
            "flame cache; give flame embed a new folder"
        )


def plan_job(config: EmbedConfig, prompt_set: PromptSet | None = None) -> PlanInfo:
    """Plan the job of ``config`` and store the plan in ``config.out/plan`` (no LLM is loaded, no torch imported).

    ``flame embed`` does this on rank 0 (in a child process) before embedding; running it first
    (``flame embed --plan-only``, e.g. on a CPU node) lets the GPU ranks start embedding at once, since a plan
    made from the same inputs is reused (:func:`make_plan`).

    Args:
        config: the job; its manifest, out, shard_rows, chunk_rows, split, limit, progress, prompt_set and
            bos_marker are used.
        prompt_set: the prompt set, if already built; default the one ``config`` names.

    Raises:
        ValueError, manifests.schema.ManifestError: as :func:`make_plan`.
    """
    if prompt_set is None:
        prompt_set = get_prompt_set(config.prompt_set, bos_marker=config.bos_marker)
    return make_plan(
        config.manifest, prompt_set, config.out, shard_rows=config.shard_rows, chunk_rows=config.chunk_rows,
        split=config.split, limit=config.limit, progress=config.progress,
    )
