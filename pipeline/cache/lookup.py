"""Key -> row lookup of a cache with no Python object per key (SPEC §11), memory-mapped from ``lookup/``.

A cache maps millions of sample keys to rows. Holding them in a ``dict`` costs ~100 bytes per key in every process
and DataLoader worker (6 GB at 15M keys) and minutes to build on every open. Instead the lookup is built once,
when the cache is complete, into plain files that every process memory-maps::

    lookup/lookup.json   format, hash function, counts, the plan hash it belongs to, a probe key and its hash, and the
                         SHA-256 of the other files (``flame inspect --verify`` recomputes them)
    lookup/hashes.npy    uint64 [K]  64-bit key hashes, sorted ascending
    lookup/order.npy     int64  [K]  position in ``keys.arrow`` of each sorted hash
    lookup/rows.npy      int64  [K]  cache row of each key, in ``keys.arrow`` order
    lookup/keys.arrow    Arrow IPC file, one string column ``key`` (batches of up to 2^20 keys)
    lookup/mask.npy      bool   [N, F] facet presence of each row (the same values as ``store.zarr/mask``)

A query hashes its keys (``pandas.util.hash_array``: SipHash-2-4 of the UTF-8 bytes with pandas' fixed key),
binary-searches the sorted hashes and then **compares the stored key strings** with the queried ones, so a hash
collision can never return another key's row: lookups are exact. Opening maps the files (milliseconds at any
size); a read of 3,072 keys touches a few pages per key. Resident memory grows only with the pages touched.
"""

from __future__ import annotations

import json
import logging
import mmap
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.assets import sha256_file
from pipeline.atomic import atomic_directory
from pipeline.cache.meta import CacheError

log = logging.getLogger(__name__)

FORMAT = 1
HASH_FUNCTION = "pandas.util.hash_array(categorize=False): siphash-2-4, utf-8, key 0123456789123456"
KEYS_PER_BATCH = 1 << 20
LOOKUP_JSON = "lookup.json"


