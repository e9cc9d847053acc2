"""The stage-1 vector cache (SPEC §3): Zarr v3 vectors, Parquet key index, ``meta.json`` identity.

The directory layout (vectors, mask, index parts, finished markers, the stored plan and the key lookup) is owned by
:mod:`pipeline.cache_files`; this module writes and reads it.

A cache shard is exactly one Zarr shard, so each shard has exactly one writer (the process that owns it) and
concurrent writers can never touch the same storage object. A shard without its marker is unfinished: a rerun
redoes it, and readers refuse an unfinished cache unless told otherwise. Once every shard is finished, the job
stores the key lookup (:mod:`pipeline.key_lookup`) that readers memory-map.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
from collections.abc import Iterator, Sequence
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
from pipeline.cache_files import KEY, META_JSON, ROW, CacheFiles
from pipeline.errors import FlameError
from pipeline.key_lookup import KeyLookup
from pipeline.shard_files import ShardFiles

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
NORM_TOLERANCE = 1e-2  # |‖v‖ - 1| allowed for a stored float16 vector (float16 rounding is ~1e-3)

# Identity fields that must match between a cache and its user (stage 2, eval); the rest are informative.
IDENTITY_KEYS = (
    "llm", "llm_fingerprint", "layer", "readout", "dim", "prompt_set", "prompt_set_hash", "position_mode",
    "tokenization",
)


class CacheError(FlameError, RuntimeError):
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
        tokenization: how prompt text became token ids: ``"whole-prompt"`` (each single-facet prompt is the
            tokenizer's tokenization of its whole text, caption special-token text kept plain) or
            ``"split-segments"`` (template words and caption tokenized separately; what a cache written before
            this field existed holds, so such a cache is refused by a reader expecting ``"whole-prompt"``).
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
    tokenization: str = "split-segments"

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
            group.create_array(
                "vectors", shape=(n, f, ident.dim), dtype="float16", chunks=(lay.chunk_rows, f, ident.dim),
                shards=(lay.shard_rows, f, ident.dim), compressors=None, fill_value=0,
            )
            group.create_array(
                "mask", shape=(n, f), dtype="bool", chunks=(lay.chunk_rows, f), shards=(lay.shard_rows, f),
                fill_value=False,
            )
            files.index_dir.mkdir(exist_ok=True)
            files.done_dir.mkdir(exist_ok=True)
            atomic_write_bytes(files.meta, meta.to_json().encode())
        return cls(d, meta)

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
        tmp = part.with_name(f".{part.name}.tmp")
        pq.write_table(index, tmp)
        os.replace(tmp, part)
        marker = {"shard": shard, "rows": [rows.start, rows.stop], "keys": index.num_rows}
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

    def build_lookup(self, mask: np.ndarray | None = None) -> KeyLookup:
        """Store the key lookup of the finished cache (``lookup/``, :mod:`pipeline.key_lookup`), unless a lookup
        of this plan is already there.

        Args:
            mask: ``bool [N, F]`` facet presence of every row if the caller knows it (stage 1 derives it from the
                plan); ``None`` reads ``store.zarr/mask`` shard by shard.
        """
        return build_key_lookup(self.files, self.meta, mask)


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
    parts = (pq.read_table(files.index_part(s), columns=[KEY, ROW]) for s in shards if files.index_part(s).exists())
    log.info("building the key lookup of %s", files.root)
    return KeyLookup.build(parts, mask, lay.plan_hash, files.lookup_dir if persist else None)


class CacheLock:
    """At most one writing job per cache directory: ``writer.lock``, created exclusively by the job's rank 0.

    The file names the holder (host, pid, start time). A second job finds it and stops with a one-line
    :class:`CacheError` instead of recomputing shards or deleting the first job's temporary files. A lock whose
    holder is a dead process on this host (a killed job) is taken over; one from another host is only reported
    (its liveness cannot be checked from here): delete the file if that job is gone.

    Args:
        files: the cache's paths.
    """

    def __init__(self, files: CacheFiles):
        self.path = files.lock
        self.mine = {"host": socket.gethostname(), "pid": os.getpid(),
                     "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def acquire(self) -> None:
        """Take the lock. Raises :class:`CacheError` if another live job holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == self.mine["host"] and not _pid_alive(holder.get("pid")):
                    log.warning("taking over %s from process %s, which is no longer running", self.path, holder.get("pid"))
                    self.path.unlink(missing_ok=True)
                    continue
                raise CacheError(
                    f"cache {self.path.parent} is being written by process {holder.get('pid')} on "
                    f"{holder.get('host')} since {holder.get('started')}; wait for that job, or delete {self.path} "
                    "if it is dead"
                ) from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.mine, f)
            return

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self._holder() == self.mine:
            self.path.unlink(missing_ok=True)

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # unreadable: assume alive, never take over blindly
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CacheReader:
    """Read vectors by sample key, after checking the cache is finished and of the expected identity.

    Nothing here grows with the number of keys: key -> row and the facet mask come from the memory-mapped lookup
    (:mod:`pipeline.key_lookup`, built once when the cache is complete, or on first open of a cache that lacks
    it), vectors from memory-mapped shard files (:class:`pipeline.shard_files.ShardFiles`). Opening takes
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
        done = {p.name for p in self.files.done_dir.glob("shard-*.json")} if self.files.done_dir.exists() else set()
        self.missing_shards = [s for s in range(lay.n_shards) if self.files.marker(s).name not in done]
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
        """Row of each key, ``int64 [B]``; ``-1`` for keys not in the cache (exact, see :mod:`pipeline.key_lookup`)."""
        return self._lookup.rows(keys)

    def iter_index(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The index parts of the finished shards, one table per shard (:func:`pipeline.cache_files.index_schema`)."""
        missing = set(self.missing_shards)
        for s in range(self.meta.layout.n_shards):
            if s not in missing and self.files.index_part(s).exists():
                yield pq.read_table(self.files.index_part(s), columns=columns)

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
        direct = self._direct.read(rows) if self._direct is not None else None
        if direct is not None:
            return direct, self.mask_rows(rows)
        order = np.argsort(rows, kind="stable")
        uniq, inverse = np.unique(rows[order], return_inverse=True)
        vec = self.vectors.get_orthogonal_selection((uniq, slice(None), slice(None)))
        out_v = np.empty((len(rows),) + vec.shape[1:], dtype=vec.dtype)
        out_v[order] = vec[inverse]
        return out_v, self.mask_rows(rows)

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


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)
