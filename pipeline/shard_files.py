"""Direct reads of the cache's vector shards (the fast path of :meth:`pipeline.cache.CacheReader.read_rows`).

The Zarr v3 sharding codec's on-disk layout is part of the Zarr v3 specification: with the plain ``bytes``
codec (no compression, as :class:`pipeline.cache.CacheWriter` stores vectors), a shard file is the inner
chunks' raw bytes followed by an index of ``(offset, nbytes)`` pairs and its crc32c. Reading random rows with
positioned reads of those files is ~100x faster than one Zarr chunk decode per row (``bench/cache_read.py``),
and, unlike a memory map, leaves nothing resident once the batch is returned.
Any other layout is declined and the caller reads through ``zarr``; ``tests/test_stage2_cache_read.py``
checks both paths return identical arrays.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


class ShardFiles:
    """Fast path of :meth:`CacheReader.read_rows`: positioned reads of the uncompressed, sharded vectors.

    :class:`CacheWriter` stores vectors without compression, so each Zarr v3 shard file (``sharding_indexed``
    codec, index at the end) is the raw little-endian float16 inner chunks followed by ``(offset, nbytes)``
    uint64 pairs per inner chunk and a crc32c of that index. Reading a batch of rows is then one ``os.pread`` per
    row instead of one Zarr chunk decode per row (about 100x faster for random keys).
    :meth:`open` returns ``None`` for any other layout, and :meth:`read` returns ``None`` for a shard whose
    chunks are not the plain layout; the caller then reads through Zarr.
    """

    EMPTY = np.uint64(2**64 - 1)  # index entry of a chunk that was never stored (all fill value, i.e. zeros)

    def __init__(self, array_dir: Path, shape: list[int], shard_rows: int, chunk_rows: int):
        self.dir = array_dir
        self.shard_rows, self.chunk_rows = shard_rows, chunk_rows
        self.row_shape = tuple(shape[1:])
        self.row_elems = int(np.prod(self.row_shape))
        self.n_chunks = -(-shard_rows // chunk_rows)
        self._shards: dict[int, tuple[np.ndarray, int] | None] = {}  # shard -> (chunk index, data end), ~1 KB each

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

    def _shard(self, s: int) -> tuple[np.ndarray, int] | None:
        """``(uint64 index [chunks, 2], end of the chunk data in bytes)`` of shard ``s``; ``None`` if the shard is
        not plain. An absent shard file (never written: all fill value) has an all-empty index."""
        if s not in self._shards:
            path = self._path(s)
            n_index = self.n_chunks * 16
            entry = None
            if not path.exists():
                entry = (np.full((self.n_chunks, 2), self.EMPTY, np.uint64), 0)
            elif path.stat().st_size >= n_index + 4:
                size = path.stat().st_size
                with open(path, "rb") as f:
                    f.seek(size - n_index - 4)
                    index = np.frombuffer(f.read(n_index), "<u8").reshape(-1, 2).copy()
                stored = index[:, 0] != self.EMPTY
                chunk_bytes = self.chunk_rows * self.row_elems * 2
                end = size - n_index - 4
                fits = (index[stored, 1] == chunk_bytes).all() and (index[stored, 0] + chunk_bytes <= end).all()
                if fits:
                    entry = (index, end)
            self._shards[s] = entry
        return self._shards[s]

    def _path(self, s: int) -> Path:
        return self.dir / "c" / str(s) / "0" / "0"

    def read(self, rows: np.ndarray) -> np.ndarray | None:
        """``float16 [B, *row_shape]`` of ``rows`` (any order, repeats allowed); ``None`` if a shard is not plain.

        Each row is one positioned read (``os.pread``) of its bytes, rows of one shard through one open file, so
        resident memory holds the batch only (a memory map would keep every page a long training run touched)."""
        rows = np.asarray(rows, np.int64)
        out = np.zeros((len(rows), self.row_elems), np.float16)
        row_bytes = self.row_elems * 2
        shard = rows // self.shard_rows
        for s in np.unique(shard):
            entry = self._shard(int(s))
            if entry is None:
                return None
            index, _ = entry
            sel = np.flatnonzero(shard == s)
            chunk, within = np.divmod(rows[sel] - s * self.shard_rows, self.chunk_rows)
            offset = index[chunk, 0]
            stored = offset != self.EMPTY
            if not stored.any():
                continue
            starts = (offset[stored] + within[stored].astype(np.uint64) * np.uint64(row_bytes)).tolist()
            fd = os.open(self._path(int(s)), os.O_RDONLY)
            try:
                data = b"".join(os.pread(fd, row_bytes, start) for start in starts)
            finally:
                os.close(fd)
            if len(data) != row_bytes * len(starts):
                raise OSError(f"short read from {self._path(int(s))}: the cache file is truncated")
            out[sel[stored]] = np.frombuffer(data, "<f2").reshape(-1, self.row_elems)
        return out.reshape((len(rows),) + self.row_shape)
