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
(equal 128-bit prefixes are taken as equal texts: a false match among 10^9 texts has probability ~10^-21).
Memory at ``n`` kept samples: ~16 bytes per sample while rows are assigned, ~45 bytes per sample (key strings
in Arrow, rows, a sort order) while keys are written, one group's 20-byte digests per row while owners are
found; texts themselves are never held beyond one batch.

The plan is computed once (:func:`make_plan`) and stored in the cache directory (:class:`pipeline.cache_files.
CacheFiles`): ``plan.json`` (counts, layout, hash, the inputs it was made from), ``rows.parquet`` (per row: the
manifest position of its first sample, each group's text SHA-1 and owner row) and ``keys.parquet`` (key, row,
ordered by row); Parquet row group ``s`` of both files is cache shard ``s``, so a process reads only its shards'
rows (:class:`StoredPlan`) and fetches their texts from the manifest by position.

The plan hash digests the prompt set hash, the groups, every row's text digests and every kept key with its row
(in manifest order); a resumed job must arrive at the same hash (and layout) as the cache on disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from manifests.schema import RowFetcher, iter_batches, read_manifest_info
from pipeline.atomic import atomic_write_bytes
from pipeline.cache import CacheError, CacheLayout
from pipeline.cache_files import KEY, ROW, CacheFiles
from pipeline.key_lookup import take_chunked
from stage1_embed_text.prompts import PromptSet, clean_caption

log = logging.getLogger(__name__)

PLAN_FORMAT = 2
CAPTION_COLUMNS = {"raw": "raw_caption", "short": "short_caption", "long": "long_caption"}  # group -> manifest column
DIGEST_BYTES = 20  # SHA-1 of a cleaned text
SAMPLE = "sample"  # plan column: manifest position of a row's first sample
_ABSENT = bytes(DIGEST_BYTES)
_BATCH_ROWS = 16_384


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
    shard_rows: int = 4096,
    chunk_rows: int = 64,
    split: str | None = None,
    limit: int | None = None,
    progress: bool = False,
) -> PlanInfo:
    """Plan a job over a manifest and store the plan in ``cache_dir/plan`` (or reuse the stored one).

    If ``cache_dir`` already holds a plan made from equal inputs (:func:`plan_inputs`), it is returned as is.
    Otherwise the plan is computed into a hidden sibling directory and renamed into place, unless a plan with
    the same hash is already there (then it is kept, byte for byte). A stored plan with another hash is replaced
    only while the cache has no ``meta.json`` (nothing was embedded against it yet); otherwise
    :class:`pipeline.cache.CacheIdentityError` is raised by the caller's layout check, not here.

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
        ValueError: ``shard_rows``/``chunk_rows`` not positive or ``chunk_rows`` not dividing ``shard_rows``.
        manifests.schema.ManifestError: unfinished or malformed manifest.
    """
    if shard_rows <= 0 or chunk_rows <= 0 or shard_rows % chunk_rows:
        raise ValueError(f"need shard_rows > 0 and chunk_rows > 0 dividing it, got {shard_rows}, {chunk_rows}")
    files = CacheFiles(cache_dir)
    inputs = plan_inputs(manifest_dir, prompt_set, split, limit, shard_rows, chunk_rows)
    stored = _read_info(files)
    if stored is not None and stored.inputs == inputs:
        log.info("reusing the stored plan of %s (same manifest and arguments)", files.plan_dir)
        return stored
    files.root.mkdir(parents=True, exist_ok=True)
    tmp = files.root / f".plan-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        info = _Planner(manifest_dir, prompt_set, tmp, shard_rows, chunk_rows, split, limit, progress).run()
        info.inputs = inputs
        (tmp / files.plan_json.name).write_text(info.to_json(), encoding="utf-8")
        if stored is not None and stored.plan_hash == info.plan_hash:
            atomic_write_bytes(files.plan_json, info.to_json().encode())  # same plan, newer inputs
            return info
        if stored is not None and files.meta.exists():
            return info  # the caller's layout check names the difference; the stored plan stays
        shutil.rmtree(files.plan_dir, ignore_errors=True)
        os.rename(tmp, files.plan_dir)
        return info
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_info(files: CacheFiles) -> PlanInfo | None:
    if not (files.plan_json.exists() and files.plan_rows.exists() and files.plan_keys.exists()):
        return None
    try:
        info = PlanInfo.from_json(files.plan_json.read_text(encoding="utf-8"))
    except (ValueError, TypeError, KeyError):
        return None
    return info if info.format == PLAN_FORMAT else None


