"""The stage-1 batch job (SPEC §2.6): manifest -> deduplicated plan -> cache shards, resumable, multi-process.

``run_embed(EmbedConfig(...))`` is what ``flame embed`` and ``python -m stage1_embed_text`` call.

* Rank ``r`` of ``W`` processes (``accelerate launch`` / ``torchrun``; one process by default) takes cache
  shards ``r, r + W, ...`` in increasing order; rank 0 creates the cache, then all ranks meet at a barrier.
* A shard with a finished marker is skipped; any other shard is computed whole and committed atomically by
  :meth:`pipeline.cache.CacheWriter.write_shard` (vectors, mask, index part, marker last).
* Every text is embedded once per job by the row that owns it (:mod:`stage1_embed_text.plan`); a row whose
  text is owned by an earlier shard copies that shard's stored float16 vectors once the shard is finished.
  The encoder's batches for a shard depend only on the plan, so a resumed or multi-process run writes the
  same bytes as one uninterrupted process.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from manifests.schema import RowFetcher
from pipeline.atomic import atomic_write_bytes
from pipeline.cache import CacheError, CacheLock, CacheMeta, CacheWriter
from pipeline.cache_files import (
    KEY,
    ROW,
    CacheFiles,
    index_schema,
    sha1_column,
    tokens_column,
    truncated_column,
)
from stage1_embed_text.plan import CAPTION_COLUMNS, PlanInfo, StoredPlan, make_plan
from stage1_embed_text.prompts import GROUPS

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BACKENDS = ("hf", "vllm")
_POLL_S = 0.5  # how often a rank looks for another rank's finished marker


@dataclass
class EmbedConfig:
    """Arguments of a stage-1 job.

    Attributes:
        manifest: manifest directory (SPEC §4).
        out: cache directory to create or resume (SPEC §3).
        llm: embedded name, local folder, ``.gguf`` file or hub id (:func:`stage1_embed_text.llm.load_llm`).
        layer: ``hidden_states`` index read out; ``None`` = penultimate block.
        readout: ``"pre_norm"`` or ``"post_norm"``; ``None`` = the LLM's default
            (:func:`pipeline.assets.default_readout`).
        dtype: compute dtype, ``"bfloat16"`` or ``"float32"``.
        backend: ``"hf"`` (reference, CPU/GPU) or ``"vllm"`` (needs vLLM importable, SPEC §2.5).
        context_tokens: longest packed sequence; longer captions are cut (SPEC §2.4).
        max_batch_tokens: padded tokens per forward batch.
        batch_size: if set, at most this many sequences per batch (on top of the token budget).
        limit: only the first ``limit`` manifest rows (after ``split``).
        split: only rows of this split.
        shard_rows: cache rows per shard (the unit of work, resume and multi-process split).
        chunk_rows: rows per Zarr chunk (must divide ``shard_rows``).
        position_mode: ``"restart"`` (default) or ``"continuous"``.
        prompt_set: prompt set name (``"flame"``).
        bos_marker: the official ``<s>`` marker, ``"drop"`` (default) or ``"keep"``.
        progress: show a tqdm bar (rank 0 only).
    """

    manifest: str
    out: str
    llm: str = "gemma3-270m"
    layer: int | None = None
    readout: str | None = None
    dtype: str = "bfloat16"
    backend: str = "hf"
    context_tokens: int = 512
    max_batch_tokens: int = 1024
    batch_size: int | None = None
    limit: int | None = None
    split: str | None = None
    shard_rows: int = 4096
    chunk_rows: int = 64
    position_mode: str = "restart"
    prompt_set: str = "flame"
    bos_marker: str = "drop"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.readout is None:
            from pipeline.assets import default_readout

            self.readout = default_readout(self.llm)


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


@dataclass
class _ShardArrays:
    """One shard's content: vectors ``float16 [n, F, D]``, mask ``bool [n, F]``, tokens ``int32 [n, G]``,
    truncated ``bool [n, G]`` (``n`` = rows of the shard, ``G`` = groups)."""

    vectors: np.ndarray
    mask: np.ndarray
    tokens: np.ndarray
    truncated: np.ndarray


def plan_job(config: EmbedConfig, prompt_set=None) -> PlanInfo:
    """Plan the job of ``config`` and store the plan in ``config.out/plan`` (no LLM is loaded).

    ``flame embed`` does this on rank 0 before embedding; running it first (e.g. on a CPU node) lets the GPU
    ranks start embedding at once, since a plan made from the same inputs is reused (:func:`make_plan`).
    """
    if prompt_set is None:
        from stage1_embed_text.prompts import get_prompt_set

        prompt_set = get_prompt_set(config.prompt_set, bos_marker=config.bos_marker)
    return make_plan(
        config.manifest, prompt_set, config.out, shard_rows=config.shard_rows, chunk_rows=config.chunk_rows,
        split=config.split, limit=config.limit, progress=config.progress,
    )


def build_encoder(config: EmbedConfig, device: torch.device):
    """The encoder of ``config``: a :class:`~stage1_embed_text.encoder.FacetEncoder` on the loaded LLM
    (``backend="hf"``) or a :class:`~stage1_embed_text.vllm_backend.VllmFacetEncoder` (``backend="vllm"``).

    Raises:
        stage1_embed_text.vllm_backend.VllmUnavailableError: ``vllm`` requested but not importable here.
        ValueError: unknown backend.
    """
    if config.backend == "vllm":
        from stage1_embed_text.vllm_backend import build_vllm_encoder

        return build_vllm_encoder(config, device)
    if config.backend != "hf":
        raise ValueError(f"backend must be one of {BACKENDS}, got {config.backend!r}")
    from stage1_embed_text.encoder import FacetEncoder
    from stage1_embed_text.llm import load_llm
    from stage1_embed_text.prompts import get_prompt_set

    llm = load_llm(config.llm, dtype=config.dtype, layer=config.layer)
    if device.type != "cpu":
        llm.model.to(device)
        llm.final_norm.to(device)
    kw = {"max_batch_sequences": config.batch_size} if config.batch_size else {}
    return FacetEncoder(
        llm,
        prompt_set=get_prompt_set(config.prompt_set, bos_marker=config.bos_marker),
        readout=config.readout,
        position_mode=config.position_mode,
        max_tokens=config.context_tokens,
        max_batch_tokens=config.max_batch_tokens,
        **kw,
    )


def run_embed(config: EmbedConfig) -> EmbedSummary:
    """Run (or resume) the job of ``config`` on this process's shards; returns the whole job's summary.

    Rank 0 plans (or reuses the stored plan) and creates the cache while the others wait for its file marker (no
    collective timeout, however long planning takes); then every rank reads only its shards' part of the plan.

    Raises:
        pipeline.cache.CacheIdentityError: ``out`` holds a cache of another model, prompt set or plan.
        pipeline.cache.CacheError: a vector that is not finite and unit-norm (the shard is not committed), or
            planning failed on rank 0.
        manifests.schema.ManifestError: unfinished or malformed manifest.
    """
    t0 = time.perf_counter()
    import torch  # here, not at import time: planning (`--plan-only`, :func:`plan_job`) needs no torch
    from accelerate import PartialState

    from manifests.schema import read_manifest_info

    read_manifest_info(config.manifest)  # refuse a missing or unfinished manifest before loading the LLM
    state = PartialState(cpu=not torch.cuda.is_available())
    files = CacheFiles(config.out)
    token = _run_token(state)
    encoder = build_encoder(config, state.device)
    lock = CacheLock(files) if state.process_index == 0 else None
    try:
        return _run(config, state, files, token, encoder, lock, t0)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        done = len(list(files.done_dir.glob("shard-*.json"))) if files.done_dir.exists() else 0
        raise CacheError(
            f"no space left on the device writing {exc.filename or config.out}: the {done} finished shards are "
            "kept; free space and rerun the same command to finish the cache"
        ) from exc
    finally:
        if lock is not None:
            lock.release()


def _run(config: EmbedConfig, state, files: CacheFiles, token: str, encoder, lock, t0: float) -> EmbedSummary:
    rank, world = state.process_index, state.num_processes
    prompt_set = encoder.prompt_set
    if rank == 0:
        _plan_and_create(config, encoder, files, token, lock, world)
    else:
        _wait_for_plan(files, token)
    state.wait_for_everyone()
    if rank == 0:
        files.plan_ready(token).unlink(missing_ok=True)
    plan = StoredPlan(config.out)
    meta = _cache_meta(config, encoder, plan.info)
    writer = CacheWriter(config.out, meta)
    _warn_on_changed_batching(writer.meta, meta)
    mine = list(range(rank, plan.layout.n_shards, world))
    todo = [s for s in mine if not writer.is_done(s)]
    log.info("rank %d/%d: %d of its %d shards to do, %d already done", rank, world, len(todo), len(mine),
             len(mine) - len(todo))
    bar = tqdm(total=len(todo), unit="shard", desc="embed", dynamic_ncols=True,
               disable=not (config.progress and rank == 0))
    fetcher = RowFetcher(config.manifest, [CAPTION_COLUMNS[g] for g in plan.groups])
    work = {"sequences": 0, "tokens": 0, "samples": 0}
    t_work = time.perf_counter()
    for shard in todo:
        arrays = _compute_shard(plan, shard, encoder, writer, fetcher, bar, work, t_work)
        keys, rows = plan.keys(shard)
        writer.write_shard(shard, arrays.vectors, arrays.mask, _index_table(plan, shard, keys, rows, arrays))
        work["samples"] += len(keys)
        bar.update(1)
        log.debug("rank %d: shard %d committed (%d rows, %d keys)", rank, shard, len(arrays.mask), len(keys))
    bar.close()
    work["encode_s"] = time.perf_counter() - t_work
    state.wait_for_everyone()
    if rank == 0:
        writer.build_lookup(_facet_mask(plan, prompt_set))
    state.wait_for_everyone()
    totals = _combine_ranks(state, {**work, "written": len(todo), "skipped": len(mine) - len(todo)})
    return _summarize(config, plan, prompt_set, totals, world, time.perf_counter() - t0)


def _run_token(state) -> str:
    """A random id of this run, the same on every rank (names rank 0's plan-ready marker)."""
    token = [uuid.uuid4().hex]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(token, from_process=0)
    return token[0]


def _cache_meta(config: EmbedConfig, encoder, info: PlanInfo) -> CacheMeta:
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


def _plan_and_create(config: EmbedConfig, encoder, files: CacheFiles, token: str, lock: CacheLock, world: int) -> None:
    """Rank 0: take the cache's lock, plan, create (or check) the cache, remove a killed run's temporaries, then
    write the plan-ready marker (with the error, if any, so that the other ranks stop too)."""
    try:
        lock.acquire()
        info = _plan_in_child_process(config, encoder.prompt_set)
        CacheWriter.create(config.out, _cache_meta(config, encoder, info))
        _remove_stale_temp_files(files)
    except Exception as exc:
        if world > 1:
            atomic_write_bytes(files.plan_ready(token), json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        raise
    atomic_write_bytes(files.plan_ready(token), json.dumps({"plan_hash": info.plan_hash}).encode())


def _plan_in_child_process(config: EmbedConfig, prompt_set) -> PlanInfo:
    """:func:`plan_job` in a fresh (spawned) Python process, so that planning's memory (~110 bytes per sample at
    its peak) never adds to this process's LLM, torch and CUDA memory, and is returned to the system when the
    planner exits. Errors are raised here as the planner raised them."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(plan_job, config, prompt_set).result()


def _wait_for_plan(files: CacheFiles, token: str) -> None:
    """Other ranks: wait for rank 0's plan-ready marker of this run (logging every minute)."""
    marker, t0, told = files.plan_ready(token), time.monotonic(), 0.0
    while not marker.exists():
        if time.monotonic() - told > 60:
            log.info("waiting for rank 0 to plan the job (%.0f s so far)", time.monotonic() - t0)
            told = time.monotonic()
        time.sleep(_POLL_S)
    ready = json.loads(marker.read_text(encoding="utf-8"))
    if "error" in ready:
        raise CacheError(f"rank 0 could not plan the job: {ready['error']}")


def _compute_shard(
    plan: StoredPlan, shard: int, encoder, writer: CacheWriter, fetcher: RowFetcher, bar, work: dict, t_work: float
) -> _ShardArrays:
    """Encode the texts shard ``shard`` owns and copy the others from their owner rows.

    ``work`` accumulates this rank's sequences/tokens/samples; ``t_work`` is when this rank started its shards."""
    rows = plan.layout.shard_range(shard)
    n, groups = len(rows), plan.groups
    f, d = len(encoder.facets), encoder.dim
    out = _ShardArrays(
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
    plan: StoredPlan, shard: int, prompt_set, owners: np.ndarray, owned: np.ndarray, out: _ShardArrays, writer
) -> None:
    """Fill the shard's texts owned by other rows: same-shard owners from ``out``, earlier shards from disk."""
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
                time.sleep(_POLL_S)
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


def _index_table(plan: StoredPlan, shard: int, keys: pa.Array, rows: np.ndarray, arrays: _ShardArrays) -> pa.Table:
    """The shard's index part (:func:`pipeline.cache_files.index_schema`): ``key``, ``row``, then per group the
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


def _facet_mask(plan: StoredPlan, prompt_set) -> np.ndarray:
    """``bool [N, F]`` facet presence of every row, from the plan (a group's facets are present iff its text is)."""
    mask = np.zeros((plan.layout.n_rows, len(prompt_set.facets)), bool)
    for s in range(plan.layout.n_shards):
        r = plan.layout.shard_range(s)
        owner = plan.owner(s)
        for i, g in enumerate(plan.groups):
            mask[r.start : r.stop, prompt_set.facet_slice(g)] = (owner[:, i] >= 0)[:, None]
    return mask


def _remove_stale_temp_files(files: CacheFiles) -> None:
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


def _warn_on_changed_batching(old: CacheMeta, new: CacheMeta) -> None:
    before, now = old.extra.get("batching"), new.extra.get("batching")
    if before != now:
        log.warning(
            "resuming a cache built with batching %s using %s: vectors stay valid, but bytes may differ from a "
            "run with one setting", before, now,
        )


def _combine_ranks(state, counts: dict[str, float]) -> dict[str, float]:
    """Every rank's counts summed (``encode_s``: the slowest rank's)."""
    if state.num_processes == 1:
        return counts
    from accelerate.utils import gather_object

    gathered = gather_object([counts])
    return {k: (max if k == "encode_s" else sum)(c[k] for c in gathered) for k in counts}


def _summarize(
    config: EmbedConfig, plan: StoredPlan, prompt_set, totals: dict[str, int], world: int, wall: float
) -> EmbedSummary:
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
