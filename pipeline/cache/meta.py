"""What a stage-1 cache is (SPEC §3): its identity, layout and ``meta.json``, and the unit-vector contract.

The contract that stage 1 writes and stage 2 / eval check: :class:`CacheIdentity` (what produced the vectors;
:data:`IDENTITY_KEYS` must match between a cache and its user), :class:`CacheLayout` (rows, shards, facets),
:class:`CacheMeta` (``meta.json``) and :func:`check_unit_vectors` (:data:`NORM_TOLERANCE`). The reading and
writing of vectors is :mod:`pipeline.cache.store`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.cache.files import META_JSON, CacheFiles
from pipeline.errors import FlameError

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


class CacheKeyError(CacheError, KeyError):
    """Keys asked of a cache that it does not hold; a ``KeyError`` too, whose message is shown as is."""

    __str__ = Exception.__str__  # KeyError's own would quote the message


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
        diffs = [f"{k}: {what} has {mine!r}, expected {theirs!r}"
                 for k, theirs, mine in identity_differences(expected, self.to_dict(), keys=list(expected))]
        if diffs:
            raise CacheIdentityError(f"{what} identity mismatch: " + "; ".join(diffs))

    def essential(self) -> dict[str, Any]:
        """The fields a consumer must match (:data:`IDENTITY_KEYS`)."""
        d = self.to_dict()
        return {k: d[k] for k in IDENTITY_KEYS}

    def digest(self) -> str:
        """``"sha256:<hex>"`` of the :meth:`essential` fields (sorted-key JSON): equal for interchangeable caches."""
        text = json.dumps(self.essential(), sort_keys=True, ensure_ascii=False)
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def identity_differences(
    expected: dict[str, Any], actual: dict[str, Any], keys: list[str] | None = None, *,
    llm_by_fingerprint: bool = False,
) -> list[tuple[str, Any, Any]]:
    """The identity fields whose values differ: ``[(field, expected value, actual value)]``, in ``keys`` order.

    The one comparison of identities (stage-1 writers, stage-2 resume, eval's text side). A field counts only when
    both dicts carry it (an older identity without a newer field is not refused for it); tuples and lists compare
    equal.

    Args:
        expected / actual: identity dicts (:meth:`CacheIdentity.to_dict` or partial ones).
        keys: the fields to compare; default :data:`IDENTITY_KEYS`.
        llm_by_fingerprint: skip ``llm`` (a name or a path, which may legitimately differ) when both sides
            carry an ``llm_fingerprint`` of the weights, which is then compared instead.
    """
    keys = list(IDENTITY_KEYS) if keys is None else keys
    if llm_by_fingerprint and expected.get("llm_fingerprint") and actual.get("llm_fingerprint"):
        keys = [k for k in keys if k != "llm"]
    return [(k, expected[k], actual[k]) for k in keys
            if k in expected and k in actual and _norm(expected[k]) != _norm(actual[k])]


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
        path = CacheFiles(cache_dir).meta  # refuses URLs (pipeline.paths.local_dir)
        if not path.exists():
            raise CacheError(f"{cache_dir} is not a flame cache (no {META_JSON})")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(d, dict) or not {"identity", "layout", "format_version"} <= set(d):
                raise ValueError("not a cache description")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            raise CacheError(f"{path} is damaged ({e}); the cache cannot be read") from None
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