def key_hashes(keys: Sequence[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit hashes of sample keys, ``uint64 [B]`` (stable across processes, machines and runs)."""
    if isinstance(keys, (pa.Array, pa.ChunkedArray)):
        values = keys.to_numpy(zero_copy_only=False)
    else:
        values = np.empty(len(keys), dtype=object)
        values[:] = list(keys)
    if len(values) == 0:
        return np.zeros(0, np.uint64)
    return pd.util.hash_array(values, categorize=False)


def take_chunked(array: pa.ChunkedArray, chunk_starts: np.ndarray, positions: np.ndarray) -> pa.Array:
    """``array[positions]`` for a chunked array without combining its chunks (a copy of the whole array).

    Args:
        array: the chunked array; chunk_starts: ``int64 [C]`` global position of each chunk's first element.
        positions: ``int64 [B]`` global positions, any order, repeats allowed.
    """
    positions = np.asarray(positions, np.int64)
    if len(positions) == 0:
        return pa.array([], array.type)
    if array.num_chunks == 1:
        return array.chunk(0).take(pa.array(positions))
    chunk = np.searchsorted(chunk_starts, positions, side="right") - 1
    pieces, where = [], []
    for c in np.unique(chunk):
        sel = np.flatnonzero(chunk == c)
        pieces.append(array.chunk(int(c)).take(pa.array(positions[sel] - chunk_starts[c])))
        where.append(sel)
    inverse = np.empty(len(positions), np.int64)
    inverse[np.concatenate(where)] = np.arange(len(positions))
    return pa.concat_arrays(pieces).take(pa.array(inverse))


def _map_random(path: Path) -> mmap.mmap:
    """A read-only memory map of ``path`` advised ``MADV_RANDOM``: a lookup maps the pages it reads and no
    neighbours (the kernel's default fault-around would make every random key cost 64 KiB of resident memory)."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else mmap.mmap(-1, 1)
    mm.madvise(mmap.MADV_RANDOM)
    return mm


def _map_npy(path: Path) -> np.ndarray:
    """``np.load(path, mmap_mode="r")`` with the map advised ``MADV_RANDOM`` (see :func:`_map_random`)."""
    array = np.load(path, mmap_mode="r")
    array._mmap.madvise(mmap.MADV_RANDOM)
    return array


class KeyLookup:
    """Exact key -> row lookup and per-row facet mask over (usually memory-mapped) arrays.

    Attributes:
        info: the ``lookup.json`` content (``keys``, ``rows``, ``facets``, ``plan_hash``...).
        mask: ``bool [N, F]`` facet presence by row.
    """

    def __init__(self, hashes: np.ndarray, order: np.ndarray, key_rows: np.ndarray, keys: pa.ChunkedArray,
                 mask: np.ndarray, info: dict[str, Any]):
        self.hashes, self.order, self.key_rows, self.keys = hashes, order, key_rows, keys
        self.mask, self.info = mask, info
        lengths = [len(c) for c in keys.chunks]
        self._chunk_starts = np.cumsum([0] + lengths)[:-1].astype(np.int64)

    def __len__(self) -> int:
        return len(self.hashes)

    @classmethod
    def open(cls, lookup_dir: Path, plan_hash: str) -> KeyLookup | None:
        """Memory-map a lookup; ``None`` if it is absent, of another format or plan, or its probe hash differs
        (a hash function that changed between versions), so the caller rebuilds it.

        Raises:
            CacheError: a file of the lookup is missing, truncated or does not parse, or the arrays' sizes differ
                from what ``lookup.json`` recorded (one line, saying to delete ``lookup/`` so it is rebuilt).
        """
        try:
            return cls._open(Path(lookup_dir), plan_hash)
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise CacheError(
                f"the key lookup {lookup_dir} is damaged ({text}); delete that folder and open the cache again: "
                "the lookup is rebuilt from the index parts") from None

    @classmethod
    def _opens(cls, lookup_dir: Path, plan_hash: str) -> bool:
        """Whether a lookup of this plan opens at ``lookup_dir`` (a damaged one does not)."""
        try:
            return cls.open(lookup_dir, plan_hash) is not None
        except CacheError:
            return False

    @classmethod
    def _open(cls, lookup_dir: Path, plan_hash: str) -> KeyLookup | None:
        path = lookup_dir / LOOKUP_JSON
        if not path.exists():
            return None
        info = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(info, dict):
            raise ValueError(f"{LOOKUP_JSON} is not a JSON object")
        if info.get("format") != FORMAT or info.get("plan_hash") != plan_hash or info.get("hash") != HASH_FUNCTION:
            return None
        probe = info.get("probe")
        if probe and int(key_hashes([probe["key"]])[0]) != int(probe["hash"]):
            log.warning("key hashes of this environment differ from those of %s; rebuilding the lookup", lookup_dir)
            return None
        arrays = {name: _map_npy(Path(lookup_dir) / f"{name}.npy") for name in ("hashes", "order", "rows", "mask")}
        keys = pa.ipc.open_file(pa.py_buffer(_map_random(Path(lookup_dir) / "keys.arrow"))).read_all().column("key")
        n = info["keys"]
        sizes = [len(arrays[name]) for name in ("hashes", "order", "rows")] + [len(keys)]
        if sizes != [n] * 4 or arrays["mask"].shape[0] != info["rows"]:
            raise ValueError(f"sizes {sizes} and {arrays['mask'].shape[0]} mask rows, {LOOKUP_JSON} recorded "
                             f"{n} keys and {info['rows']} rows")
        return cls(arrays["hashes"], arrays["order"], arrays["rows"], keys, arrays["mask"], info)

    @classmethod
    def build(
        cls, parts: Iterable[pa.Table], mask: np.ndarray, plan_hash: str, out_dir: Path | None = None
    ) -> KeyLookup:
        """Build the lookup from index parts (tables with ``key`` and ``row``), in memory or into ``out_dir``.

        Args:
            parts: the index parts in shard order; keys must be unique across them.
            mask: ``bool [N, F]`` facet presence of every row.
            plan_hash: the cache's plan hash (a lookup of another plan is never used).
            out_dir: where to store it (written to a hidden sibling, then renamed into place; if another process
                got there first, its copy is used); ``None`` keeps it in memory only.

        Memory: ~40 bytes per key (hashes, rows, their sort) plus up to 2^20 keys' strings at a time.

        Raises:
            ValueError: a key occurs twice (in two index parts).
        """
        info = {"format": FORMAT, "hash": HASH_FUNCTION, "rows": int(mask.shape[0]),
                "facets": int(mask.shape[1]) if mask.ndim == 2 else 0, "plan_hash": plan_hash}
        if out_dir is None:
            batches: list[pa.RecordBatch] = []
            sorted_hashes, order, key_rows = _hash_keys(parts, batches.append)
            keys = pa.chunked_array([b.column(0) for b in batches] or [pa.array([], pa.string())])
            lookup = cls(sorted_hashes, order, key_rows, keys, np.asarray(mask, bool), info | {"keys": len(keys)})
            lookup._check_unique()
            return lookup
        # another process may publish the same lookup first: a copy that opens for this plan is kept
        with atomic_directory(out_dir, keep_existing=lambda d: cls._opens(d, plan_hash)) as tmp:
            with pa.ipc.new_file(str(tmp / "keys.arrow"), _KEY_SCHEMA) as writer:
                sorted_hashes, order, key_rows = _hash_keys(parts, writer.write_batch)
            info["keys"] = len(key_rows)
            if len(key_rows):
                first = pa.ipc.open_file(pa.memory_map(str(tmp / "keys.arrow"))).get_batch(0).column(0)[0].as_py()
                info["probe"] = {"key": first, "hash": str(int(key_hashes([first])[0]))}
            for name, array in (("hashes", sorted_hashes), ("order", order), ("rows", key_rows), ("mask", mask)):
                np.save(tmp / f"{name}.npy", array if name != "mask" else np.asarray(array, bool))
            info["sha256"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
            (tmp / LOOKUP_JSON).write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
            del sorted_hashes, order, key_rows
        lookup = cls.open(out_dir, plan_hash)
        if lookup is None:
            raise ValueError(f"the key lookup just written to {out_dir} does not open")
        lookup._check_unique()
        return lookup

    def _check_unique(self) -> None:
        """Raise ``ValueError`` if a key occurs twice (equal hashes whose key strings are equal)."""
        same = np.flatnonzero(self.hashes[1:] == self.hashes[:-1])
        if len(same) == 0:
            return
        a, b = self._keys_at(self.order[same]), self._keys_at(self.order[same + 1])
        dup = np.flatnonzero(pc.equal(a, b).to_numpy(zero_copy_only=False))
        if len(dup):
            raise CacheError(f"{len(dup)} keys occur twice in the cache index, e.g. {a[int(dup[0])].as_py()!r}")

    def _keys_at(self, positions: np.ndarray) -> pa.Array:
        """The stored keys at ``positions`` (``int64 [B]``, ``keys.arrow`` order), in that order."""
        return take_chunked(self.keys, self._chunk_starts, positions)

    def rows(self, keys: Sequence[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Cache row of each key, ``int64 [B]``; ``-1`` for keys not in the cache."""
        query = keys if isinstance(keys, (pa.Array, pa.ChunkedArray)) else pa.array(list(keys), pa.string())
        if isinstance(query, pa.ChunkedArray):
            query = query.combine_chunks()
        query = query.cast(pa.string())
        out = np.full(len(query), -1, np.int64)
        n = len(self.hashes)
        if n == 0 or len(query) == 0:
            return out
        h = key_hashes(query)
        at = np.minimum(np.searchsorted(self.hashes, h), n - 1)
        cand = np.flatnonzero(self.hashes[at] == h)
        if len(cand) == 0:
            return out
        pos = np.asarray(self.order[at[cand]])
        same = pc.equal(self._keys_at(pos), query.take(pa.array(cand))).to_numpy(zero_copy_only=False)
        out[cand[same]] = np.asarray(self.key_rows[pos[same]])
        for j in cand[~same]:  # another key with the same 64-bit hash: look at its equal-hash neighbours
            k = int(at[j]) + 1
            while k < n and self.hashes[k] == h[j]:
                p = int(self.order[k])
                if self._keys_at(np.array([p]))[0].as_py() == query[int(j)].as_py():
                    out[j] = int(self.key_rows[p])
                    break
                k += 1
        return out


_KEY_SCHEMA = pa.schema([pa.field("key", pa.string())])


def _hash_keys(
    parts: Iterable[pa.Table], emit: Callable[[pa.RecordBatch], None]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hash the keys of index parts and hand them on in batches of up to :data:`KEYS_PER_BATCH` keys.

    Args:
        parts: tables with ``key`` (string) and ``row`` (integer) columns, in shard order.
        emit: receives each ``RecordBatch`` of keys (schema ``key: string``), in order.

    Returns:
        ``(sorted_hashes uint64 [n], order int64 [n], rows int64 [n])``: the 64-bit key hashes sorted, the
        stable argsort that sorts them (positions in key order), and each key's cache row in key order.
    """
    hashes, rows, pending = [], [], []

    def flush() -> None:
        if pending:
            emit(pa.record_batch([pa.concat_arrays(pending)], schema=_KEY_SCHEMA))
            pending.clear()

    for part in parts:
        key_col = part.column("key").combine_chunks().cast(pa.string())
        hashes.append(key_hashes(key_col))
        rows.append(part.column("row").to_numpy().astype(np.int64))
        pending.append(key_col)
        if sum(len(a) for a in pending) >= KEYS_PER_BATCH:
            flush()
    flush()
    all_hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    del hashes
    order = np.argsort(all_hashes, kind="stable")
    sorted_hashes = all_hashes[order]
    del all_hashes
    key_rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return sorted_hashes, order.astype(np.int64), key_rows
