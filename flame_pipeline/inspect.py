"""Cache inspection: identity, completeness, per-row validity, facet statistics and nearest neighbours.

Everything here reads a cache through :class:`pipeline.cache.store.CacheReader` and works shard by shard, so a
large cache is checked, searched and compared with a manifest without holding it in memory (one shard's vectors
and one batch of manifest keys at a time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.atomic import atomic_file
from pipeline.cache.files import KEY, ROW
from pipeline.cache.store import NORM_TOLERANCE, CacheError, CacheReader, read_index_part


@dataclass
class CacheReport:
    """What :func:`inspect_cache` found.

    Attributes:
        identity: the cache identity (``meta.json``).
        n_rows: unique vector rows N; ``n_keys``: sample keys pointing at them (``n_keys >= n_rows`` with dedup).
        shards_done / n_shards: finished shards out of planned ones.
        bad_rows: ``(row, facet)`` pairs of present vectors that are non-finite or not unit-norm (should be empty).
        facet_presence: facet name -> number of rows where the facet is present.
        facet_cosine: ``[F, F]`` float mean cosine between facets of the same row (rows where both are present).
        anisotropy: facet name -> mean cosine between vectors of random distinct rows (0 = isotropic).
        coverage: against a manifest: keys in both, manifest keys missing from the cache, cache keys not in it.
        unreadable_shards: shard -> the one-line error its vectors gave (a damaged shard file); its rows are not
            counted in the statistics.
    """

    identity: dict[str, Any]
    n_rows: int
    n_keys: int
    n_shards: int
    shards_done: int
    bad_rows: list[tuple[int, int]] = field(default_factory=list)
    facet_presence: dict[str, int] = field(default_factory=dict)
    facet_cosine: list[list[float]] = field(default_factory=list)
    anisotropy: dict[str, float] = field(default_factory=dict)
    coverage: dict[str, int] | None = None
    unreadable_shards: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def inspect_cache(
    reader: CacheReader,
    manifest_keys: Iterable[Sequence[str] | pa.Array] | None = None,
    pairs: int = 2000,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> CacheReport:
    """Check every stored row and compute facet statistics.

    Args:
        reader: an open cache (``allow_incomplete=True`` readers are fine: unfinished shards are skipped).
        manifest_keys: if given, the (unique) keys of a manifest to report coverage against: one list/Arrow
            array of strings, or an iterable of such batches.
        pairs: random row pairs per facet for the anisotropy estimate.
        seed: RNG seed of the pair draw.
        progress: called with the number of rows of each shard as it is checked.

    Returns:
        A :class:`CacheReport`. Invalid rows are listed, not raised, so a damaged cache can be diagnosed.
    """
    layout = reader.meta.layout
    facets = reader.facets
    f = len(facets)
    presence = np.zeros(f, np.int64)
    cos_sum = np.zeros((f, f), np.float64)
    cos_cnt = np.zeros((f, f), np.int64)
    bad: list[tuple[int, int]] = []
    unreadable: dict[int, str] = {}
    for shard in range(layout.n_shards):
        if shard in reader.missing_shards:
            continue
        rows = layout.shard_range(shard)
        try:
            vec, mask = reader.read_rows(np.arange(rows.start, rows.stop))
        except CacheError as exc:  # a damaged shard file: listed, the other shards are still checked
            unreadable[shard] = str(exc)
            continue
        v = vec.astype(np.float32)
        norms = np.linalg.norm(v, axis=-1)
        invalid = mask & (~np.isfinite(norms) | (np.abs(norms - 1) > NORM_TOLERANCE))
        bad += [(rows.start + int(r), int(c)) for r, c in np.argwhere(invalid)]
        presence += mask.sum(0)
        v = np.where(mask[..., None] & ~invalid[..., None], v, 0)
        ok = (mask & ~invalid).astype(np.float64)
        cos_sum += np.einsum("nfd,ngd->fg", v, v, dtype=np.float64)
        cos_cnt += (ok.T @ ok).astype(np.int64)
        if progress:
            progress(len(rows))
    with np.errstate(invalid="ignore", divide="ignore"):
        facet_cos = np.where(cos_cnt > 0, cos_sum / np.maximum(cos_cnt, 1), np.nan)
    report = CacheReport(
        identity=reader.identity.to_dict(),
        n_rows=layout.n_rows,
        n_keys=len(reader),
        n_shards=layout.n_shards,
        shards_done=layout.n_shards - len(reader.missing_shards),
        bad_rows=bad,
        facet_presence={name: int(c) for name, c in zip(facets, presence)},
        facet_cosine=np.round(facet_cos, 4).tolist(),
        anisotropy=anisotropy(reader, pairs=pairs, seed=seed) if not unreadable else {},
        unreadable_shards=unreadable,
    )
    if manifest_keys is not None:
        n_manifest = n_in = 0
        if isinstance(manifest_keys, (list, tuple, pa.Array, pa.ChunkedArray)):
            manifest_keys = [manifest_keys]
        for batch in manifest_keys:
            n_manifest += len(batch)
            n_in += int((reader.rows(batch) >= 0).sum())
        report.coverage = {
            "manifest_keys": n_manifest,
            "in_cache": n_in,
            "missing_from_cache": n_manifest - n_in,
            "not_in_manifest": len(reader) - n_in,
        }
    return report


def anisotropy(reader: CacheReader, pairs: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean cosine between the same facet of random distinct rows, per facet (Ethayarajh 2019's measure).

    Pre-norm LLM hidden states are strongly anisotropic (SPEC §2.5): values near 1 mean every text points
    the same way and only a small subspace carries meaning. Returns ``{facet: mean cosine}`` over present pairs.
    """
    n = reader.meta.layout.n_rows
    if n < 2 or reader.missing_shards:
        return {}
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n, pairs)
    b = (a + rng.integers(1, n, pairs)) % n
    va, ma = reader.read_rows(a)
    vb, mb = reader.read_rows(b)
    cos = np.einsum("pfd,pfd->pf", va.astype(np.float32), vb.astype(np.float32))
    both = ma & mb
    return {
        name: round(float(cos[both[:, i], i].mean()), 4)
        for i, name in enumerate(reader.facets)
        if both[:, i].any()
    }


