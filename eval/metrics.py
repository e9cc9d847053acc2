"""Retrieval and zero-shot classification metrics with their chance levels (SPEC §6).

Names follow CLIP_benchmark where it has one: ``image_retrieval_recall@k`` is **text -> image** (a caption
queries the images), ``text_retrieval_recall@k`` is **image -> text**; ``acc1``, ``acc5``,
``mean_per_class_recall``. Every value is a fraction in ``[0, 1]``.

Rankings come from :func:`eval.ranking.topk` (descending score, ties broken by the lower index).

Recall@k, accuracy@k and the class prototypes are computed here rather than by CLIP_benchmark's
``recall_at_k`` / ``accuracy`` / ``zero_shot_classifier``: those rank with ``torch.topk`` in float32, whose order
of tied scores is unspecified (and they need a model object, not cached vectors). On inputs without ties the
values are equal, which ``tests/test_eval_metrics.py`` checks against CLIP_benchmark itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from eval.ranking import order_candidates, topk

RECALL_KS = (1, 5, 10)


@dataclass
class RetrievalOutcome:
    """Result of :func:`retrieval_metrics`.

    Attributes:
        metrics: ``{"image_retrieval_recall@k": .., "text_retrieval_recall@k": ..}`` for each k.
        chance: the same keys, the expected value under a uniformly random ranking.
        counts: ``n_images``, ``n_texts``, ``n_pairs`` and the number of queries each way.
        i2t_queries: ``int64 [Qi]`` image indices that were queries (images with at least one positive).
        i2t_topk: ``int64 [Qi, K]`` text indices ranked for each of them.
        t2i_queries, t2i_topk: the same for text queries over images.
    """

    metrics: dict[str, float]
    chance: dict[str, float]
    counts: dict[str, int]
    i2t_queries: np.ndarray = field(repr=False)
    i2t_topk: np.ndarray = field(repr=False)
    t2i_queries: np.ndarray = field(repr=False)
    t2i_topk: np.ndarray = field(repr=False)


def hits_at_k(ranked: np.ndarray, queries: np.ndarray, positives: np.ndarray,
              n_keys: int) -> np.ndarray:
    """Which ranked keys are positives of their query.

    Args:
        ranked: ``int64 [Q, K]`` key indices per query, best first.
        queries: ``int64 [Q]`` query indices (rows of ``positives``' first column).
        positives: ``int64 [P, 2]`` (query index, key index) pairs.
        n_keys: number of keys (to encode pairs as ``query * n_keys + key``).

    Returns:
        ``bool [Q, K]``.
    """
    pos = np.asarray(positives, dtype=np.int64)
    codes = pos[:, 0] * n_keys + pos[:, 1]
    return np.isin(queries[:, None] * n_keys + ranked, codes)


def recall_from_hits(hits: np.ndarray, ks: tuple[int, ...] = RECALL_KS) -> dict[int, float]:
    """Recall@k: the fraction of queries with **any** positive in their top k, for each k in ``ks``
    (CLIP_benchmark's ``(recall_at_k(...) > 0).float().mean()``)."""
    return {k: float(hits[:, :k].any(axis=1).mean()) if len(hits) else float("nan") for k in ks}


def chance_recall(n_positives: np.ndarray, n_keys: int, ks: tuple[int, ...] = RECALL_KS) -> dict[int, float]:
    """Expected recall@k of a random ranking.

    A query with ``m`` positives among ``N`` keys misses all of them in a random top k with probability
    ``C(N-m, k) / C(N, k) = prod_{i<k} (N-m-i)/(N-i)``; chance is the mean over queries of one minus that
    (``k/N`` when every query has one positive).

    Args:
        n_positives: ``int [Q]`` positives per query.
        n_keys: ``N``.
    """
    m = np.asarray(n_positives, dtype=np.float64)
    out = {}
    for k in ks:
        kk = min(k, n_keys)
        i = np.arange(kk, dtype=np.float64)
        miss = np.prod(np.clip((n_keys - m[:, None] - i) / (n_keys - i), 0.0, None), axis=1)
        out[k] = float((1.0 - miss).mean()) if len(m) else float("nan")
    return out


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, pairs: np.ndarray,
                      ks: tuple[int, ...] = RECALL_KS, backend: str = "auto") -> RetrievalOutcome:
    """Image<->text recall@k with several positives per query (SPEC §6).

    An image query hits at k if **any** text paired with it is in its top k texts; a text query hits if any
    image paired with it is in its top k images. Images (texts) without any pair are in the gallery but are
    not queries.

    Args:
        image_emb: ``float [N_img, D]``, L2-normalized.
        text_emb: ``float [N_txt, D]``, L2-normalized.
        pairs: ``int64 [P, 2]`` positive (image index, text index) pairs, no duplicates needed.
        ks: recall cut-offs.
        backend: see :func:`eval.ranking.topk`.

    Raises:
        ValueError: empty pairs or an index out of range.
    """
    pairs = np.unique(np.asarray(pairs, dtype=np.int64).reshape(-1, 2), axis=0)
    n_img, n_txt = len(image_emb), len(text_emb)
    if len(pairs) == 0:
        raise ValueError("retrieval needs at least one (image, text) pair")
    if pairs[:, 0].max() >= n_img or pairs[:, 1].max() >= n_txt or pairs.min() < 0:
        raise ValueError(f"pair index out of range for {n_img} images / {n_txt} texts")
    kmax = max(ks)
    i2t_q, i2t_m = np.unique(pairs[:, 0], return_counts=True)
    t2i_q, t2i_m = np.unique(pairs[:, 1], return_counts=True)
    i2t = topk(image_emb[i2t_q], text_emb, kmax, backend)
    t2i = topk(text_emb[t2i_q], image_emb, kmax, backend)
    r_i2t = recall_from_hits(hits_at_k(i2t, i2t_q, pairs, n_txt), ks)
    r_t2i = recall_from_hits(hits_at_k(t2i, t2i_q, pairs[:, ::-1], n_img), ks)
    c_i2t = chance_recall(i2t_m, n_txt, ks)
    c_t2i = chance_recall(t2i_m, n_img, ks)
    metrics, chance = {}, {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = r_t2i[k]
        metrics[f"text_retrieval_recall@{k}"] = r_i2t[k]
        chance[f"image_retrieval_recall@{k}"] = c_t2i[k]
        chance[f"text_retrieval_recall@{k}"] = c_i2t[k]
    counts = {"n_images": n_img, "n_texts": n_txt, "n_pairs": len(pairs),
              "n_image_queries": len(i2t_q), "n_text_queries": len(t2i_q)}
    return RetrievalOutcome(metrics, chance, counts, i2t_q, i2t, t2i_q, t2i)


def duplicate_text_ceiling(texts: Sequence[str], pairs: np.ndarray) -> tuple[int, dict[str, float]]:
    """How many retrieval texts repeat an earlier text exactly, and the recall@1 a perfect model could reach.

    Identical strings get identical text vectors, so they tie in every ranking: images paired with different
    copies of one caption (two COCO images both captioned "A man riding a wave on a surfboard.") cannot all
    be found at rank 1, and the metric stays below 1 for any model. The standard metric is not changed;
    this tells how far below 1 its ceiling is, under this module's ranking (ties broken by the lower index):

    - text -> image: the copies of one string rank the images identically, so they share one top-1 image;
      at most ``max over images of (copies paired with that image)`` of them hit.
    - image -> text: of tied copies only the lowest-indexed can come first, so an image query can hit at 1
      only if one of its positive texts is the first copy of its string (any unique text is).

    Args:
        texts: ``N_txt`` texts of the task.
        pairs: ``int64 [P, 2]`` positive (image index, text index) pairs, as for :func:`retrieval_metrics`.

    Returns:
        ``(n_duplicate_texts, ceiling)``: texts equal to an earlier text (a string present 3 times counts 2),
        and ``{"text_retrieval_recall@1": .., "image_retrieval_recall@1": ..}`` over the queries
        :func:`retrieval_metrics` uses (1.0 each way when no text repeats).

    Raises:
        ValueError: empty pairs or a text index out of range.
    """
    pairs = np.unique(np.asarray(pairs, dtype=np.int64).reshape(-1, 2), axis=0)
    if len(pairs) == 0:
        raise ValueError("retrieval needs at least one (image, text) pair")
    if pairs[:, 1].max() >= len(texts) or pairs.min() < 0:
        raise ValueError(f"pair text index out of range for {len(texts)} texts")
    first: dict[str, int] = {}
    group = np.fromiter((first.setdefault(t, i) for i, t in enumerate(texts)), np.int64, len(texts))
    n_dup = len(texts) - len(first)
    if n_dup == 0:
        return 0, {"text_retrieval_recall@1": 1.0, "image_retrieval_recall@1": 1.0}
    img, g = pairs[:, 0], group[pairs[:, 1]]  # group id = index of the string's first copy
    # text -> image: per (string, image), the copies paired with that image; best image per string
    gi, per_gi = np.unique(np.stack([g, img], 1), axis=0, return_counts=True)
    best = np.zeros(len(texts), np.int64)
    np.maximum.at(best, gi[:, 0], per_gi)
    t2i = best.sum() / len(np.unique(pairs[:, 1]))
    # image -> text: a query hits at 1 only through a positive that is the first copy of its string
    i2t = len(np.unique(img[pairs[:, 1] == g])) / len(np.unique(img))
    return n_dup, {"text_retrieval_recall@1": float(i2t), "image_retrieval_recall@1": float(t2i)}


def class_prototypes(template_emb: np.ndarray) -> np.ndarray:
    """Zero-shot class vectors: L2-normalize each prompt vector, average over templates, renormalize
    (CLIP_benchmark's ``zero_shot_classifier`` on already embedded prompts, in float64).

    Args:
        template_emb: ``float [C, T, D]`` (class x template).

    Returns:
        ``float32 [C, D]``, unit norm.
    """
    e = np.asarray(template_emb, dtype=np.float64)
    e = e / np.linalg.norm(e, axis=-1, keepdims=True)
    mean = e.mean(axis=1)
    return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)


@dataclass
class ClassificationOutcome:
    """Result of :func:`classification_metrics`.

    Attributes:
        metrics: ``acc1``, ``acc5`` (only with >= 5 classes), ``mean_per_class_recall``.
        chance: the same keys for a uniformly random classifier (``1/C``, ``5/C``, ``1/C``).
        counts: ``n_images``, ``n_classes``, ``n_classes_present``.
        predictions: ``int64 [N]`` top-1 class per image.
        per_class_recall: ``float [C]`` (NaN for classes without images).
        confusion: ``int64 [C, C]``, rows = true class, columns = top-1 prediction.
    """

    metrics: dict[str, float]
    chance: dict[str, float]
    counts: dict[str, int]
    predictions: np.ndarray = field(repr=False)
    per_class_recall: np.ndarray = field(repr=False)
    confusion: np.ndarray = field(repr=False)


def classification_metrics(scores: np.ndarray, labels: np.ndarray) -> ClassificationOutcome:
    """Top-1 / top-5 accuracy and mean per-class recall from image x class scores (CLIP_benchmark's ``accuracy``
    and ``balanced_accuracy_score``, with deterministic ties).

    Ranking per image: descending score, ties broken by the lower class index.

    Args:
        scores: ``float [N, C]`` similarities of each image to each class prototype.
        labels: ``int [N]`` true class indices in ``[0, C)``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n, c = scores.shape
    k = min(5, c)
    cand = np.broadcast_to(np.arange(c, dtype=np.int64), (n, c))
    ranked = order_candidates(scores, cand, k)
    correct = ranked == labels[:, None]
    metrics = {"acc1": float(correct[:, 0].mean())}
    chance = {"acc1": 1.0 / c}
    if c >= 5:
        metrics["acc5"] = float(correct[:, :5].any(axis=1).mean())
        chance["acc5"] = 5.0 / c
    confusion = np.zeros((c, c), dtype=np.int64)
    np.add.at(confusion, (labels, ranked[:, 0]), 1)
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)
    metrics["mean_per_class_recall"] = float(np.nanmean(per_class))
    chance["mean_per_class_recall"] = 1.0 / c
    counts = {"n_images": n, "n_classes": c, "n_classes_present": int((support > 0).sum())}
    return ClassificationOutcome(metrics, chance, counts, ranked[:, 0], per_class, confusion)
