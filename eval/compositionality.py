"""Compositionality scores: Winoground text/image/group and SugarCrepe accuracy (SPEC §6).

Winoground (Thrush et al., CVPR 2022): each example has two images and two captions, caption ``c`` belongs
to image ``c``. With ``s(c, i)`` the similarity of caption ``c`` and image ``i``:

- text score:  ``s(0,0) > s(1,0)`` and ``s(1,1) > s(0,1)`` (each image prefers its own caption);
- image score: ``s(0,0) > s(0,1)`` and ``s(1,1) > s(1,0)`` (each caption prefers its own image);
- group score: both.

SugarCrepe (Hsieh et al., NeurIPS 2023): an image, its positive caption and one hard negative; correct when
``s(positive) > s(negative)``. Comparisons are strict, so a tie counts as a failure.
"""

from __future__ import annotations

import numpy as np

#: Expected scores of a random similarity (Winoground paper, section 3): 1/4, 1/4, 1/6.
WINOGROUND_CHANCE = {"text_score": 0.25, "image_score": 0.25, "group_score": 1.0 / 6.0}
SUGARCREPE_CHANCE = 0.5


def winoground_scores(sim: np.ndarray) -> dict[str, float]:
    """Winoground scores from ``sim[e, c, i]`` = similarity of caption ``c`` and image ``i`` of example ``e``.

    Args:
        sim: ``float [E, 2, 2]``.

    Returns:
        ``{"text_score", "image_score", "group_score"}`` as fractions of the ``E`` examples.
    """
    s = np.asarray(sim, dtype=np.float64)
    if s.ndim != 3 or s.shape[1:] != (2, 2):
        raise ValueError(f"expected [E, 2, 2] similarities, got {s.shape}")
    text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    return {"text_score": float(text.mean()), "image_score": float(image.mean()),
            "group_score": float((text & image).mean())}


def pair_similarity(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Row-wise float64 inner products ``<image_emb[n], text_emb[n]>``, ``float64 [N]``."""
    return np.einsum("nd,nd->n", np.asarray(image_emb, np.float64), np.asarray(text_emb, np.float64))


def sugarcrepe_accuracy(pos_sim: np.ndarray, neg_sim: np.ndarray) -> float:
    """Fraction of examples whose positive caption scores strictly higher than the negative one."""
    pos, neg = np.asarray(pos_sim), np.asarray(neg_sim)
    if pos.shape != neg.shape:
        raise ValueError(f"positive {pos.shape} and negative {neg.shape} scores differ in shape")
    return float((pos > neg).mean())