class _Planner:
    """One planning pass: manifest -> digests -> rows -> owners -> ``rows.parquet``/``keys.parquet`` in ``out``."""

    def __init__(self, manifest_dir, prompt_set: PromptSet, out: Path, shard_rows: int, chunk_rows: int,
                 split: str | None, limit: int | None, progress: bool):
        self.manifest_dir, self.out = manifest_dir, out
        self.groups = prompt_set.group_names
        self.prompt_hash = prompt_set.content_hash
        self.shard_rows, self.chunk_rows = shard_rows, chunk_rows
        self.split, self.limit, self.progress = split, limit, progress

    def run(self) -> PlanInfo:
        keys, positions, set_hi, set_lo, n_samples, empty = self._digest_pass()
        pa.default_memory_pool().release_unused()
        key_row, row_first = _first_occurrence_rows(set_hi, set_lo)
        del set_hi, set_lo
        n_rows = len(row_first)
        first_positions = positions[row_first].astype(np.int64)
        del positions
        layout = CacheLayout(n_rows=n_rows, shard_rows=self.shard_rows, chunk_rows=self.chunk_rows, plan_hash="")
        keys_digest = self._write_keys(keys, key_row, layout)  # first, so keys and their rows can be freed
        del keys, key_row
        pa.default_memory_pool().release_unused()
        digest = hashlib.sha256(f"plan v{PLAN_FORMAT}\n{self.prompt_hash}\n{','.join(self.groups)}\n".encode())
        absent, unique = {}, 0
        for g in self.groups:
            dig, present = self._row_digests(g, row_first)
            owner = _owners(dig, present)
            digest.update(g.encode() + present.tobytes() + dig[present].tobytes())
            absent[g] = int((~present).sum())
            unique += int((owner == np.arange(n_rows)).sum())
            self._write_group(g, dig, present, owner)
            del dig, present, owner
        del row_first
        self._write_rows(first_positions, layout)
        digest.update(keys_digest)
        layout.plan_hash = "sha256:" + digest.hexdigest()
        n_keys = self._n_keys
        log.info("plan: %d samples -> %d keys -> %d rows (%d shards of %d); %d unique texts to embed",
                 n_samples, n_keys, n_rows, layout.n_shards, self.shard_rows, unique)
        if empty[0]:
            log.info("%d of %d samples have no caption at all (no row), e.g. %s", empty[0], n_samples, empty[1])
        return PlanInfo(self.groups, n_samples, n_keys, n_rows, empty[0], empty[1], unique, absent, layout,
                        kept_per_part=self._kept_per_part)

    # -- pass 1: clean, digest, keep keys (Arrow) and per-sample set digests ---------------------------------
    def _digest_pass(self):
        cols = [KEY, "split", *(CAPTION_COLUMNS[g] for g in self.groups)]
        writer = pq.ParquetWriter(self.out / ".digests.parquet", _digest_schema(self.groups))
        n_samples, n_empty, examples = 0, 0, []
        counts = read_manifest_info(self.manifest_dir).counts
        n_manifest = counts.get("total", sum(counts.values()))
        total = counts.get(self.split, 0) if self.split else n_manifest
        if self.limit is not None:
            total = min(total, self.limit)
        # kept samples' outputs go into arrays allocated once (appending a small array per batch between the
        # batches' freed caption strings fragments the heap: +260 MiB at 1M samples, +2 GiB at 15M)
        keys = []
        pos_dtype = np.int32 if n_manifest < 2**31 else np.int64
        positions, his, los = _Growing(pos_dtype, total), _Growing(np.uint64, total), _Growing(np.uint64, total)
        bar = tqdm(total=total, unit="sample", desc="plan", dynamic_ncols=True, disable=not self.progress)
        part_ends = np.cumsum([pq.ParquetFile(Path(self.manifest_dir) / p).metadata.num_rows
                               for p in read_manifest_info(self.manifest_dir).parts])
        self._kept_per_part = [{} for _ in part_ends]
        for start, batch in iter_batches(self.manifest_dir, cols, _BATCH_ROWS):
            pos = np.arange(start, start + batch.num_rows, dtype=np.int64)
            if self.split is not None:
                sel = pc.fill_null(pc.equal(batch.column("split"), self.split), False).to_numpy(zero_copy_only=False)
                batch, pos = batch.filter(pa.array(sel)), pos[sel]
            if self.limit is not None and n_samples + batch.num_rows > self.limit:
                keep = self.limit - n_samples
                batch, pos = batch.slice(0, keep), pos[:keep]
            n_samples += batch.num_rows
            texts = [batch.column(CAPTION_COLUMNS[g]).to_pylist() for g in self.groups]
            n = batch.num_rows
            dig = [[None] * n for _ in self.groups]
            sets = bytearray(16 * n)
            kept = np.zeros(n, bool)
            for j in range(n):
                h = hashlib.blake2b(digest_size=16)
                any_text = False
                for i in range(len(self.groups)):
                    t = clean_caption(texts[i][j])
                    if t is None:
                        h.update(b"\x00" + _ABSENT)
                    else:
                        d = hashlib.sha1(t.encode("utf-8")).digest()
                        dig[i][j] = d
                        h.update(b"\x01" + d)
                        any_text = True
                kept[j] = any_text
                sets[16 * j : 16 * j + 16] = h.digest()
            bad = np.flatnonzero(~kept)
            n_empty += len(bad)
            examples += [batch.column(KEY)[int(b)].as_py() for b in bad[: max(0, 3 - len(examples))]]
            two = np.frombuffer(bytes(sets), dtype=np.uint64).reshape(n, 2)[kept]
            his.extend(two[:, 0])
            los.extend(two[:, 1])
            keys.append(batch.column(KEY).filter(pa.array(kept)).cast(pa.string()))
            positions.extend(pos[kept])
            parts = np.searchsorted(part_ends, pos[kept], side="right")
            splits = batch.column("split").filter(pa.array(kept)).dictionary_encode()
            codes = splits.indices.to_numpy(zero_copy_only=False)
            for code, split in enumerate(splits.dictionary.to_pylist()):
                for part, n in zip(*np.unique(parts[codes == code], return_counts=True)):
                    counts_of = self._kept_per_part[int(part)]
                    counts_of[split] = counts_of.get(split, 0) + int(n)
            kept_idx = np.flatnonzero(kept)
            writer.write_table(pa.table(
                {digest_column(g): pa.array([dig[i][j] for j in kept_idx], pa.binary(DIGEST_BYTES))
                 for i, g in enumerate(self.groups)},
                schema=_digest_schema(self.groups),
            ))
            bar.update(n)
            if self.limit is not None and n_samples >= self.limit:
                break
        bar.close()
        writer.close()
        keys_arr = pa.chunked_array(keys, pa.string()) if keys else pa.chunked_array([], pa.string())
        return keys_arr, positions.values(), his.values(), los.values(), n_samples, (n_empty, examples)

    # -- owners per group ------------------------------------------------------------------------------------
    def _row_digests(self, g: str, row_first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``uint8 [N, 20]`` digests of group ``g``'s text of every row (zeros if absent) and ``bool [N]`` presence."""
        n = len(row_first)
        dig = np.zeros((n, DIGEST_BYTES), np.uint8)
        present = np.zeros(n, bool)
        start = 0
        for batch in pq.ParquetFile(self.out / ".digests.parquet").iter_batches(
            batch_size=_BATCH_ROWS, columns=[digest_column(g)]
        ):
            lo, hi = np.searchsorted(row_first, [start, start + batch.num_rows])
            if hi > lo:
                col = batch.column(0).take(pa.array(row_first[lo:hi] - start))
                ok = ~pc.is_null(col).to_numpy(zero_copy_only=False)
                present[lo:hi] = ok
                if ok.any():
                    buf = col.filter(pa.array(ok))
                    values = np.frombuffer(buf.buffers()[1], np.uint8)
                    first = buf.offset * DIGEST_BYTES
                    dig[np.arange(lo, hi)[ok]] = values[first : first + len(buf) * DIGEST_BYTES].reshape(-1, DIGEST_BYTES)
            start += batch.num_rows
        return dig, present

    def _write_group(self, g: str, dig: np.ndarray, present: np.ndarray, owner: np.ndarray) -> None:
        digests = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(DIGEST_BYTES), len(dig), [_validity(present), pa.py_buffer(dig.tobytes())]
        )
        table = pa.table({digest_column(g): digests, owner_column(g): pa.array(owner, pa.int64())})
        pq.write_table(table, self.out / f".{g}.parquet", row_group_size=max(self.shard_rows, 1))

    def _write_rows(self, first_positions: np.ndarray, layout: CacheLayout) -> None:
        schema = _rows_schema(self.groups)
        groups = {g: pq.ParquetFile(self.out / f".{g}.parquet") for g in self.groups}
        with pq.ParquetWriter(self.out / "rows.parquet", schema) as writer:
            for s in range(layout.n_shards):
                r = layout.shard_range(s)
                cols = {ROW: pa.array(np.arange(r.start, r.stop, dtype=np.int64)),
                        SAMPLE: pa.array(first_positions[r.start : r.stop], pa.int64())}
                for g, f in groups.items():
                    part = f.read_row_group(s) if s < f.num_row_groups else None
                    cols[digest_column(g)] = part.column(0) if part is not None else pa.array([], pa.binary(DIGEST_BYTES))
                    cols[owner_column(g)] = part.column(1) if part is not None else pa.array([], pa.int64())
                writer.write_table(pa.table(cols, schema=schema), row_group_size=max(len(r), 1))
        for g in self.groups:
            (self.out / f".{g}.parquet").unlink()
        (self.out / ".digests.parquet").unlink()

    def _write_keys(self, keys: pa.ChunkedArray, key_row: np.ndarray, layout: CacheLayout) -> bytes:
        """Write ``keys.parquet`` (ordered by row, then manifest order; row group ``s`` = shard ``s``) and return
        the digest of the keys and their rows in manifest order (part of the plan hash)."""
        self._n_keys = len(key_row)
        lengths, data, rows = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
        start = 0
        for chunk in keys.chunks:  # manifest order: the keys and their rows enter the plan hash
            lengths.update(pc.binary_length(chunk).to_numpy().astype("<i8").tobytes())
            if len(chunk):
                offs = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
                data.update(memoryview(chunk.buffers()[2])[offs[0] : offs[-1]])
            rows.update(key_row[start : start + len(chunk)].astype("<i8").tobytes())
            start += len(chunk)
        order = np.argsort(key_row, kind="stable")
        stops = np.minimum((np.arange(layout.n_shards) + 1) * layout.shard_rows, layout.n_rows)
        bounds = np.concatenate([[0], np.searchsorted(key_row[order], stops)])
        chunk_starts = np.cumsum([0] + [len(c) for c in keys.chunks])
        schema = pa.schema([pa.field(KEY, pa.string()), pa.field(ROW, pa.int64())])
        with pq.ParquetWriter(self.out / "keys.parquet", schema) as writer:
            for s in range(layout.n_shards):
                sel = order[bounds[s] : bounds[s + 1]]
                table = pa.table({KEY: take_chunked(keys, chunk_starts, sel), ROW: pa.array(key_row[sel])}, schema=schema)
                writer.write_table(table, row_group_size=max(len(sel), 1))
        return lengths.digest() + data.digest() + rows.digest()


