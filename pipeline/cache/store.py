"""The stage-1 vector cache (SPEC §3): Zarr v3 vectors, Parquet key index, ``meta.json`` identity.

The directory layout (vectors, mask, index parts, finished markers, the stored plan and the key lookup) is owned by
:mod:`pipeline.cache.files`; this module writes and reads it.

A cache shard is exactly one Zarr shard, so each shard has exactly one writer (the process that owns it) and
concurrent writers can never touch the same storage object. A shard without its marker is unfinished: a rerun
redoes it, and readers refuse an unfinished cache unless told otherwise. Once every shard is finished, the job
stores the key lookup (:mod:`pipeline.cache.lookup`) that readers memory-map.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from pipeline.atomic import atomic_file, atomic_write_bytes
from pipeline.cache.files import KEY, META_JSON, ROW, CacheFiles
from pipeline.cache.lock import CacheLock
from pipeline.cache.lookup import KeyLookup
from pipeline.cache.meta import (
    FORMAT_VERSION,
    IDENTITY_KEYS,
    NORM_TOLERANCE,
    CacheError,
    CacheIdentity,
    CacheIdentityError,
    CacheKeyError,
    CacheLayout,
    CacheMeta,
    check_unit_vectors,
)
from pipeline.cache.shards import ShardFiles
from pipeline.cache.verify import check_parts, shard_checksums

log = logging.getLogger(__name__)

# The cache's contract (identity, layout, meta, errors) is defined in pipeline.cache.meta and the writer lock in
# pipeline.cache.lock; they are part of this module's interface too.
__all__ = [
    "FORMAT_VERSION", "IDENTITY_KEYS", "NORM_TOLERANCE", "CacheError", "CacheIdentity", "CacheIdentityError",
    "CacheKeyError", "CacheLayout", "CacheLock", "CacheMeta", "CacheReader", "CacheWriter", "build_key_lookup", "read_index_part",
    "check_unit_vectors",
]


class CacheWriter:
    """Creates or reopens a cache and commits shards atomically (one writer per shard).

    Several processes may construct a writer on the same directory: the first creates ``meta.json`` and the
    arrays, the others (and resumed jobs) reopen them after checking identity and layout match. Call
    :meth:`create` on one process before the others open (e.g. rank 0, then a barrier).

    Raises:
        CacheIdentityError: the directory holds a cache of another identity or plan (use a new directory or
            delete the old one).
    """

    def __init__(self, cache_dir: str | Path, meta: CacheMeta):
        self.dir = Path(cache_dir)
        self.files = CacheFiles(self.dir)
        self.meta = meta
        existing = self.files.meta
        if not existing.exists():
            raise CacheError(f"{self.dir} has no {META_JSON}; call CacheWriter.create first")
        old = CacheMeta.read(self.dir)
        old.identity.check(meta.identity.to_dict() | {"facets": list(meta.identity.facets)}, what="existing cache")
        if dataclasses.asdict(old.layout) != dataclasses.asdict(meta.layout):
            raise CacheIdentityError(
                f"existing cache at {self.dir} was planned differently: layout {dataclasses.asdict(old.layout)}"
                f" vs this job's {dataclasses.asdict(meta.layout)} (other manifest, --limit or --split?)"
            )
        self.meta = old
        group = zarr.open_group(self.files.store, mode="r+")
        self.vectors = group["vectors"]
        self.mask = group["mask"]
        self._direct: ShardFiles | bool | None = None  # opened on first read_vectors

    @classmethod
    def create(cls, cache_dir: str | Path, meta: CacheMeta) -> CacheWriter:
        """Create the cache (``meta.json`` + empty arrays) if absent, then open it for writing."""
        d = Path(cache_dir)
        files = CacheFiles(d)
        if not files.meta.exists():
            d.mkdir(parents=True, exist_ok=True)
            lay, ident = meta.layout, meta.identity
            group = zarr.open_group(files.store, mode="w")
            n, f = max(lay.n_rows, 1), len(ident.facets)
            attrs = zarr_attributes(meta)
            group.create_array(
                "vectors", shape=(n, f, ident.dim), dtype="float16", chunks=(lay.chunk_rows, f, ident.dim),
                shards=(lay.shard_rows, f, ident.dim), compressors=None, fill_value=0, attributes=attrs["vectors"],
            )
            group.create_array(
                "mask", shape=(n, f), dtype="bool", chunks=(lay.chunk_rows, f), shards=(lay.shard_rows, f),
                fill_value=False, attributes=attrs["mask"],
            )
            group.attrs.update(attrs["group"])
            files.index_dir.mkdir(exist_ok=True)
            files.done_dir.mkdir(exist_ok=True)
            atomic_write_bytes(files.meta, meta.to_json().encode())
        return cls(d, meta)

    @classmethod
    def open(cls, cache_dir: str | Path, identity: CacheIdentity) -> CacheWriter:
        """Reopen a cache another process created (:meth:`create`), after checking its vectors are of
        ``identity``; the meta on disk is used as it is (it is built once, by the creating process).

        Raises:
            CacheError: no ``meta.json`` yet. CacheIdentityError: the cache holds vectors of another identity.
        """
        meta = CacheMeta.read(cache_dir)
        return cls(cache_dir, dataclasses.replace(meta, identity=identity))

    def _marker(self, shard: int) -> Path:
        return self.files.marker(shard)

    def is_done(self, shard: int) -> bool:
        return self._marker(shard).exists()

    def write_shard(self, shard: int, vectors: np.ndarray, mask: np.ndarray, index: pa.Table) -> None:
        """Commit shard ``shard``: vectors, mask, index part, then the finished marker.

        Args:
            vectors: ``[n, F, D]`` float (any float dtype; stored float16), ``n = len(layout.shard_range(shard))``,
                each present vector L2-normalized; absent facets zero.
            mask: ``[n, F]`` bool facet presence.
            index: Parquet table with at least ``key`` (string) and ``row`` (int64, inside this shard).

        Raises:
            CacheError: wrong shape, a non-finite or non-unit vector, or an index row outside the shard.
        """
        rows = self.meta.layout.shard_range(shard)
        f, dim = len(self.meta.identity.facets), self.meta.identity.dim
        if vectors.shape != (len(rows), f, dim) or mask.shape != (len(rows), f):
            raise CacheError(
                f"shard {shard}: got vectors {vectors.shape} mask {mask.shape}, expected {(len(rows), f, dim)}"
            )
        stored = np.asarray(vectors, dtype=np.float16)
        check_unit_vectors(stored, mask)
        r = index.column("row").to_numpy()
        if len(r) and (r.min() < rows.start or r.max() >= rows.stop):
            raise CacheError(f"shard {shard}: index rows outside [{rows.start}, {rows.stop})")
        self._marker(shard).unlink(missing_ok=True)
        if len(rows):
            self.vectors[rows.start : rows.stop] = stored
            self.mask[rows.start : rows.stop] = mask
        part = self.files.index_part(shard)
        with atomic_file(part) as tmp:
            pq.write_table(index, tmp, write_page_checksum=True)
        # the digests of the shard's files as committed (pipeline.cache.verify checks them)
        marker = {"shard": shard, "rows": [rows.start, rows.stop], "keys": index.num_rows,
                  "sha256": shard_checksums(self.files, shard)}
        atomic_write_bytes(self._marker(shard), json.dumps(marker).encode())

    def read_vectors(self, rows: np.ndarray) -> np.ndarray:
        """Stored ``float16 [B, F, D]`` vectors of finished rows (e.g. the owner rows a later shard copies)."""
        rows = np.asarray(rows, np.int64)
        if self._direct is None:
            self._direct = ShardFiles.open(self.files.vectors) or False
        direct = self._direct.read(rows) if self._direct else None
        if direct is not None:
            return direct
        return self.vectors.get_orthogonal_selection((rows, slice(None), slice(None)))

    def record(self, extra: dict[str, Any]) -> None:
        """Merge ``extra`` into the meta's ``extra`` (one level deep: a dict value updates the dict there) and
        publish ``meta.json`` again (atomically); identity and layout never change. E.g. an import's final
        counts, known only when every shard is written."""
        for k, v in extra.items():
            if isinstance(v, dict) and isinstance(self.meta.extra.get(k), dict):
                self.meta.extra[k].update(v)
            else:
                self.meta.extra[k] = v
        atomic_write_bytes(self.files.meta, self.meta.to_json().encode())

    def build_lookup(self, mask: np.ndarray | None = None) -> KeyLookup:
        """Store the key lookup of the finished cache (``lookup/``, :mod:`pipeline.cache.lookup`), unless a lookup
        of this plan is already there.

        Args:
            mask: ``bool [N, F]`` facet presence of every row if the caller holds it in memory (an importer);
                ``None`` reads ``store.zarr/mask`` shard by shard, as the shards stored it.
        """
        return build_key_lookup(self.files, self.meta, mask)


def zarr_attributes(meta: CacheMeta) -> dict[str, dict[str, Any]]:
    """The attributes stored with the Zarr arrays (``zarr.json``), so a plain Zarr reader knows what it holds
    (informative; ``meta.json`` stays the contract): per array its axes, facet names and what a value means,
    and the cache identity with its hash (:meth:`pipeline.cache.meta.CacheIdentity.digest`)."""
    ident = meta.identity
    facets = list(ident.facets)
    common = {"flame_cache_format": meta.format_version, "identity_hash": ident.digest(), "facets": facets}
    return {
        "group": common | {"identity": ident.to_dict(), "rows": meta.layout.n_rows,
                           "description": "flame stage-1 text cache: see meta.json and the index/ parts for keys"},
        "vectors": common | {
            "axes": ["row", "facet", "dim"],
            "meaning": f"L2-normalized hidden state of {ident.llm} (layer {ident.layer}, {ident.readout}) per row "
                       "and facet, stored float16; zero where the facet is absent (see mask); the rows of a key are "
                       "given by index/*.parquet",
        },
        "mask": common | {"axes": ["row", "facet"], "meaning": "true where the facet's text is present"},
    }


def read_index_part(files: CacheFiles, shard: int, columns: list[str] | None = None) -> pa.Table:
    """The index part of a finished shard (:func:`pipeline.cache.files.index_schema`, ``columns`` only).

    Raises:
        CacheError: the part is missing or not readable Parquet (deleted, truncated, a page whose checksum does not
            match): the cache is damaged, and the message says how to redo the shard.
    """
    path = files.index_part(shard)
    redo = (f"delete {files.marker(shard)} and rerun the command that built the cache to redo the shard "
            "(`flame inspect --verify` prints it)")
    try:
        return pq.read_table(path, columns=columns, page_checksum_verification=True)
    except FileNotFoundError:
        raise CacheError(f"{path} is missing although shard {shard} is finished; {redo}") from None
    except (OSError, ValueError, pa.ArrowException) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CacheError(f"{path} is damaged ({first}); {redo}") from None


def build_key_lookup(files: CacheFiles, meta: CacheMeta, mask: np.ndarray | None = None,
                     persist: bool = True, shards: list[int] | None = None) -> KeyLookup:
    """Open the stored lookup of a cache or build it from the index parts (``shards``: those to include, default
    all), storing it under ``lookup/`` when ``persist`` (else it stays in memory)."""
    lay = meta.layout
    existing = KeyLookup.open(files.lookup_dir, lay.plan_hash) if persist else None
    if existing is not None:
        return existing
    shards = list(range(lay.n_shards)) if shards is None else shards
    if mask is None:
        group = zarr.open_group(files.store, mode="r")
        mask = np.zeros((lay.n_rows, len(meta.identity.facets)), bool)
        for s in shards:
            r = lay.shard_range(s)
            mask[r.start : r.stop] = group["mask"][r.start : r.stop]
    parts = (read_index_part(files, s, [KEY, ROW]) for s in shards)
    log.info("building the key lookup of %s", files.root)
    return KeyLookup.build(parts, mask, lay.plan_hash, files.lookup_dir if persist else None)


class CacheReader:
    """Read vectors by sample key, after checking the cache is finished and of the expected identity.

    Nothing here grows with the number of keys: key -> row and the facet mask come from the memory-mapped lookup
    (:mod:`pipeline.cache.lookup`, built once when the cache is complete, or on first open of a cache that lacks
    it), vectors from memory-mapped shard files (:class:`pipeline.cache.shards.ShardFiles`). Opening takes
    milliseconds at any size; a reader pickles as its arguments (DataLoader workers reopen the maps).

    Args:
        cache_dir: a cache directory.
        expect: identity fields the caller requires (e.g. ``{"dim": 640, "layer": 17}``); a mismatch raises
            :class:`CacheIdentityError` naming both values.
        allow_incomplete: read a cache whose shards are not all finished (inspection only; the lookup of the
            finished shards is then built in memory).

    Raises:
        CacheError: not a cache, or unfinished shards (listed) when ``allow_incomplete`` is False.
    """

    def __init__(self, cache_dir: str | Path, expect: dict[str, Any] | None = None, allow_incomplete: bool = False):
        self._args = (cache_dir, expect, allow_incomplete)
        self.dir = Path(cache_dir)
        self.files = CacheFiles(self.dir)
        self.meta = CacheMeta.read(self.dir)
        self.identity = self.meta.identity
        if expect:
            self.identity.check(expect)
        lay = self.meta.layout
        done = self.files.finished_shards()
        self.missing_shards = [s for s in range(lay.n_shards) if s not in done]
        if self.missing_shards and not allow_incomplete:
            raise CacheError(
                f"cache {self.dir} is unfinished: {len(self.missing_shards)} of {lay.n_shards} shards missing "
                f"(first {self.missing_shards[:5]}); rerun `flame embed` with the same arguments to finish it"
            )
        group = zarr.open_group(self.files.store, mode="r")
        self.vectors = group["vectors"]
        self.mask_array = group["mask"]
        self._direct = ShardFiles.open(self.files.vectors)
        if self.missing_shards:
            finished = [s for s in range(lay.n_shards) if s not in set(self.missing_shards)]
            self._lookup = build_key_lookup(self.files, self.meta, persist=False, shards=finished)
        else:
            self._lookup = build_key_lookup(self.files, self.meta, persist=_writable(self.files.root))

    def check_parts(self) -> None:
        """The cheap check of every part's presence and size (:func:`pipeline.cache.verify.check_parts`; no
        vector is read). Raises :class:`CacheError` naming the first damaged part and how to repair it."""
        check_parts(self.dir)

    def __getstate__(self) -> dict[str, Any]:
        return {"args": self._args}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(*state["args"])

    @property
    def dim(self) -> int:
        return self.identity.dim

    @property
    def facets(self) -> tuple[str, ...]:
        return self.identity.facets

    def __len__(self) -> int:
        """Number of keys."""
        return len(self._lookup)

    def __contains__(self, key: str) -> bool:
        return bool(self.rows([key])[0] >= 0)

    def rows(self, keys: Sequence[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Row of each key, ``int64 [B]``; ``-1`` for keys not in the cache (exact, see :mod:`pipeline.cache.lookup`)."""
        return self._lookup.rows(keys)

    def iter_index(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The index parts of the finished shards, one table per shard (:func:`pipeline.cache.files.index_schema`)."""
        missing = set(self.missing_shards)
        for s in range(self.meta.layout.n_shards):
            if s not in missing:
                yield read_index_part(self.files, s, columns)

    @property
    def index(self) -> pa.Table:
        """The whole key index as one table; O(keys) memory: for small caches and tests (use :meth:`iter_index`)."""
        tables = list(self.iter_index())
        if not tables:
            return pa.table({KEY: pa.array([], pa.string()), ROW: pa.array([], pa.int64())})
        return pa.concat_tables(tables, promote_options="default")

    def mask_rows(self, rows: np.ndarray) -> np.ndarray:
        """Facet presence ``bool [B, F]`` of ``rows``."""
        return np.asarray(self._lookup.mask[np.asarray(rows, np.int64)], bool)

    def read_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectors ``float16 [B, F, D]`` and presence mask ``bool [B, F]`` of the given rows, in the given order."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            f, d = len(self.facets), self.dim
            return np.zeros((0, f, d), np.float16), np.zeros((0, f), bool)
        mask = self.mask_rows(rows)
        direct = self._direct.read(rows, present=mask.any(axis=1)) if self._direct is not None else None
        if direct is not None:
            return direct, mask
        order = np.argsort(rows, kind="stable")
        uniq, inverse = np.unique(rows[order], return_inverse=True)
        try:
            vec = self.vectors.get_orthogonal_selection((uniq, slice(None), slice(None)))
        except (OSError, ValueError) as e:  # zarr: "Stored and computed checksum do not match", truncated shard
            shards = sorted({int(r) // self.meta.layout.shard_rows for r in uniq})
            raise CacheError(
                f"cache {self.dir}: reading rows of shards {shards[:5]} failed ({str(e)[:200]}): a shard file is "
                "damaged; `flame inspect --verify` names it and the command that redoes it") from None
        out_v = np.empty((len(rows),) + vec.shape[1:], dtype=vec.dtype)
        out_v[order] = vec[inverse]
        return out_v, self.mask_rows(rows)

    def get(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors ``float16 [B, F, D]`` and mask ``bool [B, F]`` for ``keys``, in the given order.

        Raises:
            CacheKeyError: a key is not in the cache (a ``KeyError`` too; the message counts them and names five).
            CacheError: a shard file holding a requested row is damaged.
        """
        rows = self.rows(keys)
        if (rows < 0).any():
            missing = [k for k, r in zip(keys, rows) if r < 0][:5]
            raise CacheKeyError(f"{int((rows < 0).sum())} keys not in cache {self.dir}, e.g. {missing}")
        return self.read_rows(rows)

    def load_all(self) -> tuple[np.ndarray, np.ndarray]:
        """All rows in memory: ``float16 [N, F, D]`` and ``bool [N, F]`` (for small caches)."""
        n = self.meta.layout.n_rows
        return self.vectors[:n], self.mask_array[:n]


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)
