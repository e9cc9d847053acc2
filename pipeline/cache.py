"""The stage-1 vector cache (SPEC §3): Zarr v3 vectors, Parquet key index, ``meta.json`` identity.

Layout of a cache directory::

    meta.json                 identity (what produced the vectors) + layout (rows, shards, plan hash)
    store.zarr/vectors        float16 [N, F, D], chunks of ``chunk_rows`` rows inside shards of ``shard_rows``
    store.zarr/mask           bool    [N, F], facet presence (False = that facet's text was absent)
    index/shard-SSSSS.parquet key -> row for the rows of shard S (many keys may share one row), text hashes,
                              tokens per facet, truncation flags
    done/shard-SSSSS.json     finished marker, written last, after the vectors and the index of shard S

A cache shard is exactly one Zarr shard, so each shard has exactly one writer (the process that owns it) and
concurrent writers can never touch the same storage object. A shard without its marker is unfinished: a rerun
redoes it, and readers refuse an unfinished cache unless told otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from pipeline import __version__
from pipeline.atomic import atomic_write_bytes
from pipeline.shard_files import ShardFiles

META_JSON = "meta.json"
FORMAT_VERSION = 1
NORM_TOLERANCE = 1e-2  # |‖v‖ - 1| allowed for a stored float16 vector (float16 rounding is ~1e-3)

# Identity fields that must match between a cache and its user (stage 2, eval); the rest are informative.
IDENTITY_KEYS = ("llm", "llm_fingerprint", "layer", "readout", "dim", "prompt_set", "prompt_set_hash", "position_mode")


class CacheError(RuntimeError):
    """A cache is missing, unfinished, corrupt, or holds a vector that is not finite and unit-norm."""


class CacheIdentityError(CacheError):
    """A cache was built with a different LLM, layer, readout, D or prompt set than the caller expects."""


@dataclass(frozen=True)
class CacheIdentity:
    """What produced the vectors of a cache; two caches with equal identities are interchangeable.

    Attributes:
        llm: model name or path as resolved (e.g. ``"gemma3-270m"``, ``"mistralai/Mistral-Nemo-Base-2407"``).
        llm_fingerprint: hex digest of the weights actually loaded.
        tokenizer: tokenizer name/path.
        layer: Hugging Face ``hidden_states`` index read out (0 = embedding output), SPEC §2.3.
        readout: ``"pre_norm"`` or ``"post_norm"`` (final norm applied).
        dim: hidden size D.
        prompt_set: prompt-set name (``"flame"``).
        prompt_set_hash: content hash of the prompt-set definition.
        facets: facet names in storage order (F of them).
        position_mode: ``"restart"`` or ``"continuous"`` (SPEC §2.4).
        bos_marker: what the official ``<s>`` marker became (``"drop"`` by default).
        max_tokens: context length one packed sequence was cut to.
        dtype_compute: dtype of the LLM forward (``"bfloat16"``/``"float32"``).
        dtype_stored: dtype of the stored vectors (``"float16"``).
        backend: ``"hf"`` or ``"vllm"``.
    """

    llm: str
    llm_fingerprint: str
    tokenizer: str
    layer: int
    readout: str
    dim: int
    prompt_set: str
    prompt_set_hash: str
    facets: tuple[str, ...]
    position_mode: str = "restart"
    bos_marker: str = "drop"
    max_tokens: int = 1024
    dtype_compute: str = "bfloat16"
    dtype_stored: str = "float16"
    backend: str = "hf"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["facets"] = list(self.facets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheIdentity:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["facets"] = tuple(kw.get("facets", ()))
        return cls(**kw)

    def check(self, expected: dict[str, Any], what: str = "cache") -> None:
        """Raise :class:`CacheIdentityError` if any field in ``expected`` differs from this identity.

        The message names each differing field with both values, e.g.
        ``layer: cache has 17, expected 12``.
        """
        mine = self.to_dict()
        diffs = [
            f"{k}: {what} has {mine.get(k)!r}, expected {v!r}"
            for k, v in expected.items()
            if k in mine and _norm(mine[k]) != _norm(v)
        ]
        if diffs:
            raise CacheIdentityError(f"{what} identity mismatch: " + "; ".join(diffs))

    def essential(self) -> dict[str, Any]:
        """The fields a consumer must match (:data:`IDENTITY_KEYS`)."""
        d = self.to_dict()
        return {k: d[k] for k in IDENTITY_KEYS}


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


@dataclass
class CacheLayout:
    """Row layout of a cache.

    Attributes:
        n_rows: N, number of unique rows (deduplicated texts).
        shard_rows: rows per cache shard (= rows per Zarr shard); shard ``s`` holds rows
            ``[s * shard_rows, min((s + 1) * shard_rows, N))``.
        chunk_rows: rows per Zarr chunk inside a shard (the unit of a random read).
        plan_hash: hash of the job plan (inputs, keys and their row assignment); a resumed job must match.
    """

    n_rows: int
    shard_rows: int
    chunk_rows: int
    plan_hash: str

    @property
    def n_shards(self) -> int:
        return max(1, -(-self.n_rows // self.shard_rows))

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_rows, min((shard + 1) * self.shard_rows, self.n_rows))


@dataclass
class CacheMeta:
    identity: CacheIdentity
    layout: CacheLayout
    format_version: int = FORMAT_VERSION
    package_version: str = __version__
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format_version": self.format_version,
                "identity": self.identity.to_dict(),
                "layout": dataclasses.asdict(self.layout),
                "package_version": self.package_version,
                "created": self.created,
                "extra": self.extra,
            },
            indent=2,
            ensure_ascii=False,
        )

    @classmethod
    def read(cls, cache_dir: str | Path) -> CacheMeta:
        path = Path(cache_dir) / META_JSON
        if not path.exists():
            raise CacheError(f"{cache_dir} is not a flame cache (no {META_JSON})")
        d = json.loads(path.read_text(encoding="utf-8"))
        if d.get("format_version", 0) > FORMAT_VERSION:
            raise CacheError(f"cache format {d['format_version']} is newer than this package's {FORMAT_VERSION}")
        return cls(
            identity=CacheIdentity.from_dict(d["identity"]),
            layout=CacheLayout(**d["layout"]),
            format_version=d["format_version"],
            package_version=d.get("package_version", "?"),
            created=d.get("created", ""),
            extra=d.get("extra", {}),
        )


def check_unit_vectors(vectors: np.ndarray, mask: np.ndarray, tol: float = NORM_TOLERANCE) -> None:
    """Raise :class:`CacheError` unless every present vector is finite and unit-norm (SPEC §2.3).

    Args:
        vectors: ``[n, F, D]`` float array.
        mask: ``[n, F]`` bool; absent facets must be all zeros.
        tol: allowed ``|‖v‖₂ − 1|``.
    """
    v = np.asarray(vectors, dtype=np.float32)
    if not np.isfinite(v).all():
        bad = np.argwhere(~np.isfinite(v).all(axis=-1))[:5].tolist()
        raise CacheError(f"non-finite vectors at (row, facet) {bad}")
    norms = np.linalg.norm(v, axis=-1)
    off = mask & (np.abs(norms - 1.0) > tol)
    if off.any():
        bad = np.argwhere(off)[:5].tolist()
        raise CacheError(f"vectors not unit-norm at (row, facet) {bad}: norms {norms[off][:5].tolist()}")
    if (~mask & (norms != 0)).any():
        raise CacheError("absent facets must be stored as zero vectors")


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
        self.meta = meta
        existing = self.dir / META_JSON
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
        group = zarr.open_group(self.dir / "store.zarr", mode="r+")
        self.vectors = group["vectors"]
        self.mask = group["mask"]

    @classmethod
    def create(cls, cache_dir: str | Path, meta: CacheMeta) -> CacheWriter:
        """Create the cache (``meta.json`` + empty arrays) if absent, then open it for writing."""
        d = Path(cache_dir)
        if not (d / META_JSON).exists():
            d.mkdir(parents=True, exist_ok=True)
            lay, ident = meta.layout, meta.identity
            group = zarr.open_group(d / "store.zarr", mode="w")
            n, f = max(lay.n_rows, 1), len(ident.facets)
            group.create_array(
                "vectors", shape=(n, f, ident.dim), dtype="float16", chunks=(lay.chunk_rows, f, ident.dim),
                shards=(lay.shard_rows, f, ident.dim), compressors=None, fill_value=0,
            )
            group.create_array(
                "mask", shape=(n, f), dtype="bool", chunks=(lay.chunk_rows, f), shards=(lay.shard_rows, f),
                fill_value=False,
            )
            (d / "index").mkdir(exist_ok=True)
            (d / "done").mkdir(exist_ok=True)
            atomic_write_bytes(d / META_JSON, meta.to_json().encode())
        return cls(d, meta)

    def _marker(self, shard: int) -> Path:
        return self.dir / "done" / f"shard-{shard:05d}.json"

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
        part = self.dir / "index" / f"shard-{shard:05d}.parquet"
        tmp = part.with_name(f".{part.name}.tmp")
        pq.write_table(index, tmp)
        os.replace(tmp, part)
        marker = {"shard": shard, "rows": [rows.start, rows.stop], "keys": index.num_rows}
        atomic_write_bytes(self._marker(shard), json.dumps(marker).encode())


class CacheReader:
    """Read vectors by sample key, after checking the cache is finished and of the expected identity.

    Args:
        cache_dir: a cache directory.
        expect: identity fields the caller requires (e.g. ``{"dim": 640, "layer": 17}``); a mismatch raises
            :class:`CacheIdentityError` naming both values.
        allow_incomplete: read a cache whose shards are not all finished (inspection only).

    Raises:
        CacheError: not a cache, or unfinished shards (listed) when ``allow_incomplete`` is False.
    """

    def __init__(self, cache_dir: str | Path, expect: dict[str, Any] | None = None, allow_incomplete: bool = False):
        self.dir = Path(cache_dir)
        self.meta = CacheMeta.read(self.dir)
        self.identity = self.meta.identity
        if expect:
            self.identity.check(expect)
        lay = self.meta.layout
        self.missing_shards = [s for s in range(lay.n_shards) if not (self.dir / "done" / f"shard-{s:05d}.json").exists()]
        if self.missing_shards and not allow_incomplete:
            raise CacheError(
                f"cache {self.dir} is unfinished: {len(self.missing_shards)} of {lay.n_shards} shards missing "
                f"(first {self.missing_shards[:5]}); rerun `flame embed` with the same arguments to finish it"
            )
        group = zarr.open_group(self.dir / "store.zarr", mode="r")
        self.vectors = group["vectors"]
        self.mask_array = group["mask"]
        self._direct = ShardFiles.open(self.dir / "store.zarr" / "vectors")
        self._mask: np.ndarray | None = None  # the whole [N, F] mask, read once on first use (N * F bytes)
        parts = [
            self.dir / "index" / f"shard-{s:05d}.parquet" for s in range(lay.n_shards) if s not in self.missing_shards
        ]
        tables = [pq.read_table(p) for p in parts if p.exists()]
        self.index = pa.concat_tables(tables, promote_options="default") if tables else pa.table(
            {"key": pa.array([], pa.string()), "row": pa.array([], pa.int64())}
        )
        keys = self.index.column("key").to_pylist()
        self._row = dict(zip(keys, self.index.column("row").to_numpy().tolist()))

    @property
    def dim(self) -> int:
        return self.identity.dim

    @property
    def facets(self) -> tuple[str, ...]:
        return self.identity.facets

    @property
    def keys(self) -> list[str]:
        return list(self._row)

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, key: str) -> bool:
        return key in self._row

    def rows(self, keys: Sequence[str]) -> np.ndarray:
        """Row of each key, ``int64 [B]``; ``-1`` for keys not in the cache."""
        return np.fromiter((self._row.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))

    def read_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectors ``float16 [B, F, D]`` and presence mask ``bool [B, F]`` of the given rows, in the given order."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            f, d = len(self.facets), self.dim
            return np.zeros((0, f, d), np.float16), np.zeros((0, f), bool)
        if self._mask is None:
            self._mask = self.mask_array[: self.meta.layout.n_rows]
        direct = self._direct.read(rows) if self._direct is not None else None
        if direct is not None:
            return direct, self._mask[rows]
        order = np.argsort(rows, kind="stable")
        uniq, inverse = np.unique(rows[order], return_inverse=True)
        vec = self.vectors.get_orthogonal_selection((uniq, slice(None), slice(None)))
        msk = self._mask[uniq]
        out_v = np.empty((len(rows),) + vec.shape[1:], dtype=vec.dtype)
        out_m = np.empty((len(rows),) + msk.shape[1:], dtype=bool)
        out_v[order] = vec[inverse]
        out_m[order] = msk[inverse]
        return out_v, out_m

    def get(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors ``float16 [B, F, D]`` and mask ``bool [B, F]`` for ``keys``. Raises ``KeyError`` if any is absent."""
        rows = self.rows(keys)
        if (rows < 0).any():
            missing = [k for k, r in zip(keys, rows) if r < 0][:5]
            raise KeyError(f"{int((rows < 0).sum())} keys not in cache {self.dir}, e.g. {missing}")
        return self.read_rows(rows)

    def load_all(self) -> tuple[np.ndarray, np.ndarray]:
        """All rows in memory: ``float16 [N, F, D]`` and ``bool [N, F]`` (for small caches)."""
        n = self.meta.layout.n_rows
        return self.vectors[:n], self.mask_array[:n]
