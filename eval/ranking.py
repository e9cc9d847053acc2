"""Top-k nearest neighbours by inner product, deterministic, exact (torch) or via faiss (SPEC §6).

Every ranking in ``eval`` comes from :func:`topk`. Its order is defined as:

1. score ``s(q, j) = <q, k_j>`` computed in **float64** by :func:`rescore` (one fixed summation order per
   pair, so two identical key vectors get bit-identical scores);
2. sort by descending score, **ties broken by the lower key index** (a stable sort of ``-score``).

Both backends only *propose* candidates in float32 (``torch.matmul`` over all keys, or faiss
``IndexFlatIP``, on GPU when ``faiss`` has GPUs), ``k + margin`` of them per query; the final order is the
float64 rescoring above. The two backends therefore return identical rankings whenever the true top-k is
inside both candidate lists, i.e. unless more than ``margin`` keys sit within float32 rounding (~1e-7) of
the k-th score.

Kept rather than ``torch.topk`` alone (what CLIP_benchmark ranks with): its order of tied scores is unspecified
and differs between CPU, GPU and faiss, so metrics would not be reproducible across machines.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.errors import FlameError

log = logging.getLogger(__name__)

RANKING_BACKENDS = ("auto", "torch", "faiss")
"""The ranking backends of :func:`topk` (``flame eval --ranking``)."""


class RankingBackendError(FlameError, ValueError):
    """A ranking backend that is not one of :data:`RANKING_BACKENDS`."""


def check_backend(backend: str) -> None:
    """Raise :class:`RankingBackendError` unless ``backend`` is one of :data:`RANKING_BACKENDS`."""
    if backend not in RANKING_BACKENDS:
        raise RankingBackendError(f"unknown ranking backend {backend!r} (known: {', '.join(RANKING_BACKENDS)})")

#: Above this many query x key scores, ``backend="auto"`` uses faiss instead of a full torch matmul.
EXACT_MAX_SCORES = 50_000_000
#: Extra float32 candidates per query that the float64 rescoring may reorder.
DEFAULT_MARGIN = 16
_QUERY_CHUNK = 1024


def rescore(queries: np.ndarray, keys: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Float64 inner products of each query with its candidate keys.

    Args:
        queries: ``[Q, D]`` float.
        keys: ``[N, D]`` float.
        candidates: ``[Q, C]`` int64 key indices (``-1`` = no candidate, scored ``-inf``).

    Returns:
        ``float64 [Q, C]`` scores.
    """
    q = np.asarray(queries, dtype=np.float64)
    k = np.asarray(keys, dtype=np.float64)
    safe = np.where(candidates < 0, 0, candidates)
    scores = np.einsum("qd,qcd->qc", q, k[safe])
    scores[candidates < 0] = -np.inf
    return scores


def order_candidates(scores: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` candidates of each row by (descending score, ascending index).

    Args:
        scores: ``float [Q, C]``.
        candidates: ``int64 [Q, C]`` key indices.
        k: how many to keep (``<= C``).

    Returns:
        ``int64 [Q, k]`` key indices.
    """
    # lexsort along each row: the last key is primary (-score), then the key index
    order = np.lexsort((candidates, -scores), axis=-1)[:, :k]
    return np.take_along_axis(candidates, order, axis=1)


def _candidates_torch(queries: np.ndarray, keys: np.ndarray, c: int) -> np.ndarray:
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    kt = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.float32))
    parts = []
    for start in range(0, q.shape[0], _QUERY_CHUNK):
        s = q[start : start + _QUERY_CHUNK] @ kt.T
        # stable descending sort: equal scores keep ascending key index
        idx = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :c]
        parts.append(idx.numpy())
    return np.concatenate(parts).astype(np.int64)


def _candidates_faiss(queries: np.ndarray, keys: np.ndarray, c: int) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatIP(keys.shape[1])
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
        log.debug("faiss search on %d GPU(s)", faiss.get_num_gpus())
    index.add(np.ascontiguousarray(keys, dtype=np.float32))
    _, idx = index.search(np.ascontiguousarray(queries, dtype=np.float32), c)
    return idx.astype(np.int64)


def topk(queries: np.ndarray, keys: np.ndarray, k: int, backend: str = "auto", margin: int = DEFAULT_MARGIN) -> np.ndarray:
    """Indices of the ``k`` best keys for every query, in the deterministic order of this module.

    Args:
        queries: ``[Q, D]`` float (L2-normalized for cosine similarity).
        keys: ``[N, D]`` float.
        k: neighbours wanted; clipped to ``N``.
        backend: ``"torch"`` (exact full matmul), ``"faiss"`` (``IndexFlatIP``, GPU when available) or
            ``"auto"`` (torch up to :data:`EXACT_MAX_SCORES` scores, faiss beyond).
        margin: extra float32 candidates per query reordered by the float64 rescoring.

    Returns:
        ``int64 [Q, min(k, N)]``.

    Raises:
        RankingBackendError: unknown backend.
        ValueError: query and key dimensions differ (a caller's bug: the eval compares identities first).
    """
    check_backend(backend)
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(f"query dim {queries.shape[1]} != key dim {keys.shape[1]}")
    n = keys.shape[0]
    k = min(k, n)
    c = min(k + margin, n)
    if backend == "auto":
        backend = "torch" if queries.shape[0] * n <= EXACT_MAX_SCORES else "faiss"
    if backend == "torch":
        cand = _candidates_torch(queries, keys, c)
    else:
        cand = _candidates_faiss(queries, keys, c)
    return order_candidates(rescore(queries, keys, cand), cand, k)