class _Growing:
    """A 1-D array filled batch by batch: one allocation of the expected size, doubled if it runs short."""

    def __init__(self, dtype, capacity: int):
        self.data = np.empty(max(capacity, 1), dtype)
        self.n = 0

    def extend(self, values: np.ndarray) -> None:
        if self.n + len(values) > len(self.data):
            grown = np.empty(max(2 * len(self.data), self.n + len(values)), self.data.dtype)
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        self.data[self.n : self.n + len(values)] = values
        self.n += len(values)

    def values(self) -> np.ndarray:
        """The filled part (a view)."""
        return self.data[: self.n]


def _validity(present: np.ndarray) -> pa.Buffer | None:
    if present.all():
        return None
    return pa.py_buffer(np.packbits(present, bitorder="little").tobytes())


def _digest_schema(groups: tuple[str, ...]) -> pa.Schema:
    return pa.schema([pa.field(digest_column(g), pa.binary(DIGEST_BYTES)) for g in groups])


def _rows_schema(groups: tuple[str, ...]) -> pa.Schema:
    fields = [pa.field(ROW, pa.int64()), pa.field(SAMPLE, pa.int64())]
    for g in groups:
        fields += [pa.field(digest_column(g), pa.binary(DIGEST_BYTES)), pa.field(owner_column(g), pa.int64())]
    return pa.schema(fields)