def nearest_neighbours(
    reader: CacheReader, query: np.ndarray, facet: str, k: int = 10
) -> list[tuple[list[str], float]]:
    """The k rows whose ``facet`` vector is closest (inner product = cosine) to ``query``.

    Searched shard by shard with a flat faiss index (exact), keeping the best ``k`` so far, so memory holds one
    shard's vectors whatever the cache size.

    Args:
        query: ``float32 [D]`` unit vector.
    Returns:
        ``[(keys of the row, cosine), ...]`` best first; a row shared by several keys lists all of them.

    Raises:
        pipeline.cache.store.CacheError: a facet the cache does not have.
    """
    import faiss

    if facet not in reader.facets:
        raise CacheError(f"unknown facet {facet!r}; the cache has {list(reader.facets)}")
    i = reader.facets.index(facet)
    layout = reader.meta.layout
    q = np.ascontiguousarray(np.asarray(query, np.float32)[None])
    best_s, best_r = np.zeros(0, np.float32), np.zeros(0, np.int64)
    missing = set(reader.missing_shards)
    for shard in range(layout.n_shards):
        rows = layout.shard_range(shard)
        if shard in missing or not len(rows):
            continue
        vec, mask = reader.read_rows(np.arange(rows.start, rows.stop))
        present = np.flatnonzero(mask[:, i])
        if not len(present):
            continue
        index = faiss.IndexFlatIP(vec.shape[-1])
        index.add(np.ascontiguousarray(vec[present, i].astype(np.float32)))
        scores, ids = index.search(q, min(k, len(present)))
        ok = ids[0] >= 0
        best_s = np.concatenate([best_s, scores[0][ok]])
        best_r = np.concatenate([best_r, rows.start + present[ids[0][ok]]])
        keep = np.lexsort((best_r, -best_s))[:k]  # by score, ties to the lower row
        best_s, best_r = best_s[keep], best_r[keep]
    keys_of_row: dict[int, list[str]] = {}
    wanted = {int(r) for r in best_r}
    for shard in sorted({r // layout.shard_rows for r in wanted}):
        part = read_index_part(reader.files, shard, [KEY, ROW])
        for key, row in zip(part.column(KEY).to_pylist(), part.column(ROW).to_pylist()):
            if row in wanted:
                keys_of_row.setdefault(row, []).append(key)
    return [(keys_of_row.get(int(r), []), float(s)) for s, r in zip(best_s, best_r)]


def plot_facet_cosine(report: CacheReport, facets: tuple[str, ...], path: str | Path) -> Path:
    """Save the ``[F, F]`` mean-cosine matrix as a labelled heatmap PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.array(report.facet_cosine, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(facets), 0.8 + 0.6 * len(facets)))
    im = ax.imshow(m, cmap="viridis", vmin=np.nanmin(m), vmax=1.0)
    ax.set_xticks(range(len(facets)), facets, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(facets)), facets, fontsize=8)
    for i in range(len(facets)):
        for j in range(len(facets)):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6, color="white")
    fig.colorbar(im, ax=ax, label="mean cosine (same row)")
    ax.set_title(f"Facet similarity, {report.identity['llm']} layer {report.identity['layer']}")
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix[1:] or "png")
    plt.close(fig)
    return path
