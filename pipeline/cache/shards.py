"""Memory-mapped reads of the cache's vector shards (the fast path of :meth:`pipeline.cache.store.CacheReader.read_rows`).

The Zarr v3 sharding codec's on-disk layout is part of the Zarr v3 specification: with the plain ``bytes``
codec (no compression, as :class:`pipeline.cache.store.CacheWriter` stores vectors), a shard file is the inner
chunks' raw bytes followed by an index of ``(offset, nbytes)`` pairs and its crc32c. Reading random rows
from memory maps of those files is ~100x faster than one Zarr chunk decode per row (``bench/cache_read.py``).
Any other layout is declined and the caller reads through ``zarr``; ``tests/test_stage2_cache_read.py``
checks both paths return identical arrays.

Pages a memory map has touched stay in the process's resident set until they are unmapped, so a long training
run would count the whole cache as its RSS (page cache, shared and reclaimable, but counted). The reader therefore
tells the kernel to drop its mapped pages (``madvise(MADV_DONTNEED)``; the data stays in the page cache) each
time it has read :attr:`ShardFiles.RELEASE_BYTES` (256 MiB) since the last time, counting for every row the 64 KiB the
kernel maps around a fault (``fault_around_bytes``). Resident memory stays bounded by that budget, and reads stay
as fast as plain memory-map reads (the measurements behind this choice: ``bench/README.md``, section Scale).
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import numpy as np

from pipeline.cache.meta import CacheError

try:  # what zarr's crc32c codec uses (a dependency of zarr >= 3)
    from google_crc32c import value as _crc32c
except ImportError:  # pragma: no cover - then only zarr's own reads check it
    _crc32c = None


class ShardFiles:
    """Fast path of :meth:`CacheReader.read_rows`: memory-mapped reads of the uncompressed, sharded vectors.

    :class:`CacheWriter` stores vectors without compression, so each Zarr v3 shard file (``sharding_indexed``
    codec, index at the end) is the raw little-endian float16 inner chunks followed by ``(offset, nbytes)``
    uint64 pairs per inner chunk and a crc32c of that index. Reading a batch of rows is then one vectorised
    gather from memory maps instead of one Zarr chunk decode per row (about 100x faster for random keys).
    :meth:`open` returns ``None`` for any other layout, and :meth:`read` returns ``None`` for a shard whose
    chunks are not the plain layout; the caller then reads through Zarr.
    """

    EMPTY = np.uint64(2**64 - 1)  # index entry of a chunk that was never stored (all fill value, i.e. zeros)
    RELEASE_BYTES = 256 << 20  # mapped bytes read between two releases of the resident pages
    FAULT_AROUND = 64 << 10  # bytes the kernel maps around a faulting read of a mapped file (fault_around_bytes)

    def __init__(self, array_dir: Path, shape: list[int], shard_rows: int, chunk_rows: int):
        self.dir = array_dir
        self.shard_rows, self.chunk_rows = shard_rows, chunk_rows
        self.row_shape = tuple(shape[1:])
        self.row_elems = int(np.prod(self.row_shape))
        self.n_chunks = -(-shard_rows // chunk_rows)
        self._shards: dict[int, tuple[np.ndarray, np.ndarray] | None] = {}
        self._maps: list[np.memmap] = []
        self._read_since_release = 0

    @classmethod
    def open(cls, array_dir: Path) -> ShardFiles | None:
        try:
            meta = json.loads((array_dir / "zarr.json").read_text(encoding="utf-8"))
            (codec,) = meta["codecs"]
            conf = codec["configuration"]
            shard_shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
            keys = meta["chunk_key_encoding"]
            index_codecs = conf["index_codecs"]
            plain = (
                codec["name"] == "sharding_indexed"
                and meta["data_type"] == "float16"
                and conf["codecs"] == [{"name": "bytes", "configuration": {"endian": "little"}}]
                and [c["name"] for c in index_codecs] == ["bytes", "crc32c"]
                and index_codecs[0].get("configuration", {}).get("endian", "little") == "little"
                and conf.get("index_location", "end") == "end"
                and keys["name"] == "default"
                and keys.get("configuration", {}).get("separator", "/") == "/"
                and shard_shape[1:] == meta["shape"][1:] == conf["chunk_shape"][1:]
            )
        except (OSError, KeyError, TypeError, ValueError):
            return None
        return cls(array_dir, meta["shape"], shard_shape[0], conf["chunk_shape"][0]) if plain else None

    def _shard(self, s: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``(float16 rows view [elements, row_elems], uint64 index [chunks, 2])`` of shard ``s``; ``None`` if the
        shard is not plain."""
        if s not in self._shards:
            path = self.dir / "c" / str(s) / "0" / "0"
            n_index = self.n_chunks * 16
            entry = None
            if path.exists() and path.stat().st_size >= n_index + 4:
                mm = np.memmap(path, dtype=np.uint8, mode="r")
                mm._mmap.madvise(mmap.MADV_RANDOM)  # no read-ahead into the page cache for random rows
                self._maps.append(mm)
                raw_index = mm[len(mm) - n_index - 4 : len(mm) - 4].tobytes()
                if _crc32c is not None and _crc32c(raw_index) != int(np.frombuffer(mm[len(mm) - 4 :].tobytes(), "<u4")[0]):
                    raise CacheError(
                        f"{path}: the chunk index of cache shard {s} does not match its CRC-32C (the file is damaged); "
                        f"delete its finished marker done/shard-{s:05d}.json and rerun the command that built the cache "
                        "(`flame inspect --verify` prints it) to redo the shard")
                index = np.frombuffer(raw_index, "<u8").reshape(-1, 2)
                stored = index[:, 0] != self.EMPTY
                chunk_bytes = self.chunk_rows * self.row_elems * 2
                end = len(mm) - n_index - 4
                fits = (index[stored, 1] == chunk_bytes).all() and (index[stored, 0] + chunk_bytes <= end).all()
                if fits and (index[stored, 0] % 2 == 0).all() and end >= 2 * self.row_elems:
                    # rows[i] = the row_elems values starting at element i: fancy indexing copies whole rows
                    entry = (np.lib.stride_tricks.sliding_window_view(mm[:end].view("<f2"), self.row_elems), index)
            elif not path.exists():
                entry = (np.zeros((0, self.row_elems), np.float16), np.full((self.n_chunks, 2), self.EMPTY, np.uint64))
            self._shards[s] = entry
        return self._shards[s]

    def release(self) -> None:
        """Drop the mapped pages from this process's resident set (they stay in the page cache)."""
        for mm in self._maps:
            mm._mmap.madvise(mmap.MADV_DONTNEED)
        self._read_since_release = 0

    def read(self, rows: np.ndarray, present: np.ndarray | None = None) -> np.ndarray | None:
        """``float16 [B, *row_shape]`` of ``rows`` (any order, repeats allowed); ``None`` if a shard is not plain.

        ``present`` (``bool [B]``, optional): which rows hold at least one vector. Such a row whose chunk is not
        stored (its shard file or chunk is gone) would read as zeros: :class:`~pipeline.cache.meta.CacheError`
        is raised instead, naming the shard file.
        """
        # a row's bytes plus what the kernel maps around a random read (fault-around: 64 KiB by default)
        self._read_since_release += len(rows) * (self.row_elems * 2 + self.FAULT_AROUND)
        if self._read_since_release > self.RELEASE_BYTES:
            self.release()
        order = np.argsort(rows // self.shard_rows, kind="stable")  # the rows of one shard are one run of `order`
        shard = rows[order] // self.shard_rows
        cuts = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1], True])
        parts = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            s = int(shard[a])
            entry = self._shard(s)
            if entry is None:
                return None
            sel = order[a:b]
            chunk, within = np.divmod(rows[sel] - s * self.shard_rows, self.chunk_rows)
            offset = entry[1][chunk, 0]
            stored = offset != self.EMPTY
            lost = 0 if present is None or stored.all() else int((present[sel] & ~stored).sum())
            if lost:
                raise CacheError(
                    f"{lost} rows of cache shard {s} have vectors (facet mask) but no stored data in "
                    f"{self.dir / 'c' / str(s) / '0' / '0'} (file or chunk missing): the cache is damaged; "
                    f"delete its finished marker done/shard-{s:05d}.json and rerun flame embed to redo the shard"
                )
            parts.append((entry[0], sel, stored, offset // 2 + within.astype(np.uint64) * self.row_elems))
        if len(parts) == 1 and parts[0][2].all():  # one shard, every chunk stored: a single gather
            data, sel, _, start = parts[0]
            out = np.empty((len(rows), self.row_elems), np.float16)
            out[sel] = data[start.astype(np.int64)]
            return out.reshape((len(rows),) + self.row_shape)
        out = np.zeros((len(rows), self.row_elems), np.float16)
        for data, sel, stored, start in parts:
            out[sel[stored]] = data[start[stored].astype(np.int64)]
        return out.reshape((len(rows),) + self.row_shape)
