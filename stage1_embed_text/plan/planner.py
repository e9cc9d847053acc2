"""Compute a stage-1 plan (SPEC §2.6, §11): one pass over the manifest, then rows, keys and owners on digests.

From the manifest rows (in manifest order, after ``split`` and ``limit``) :class:`Planner` cleans each sample's
captions (:func:`stage1_embed_text.encode.prompts.prompt_captions`, as packing does), digests them, assigns rows to distinct caption
sets and owners to distinct texts (:mod:`stage1_embed_text.plan.dedup`), and writes ``rows.parquet`` and
``keys.parquet`` (:mod:`stage1_embed_text.plan.files`) into a folder. Memory at ``n`` kept samples: ~16 bytes
per sample while rows are assigned, ~45 bytes per sample (key strings in Arrow, rows, a sort order) while keys
are written, one group's 20-byte digests per row while owners are found; texts themselves are never held beyond
one batch.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from manifests.schema import ManifestError, iter_batches, read_manifest_info
from pipeline.cache.files import KEY, ROW
from pipeline.cache.lookup import take_chunked
from pipeline.cache.store import CacheLayout
from stage1_embed_text.encode.prompts import PromptSet, prompt_captions
from stage1_embed_text.plan.dedup import Growing, first_occurrence_rows, owners
from stage1_embed_text.plan.files import (
    DIGEST_BYTES,
    GROUP_COLUMNS,
    PLAN_FORMAT,
    SAMPLE,
    PlanInfo,
    digest_column,
    digest_schema,
    owner_column,
    rows_schema,
)

log = logging.getLogger(__name__)

_ABSENT = bytes(DIGEST_BYTES)
_BATCH_ROWS = 16_384


class Planner:
    """One planning pass: manifest -> digests -> rows -> owners -> ``rows.parquet``/``keys.parquet`` in ``out``."""

    def __init__(self, manifest_dir, prompt_set: PromptSet, out: Path, shard_rows: int, chunk_rows: int,
                 split: str | None, limit: int | None, progress: bool):
        self.manifest_dir, self.out = manifest_dir, out
        self.prompt_set, self.groups = prompt_set, prompt_set.group_names
        self.prompt_hash = prompt_set.content_hash
        self.shard_rows, self.chunk_rows = shard_rows, chunk_rows
        self.split, self.limit, self.progress = split, limit, progress

    def run(self) -> PlanInfo:
        """Plan, write ``rows.parquet`` and ``keys.parquet`` into ``out``, and return the :class:`PlanInfo`
        (its ``inputs`` left empty for the caller)."""
        keys, positions, set_hi, set_lo, n_samples, empty = self._digest_pass()
        pa.default_memory_pool().release_unused()
        key_row, row_first = first_occurrence_rows(set_hi, set_lo)
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
            owner = owners(dig, present)
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
        """Stream the manifest once: write kept samples' text digests to ``.digests.parquet`` and return
        ``(keys, positions, set_hi, set_lo, n_samples, (n_empty, empty_examples))`` of the kept samples (keys as
        an Arrow string array, positions ``int32``/``int64 [n]``, set digests ``uint64 [n]`` each)."""
        cols = [KEY, "split", *(GROUP_COLUMNS[g] for g in self.groups)]
        writer = pq.ParquetWriter(self.out / ".digests.parquet", digest_schema(self.groups))
        n_samples, n_empty, examples = 0, 0, []
        info = read_manifest_info(self.manifest_dir)
        n_manifest = info.counts.get("total", sum(info.counts.values()))
        total = info.counts.get(self.split, 0) if self.split else n_manifest
        if self.split and total == 0:
            splits = ", ".join(f"{k} {v}" for k, v in info.counts.items() if k != "total")
            raise ManifestError(f"{self.manifest_dir} has no rows of split {self.split!r} (it has: {splits})")
        if self.limit is not None:
            total = min(total, self.limit)
        # kept samples' outputs go into arrays allocated once (appending a small array per batch between the
        # batches' freed caption strings fragments the heap at millions of samples)
        keys = []
        pos_dtype = np.int32 if n_manifest < 2**31 else np.int64
        positions, his, los = Growing(pos_dtype, total), Growing(np.uint64, total), Growing(np.uint64, total)
        bar = tqdm(total=total, unit="sample", desc="plan", dynamic_ncols=True, disable=not self.progress)
        part_ends = np.cumsum([pq.ParquetFile(Path(self.manifest_dir) / p).metadata.num_rows for p in info.parts])
        self._kept_per_part = [{} for _ in part_ends]
        for start, batch in iter_batches(self.manifest_dir, cols, _BATCH_ROWS):
            batch, pos = self._select(batch, np.arange(start, start + batch.num_rows, dtype=np.int64), n_samples)
            n_samples += batch.num_rows
            dig, sets, kept = self._digest_batch(batch)
            bad = np.flatnonzero(~kept)
            n_empty += len(bad)
            examples += [batch.column(KEY)[int(b)].as_py() for b in bad[: max(0, 3 - len(examples))]]
            two = np.frombuffer(sets, dtype=np.uint64).reshape(batch.num_rows, 2)[kept]
            his.extend(two[:, 0])
            los.extend(two[:, 1])
            keys.append(batch.column(KEY).filter(pa.array(kept)).cast(pa.string()))
            positions.extend(pos[kept])
            self._count_kept(batch, pos, kept, part_ends)
            kept_idx = np.flatnonzero(kept)
            writer.write_table(pa.table(
                {digest_column(g): pa.array([dig[i][j] for j in kept_idx], pa.binary(DIGEST_BYTES))
                 for i, g in enumerate(self.groups)},
                schema=digest_schema(self.groups),
            ))
            bar.update(batch.num_rows)
            if self.limit is not None and n_samples >= self.limit:
                break
        bar.close()
        writer.close()
        keys_arr = pa.chunked_array(keys, pa.string()) if keys else pa.chunked_array([], pa.string())
        return keys_arr, positions.values(), his.values(), los.values(), n_samples, (n_empty, examples)

    def _select(self, batch: pa.RecordBatch, pos: np.ndarray, n_before: int) -> tuple[pa.RecordBatch, np.ndarray]:
        """The batch's rows of ``split`` (if set), cut so that at most ``limit`` samples are taken in all, with
        their manifest positions (``int64``); ``n_before`` samples were taken from earlier batches."""
        if self.split is not None:
            sel = pc.fill_null(pc.equal(batch.column("split"), self.split), False).to_numpy(zero_copy_only=False)
            batch, pos = batch.filter(pa.array(sel)), pos[sel]
        if self.limit is not None and n_before + batch.num_rows > self.limit:
            keep = self.limit - n_before
            batch, pos = batch.slice(0, keep), pos[:keep]
        return batch, pos

    def _digest_batch(self, batch: pa.RecordBatch) -> tuple[list[list[bytes | None]], bytes, np.ndarray]:
        """Clean every caption of the batch (SPEC §2.1, :func:`prompt_captions`: the texts packing embeds) and
        digest it.

        Returns per group the 20-byte SHA-1 of each sample's cleaned text (``None`` if absent), the samples'
        16-byte caption-set digests concatenated (``16 * n`` bytes) and ``bool [n]``: the sample has a text.
        """
        columns = [batch.column(GROUP_COLUMNS[g]).to_pylist() for g in self.groups]
        cleaned = prompt_captions(self.prompt_set, [dict(zip(self.groups, c)) for c in zip(*columns)])
        del columns
        texts = [cleaned[g] for g in self.groups]
        n = batch.num_rows
        dig = [[None] * n for _ in self.groups]
        sets = bytearray(16 * n)
        kept = np.zeros(n, bool)
        for j in range(n):
            h = hashlib.blake2b(digest_size=16)
            any_text = False
            for i in range(len(self.groups)):
                t = texts[i][j]
                if t is None:
                    h.update(b"\x00" + _ABSENT)
                else:
                    d = hashlib.sha1(t.encode("utf-8")).digest()
                    dig[i][j] = d
                    h.update(b"\x01" + d)
                    any_text = True
            kept[j] = any_text
            sets[16 * j : 16 * j + 16] = h.digest()
        return dig, bytes(sets), kept

    def _count_kept(self, batch: pa.RecordBatch, pos: np.ndarray, kept: np.ndarray, part_ends: np.ndarray) -> None:
        """Add the batch's kept samples to :attr:`PlanInfo.kept_per_part` (per manifest part, per split)."""
        parts = np.searchsorted(part_ends, pos[kept], side="right")
        splits = batch.column("split").filter(pa.array(kept)).dictionary_encode()
        codes = splits.indices.to_numpy(zero_copy_only=False)
        for code, split in enumerate(splits.dictionary.to_pylist()):
            for part, n in zip(*np.unique(parts[codes == code], return_counts=True)):
                counts_of = self._kept_per_part[int(part)]
                counts_of[split] = counts_of.get(split, 0) + int(n)

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
        """Write group ``g``'s row digests and owners to a hidden per-group file (one row group per shard)."""
        digests = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(DIGEST_BYTES), len(dig), [_validity(present), pa.py_buffer(dig.tobytes())]
        )
        table = pa.table({digest_column(g): digests, owner_column(g): pa.array(owner, pa.int64())})
        pq.write_table(table, self.out / f".{g}.parquet", row_group_size=max(self.shard_rows, 1))

    def _write_rows(self, first_positions: np.ndarray, layout: CacheLayout) -> None:
        """Join the per-group files into ``rows.parquet`` (row group ``s`` = shard ``s``) and delete them."""
        schema = rows_schema(self.groups)
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



def _validity(present: np.ndarray) -> pa.Buffer | None:
    """Arrow validity bitmap of ``bool [N]`` presence, ``None`` when all are present."""
    if present.all():
        return None
    return pa.py_buffer(np.packbits(present, bitorder="little").tobytes())