def _sorted_runs(hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group equal 128-bit digests ``(hi, lo)`` (``uint64 [n]`` each): the stable sort order (``int64 [n]``) and
    ``bool [n]`` marking the first element of each run of equal digests in that order.

    Sorts the 64-bit ``hi`` only (a stable radix sort, ~16 bytes per element of temporaries); in the rare case that
    two different digests share ``hi`` it sorts the pairs (``lexsort``) instead."""
    order = np.argsort(hi, kind="stable")
    hs = hi[order]
    starts = np.empty(len(hi), bool)
    starts[:1] = True
    np.not_equal(hs[1:], hs[:-1], out=starts[1:])
    del hs
    ls = lo[order]
    if ((ls[1:] != ls[:-1]) & ~starts[1:]).any():  # two digests with the same 64-bit prefix: sort on both halves
        del ls
        order = np.lexsort((lo, hi))
        hs, ls = hi[order], lo[order]
        starts = np.r_[True, (hs[1:] != hs[:-1]) | (ls[1:] != ls[:-1])]
    return order, starts


def _first_occurrence_rows(hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``n`` samples from their 128-bit caption-set digests ``(hi, lo)`` (``uint64 [n]`` each).

    Returns ``int64 [n]`` the row of each sample (rows numbered by first occurrence) and ``int64 [N]`` the sample
    index of each row's first occurrence (ascending)."""
    n = len(hi)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order, starts = _sorted_runs(hi, lo)  # stable: equal digests stay in sample order
    first = order[starts]
    row_of_run = np.empty(len(first), np.int64)
    row_of_run[np.argsort(first, kind="stable")] = np.arange(len(first))
    key_row = np.empty(n, np.int64)
    key_row[order] = row_of_run[np.cumsum(starts) - 1]
    return key_row, np.sort(first).astype(np.int64)


def _owners(dig: np.ndarray, present: np.ndarray) -> np.ndarray:
    """``int64 [N]``: for each row the first row with the same text digest (``dig uint8 [N, 20]``), -1 if absent."""
    n = len(dig)
    owner = np.full(n, -1, np.int64)
    idx = np.flatnonzero(present)
    if len(idx) == 0:
        return owner
    hi = dig[idx, :8].copy().view(np.uint64).ravel()  # any fixed reading of the bytes groups equal digests
    lo = dig[idx, 8:16].copy().view(np.uint64).ravel()
    order, starts = _sorted_runs(hi, lo)
    del hi, lo
    first_of_run = idx[order[starts]]
    owner[idx[order]] = first_of_run[np.cumsum(starts) - 1]
    return owner


class StoredPlan:
    """Read a stored plan shard by shard (each process reads only the shards it computes).

    Args:
        cache_dir: a cache directory holding ``plan/``.

    Raises:
        pipeline.cache.CacheError: no plan, or one of another format.
    """

    def __init__(self, cache_dir: str | Path):
        self.files = CacheFiles(cache_dir)
        info = _read_info(self.files)
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
            return _rows_schema(self.groups).empty_table()
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
        """The cleaned texts of rows ``local_rows`` (indices into the shard) as ``{group: text or None}``.

        Texts are read from the manifest at each row's first sample. A manifest rewritten after planning is caught
        before any shard is embedded (its parts' sizes and times differ from :attr:`PlanInfo.inputs`, so the job
        plans again and the plan hash check refuses the cache); here a text whose presence differs from the plan
        is refused as well.

        Raises:
            pipeline.cache.CacheError: a text is present where the plan has none, or the reverse.
        """
        t = self.rows(shard)
        samples = t.column(SAMPLE).to_numpy()[local_rows]
        captions = fetcher.take(samples)
        out = [{} for _ in range(len(local_rows))]
        for g in self.groups:
            planned = ~pc.is_null(t.column(digest_column(g))).to_numpy(zero_copy_only=False)[local_rows]
            for k, caption in enumerate(captions.column(CAPTION_COLUMNS[g]).to_pylist()):
                text = clean_caption(caption)
                if (text is not None) != planned[k]:
                    raise CacheError(
                        f"manifest row {int(samples[k])} no longer matches the stored plan ({g} caption changed); "
                        "the manifest was modified after planning: embed into a new cache directory"
                    )
                out[k][g] = text
        return out

    def sha1_hex(self, shard: int, local_rows: np.ndarray) -> dict[str, list[str | None]]:
        """Per group, the hex SHA-1 of the texts of rows ``local_rows`` of the shard (``None`` if absent)."""
        t = self.rows(shard)
        out = {}
        for g in self.groups:
            values = t.column(digest_column(g)).to_pylist()
            out[g] = [None if values[j] is None else values[j].hex() for j in local_rows.tolist()]
        return out

