"""PNG figures of an evaluation run (SPEC §6 outputs), drawn with matplotlib's Agg backend.

- :func:`plot_retrieval_examples`: query images with their top-5 retrieved texts (green = a positive);
- :func:`plot_language_bars`: per-language R@1 both ways, with chance and the average;
- :func:`plot_classification`: confusion matrix (<= 30 classes) or sorted per-class recall bars.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from eval.metrics import ClassificationOutcome, RetrievalOutcome  # noqa: E402
from pipeline.atomic import atomic_file  # noqa: E402

log = logging.getLogger(__name__)

CONFUSION_MAX_CLASSES = 30


def _short(text: str, width: int = 70, lines: int = 2) -> str:
    return "\n".join(textwrap.wrap(" ".join(text.split()), width)[:lines]) or "(empty)"


def plot_retrieval_examples(images: Sequence, texts: Sequence[str], outcome: RetrievalOutcome, pairs: np.ndarray,
                            path: str | Path, n_queries: int = 6, k: int = 5, title: str = "") -> Path:
    """Image->text examples: each row a query image and its top-``k`` texts, positives in green.

    Args:
        images: the task's gallery images (objects with ``.open()``), indexed like ``outcome.i2t_queries``.
        texts: the task's texts.
        outcome: from :func:`eval.metrics.retrieval_metrics`.
        pairs: ``int64 [P, 2]`` positive (image, text) pairs of the task.
        n_queries: rows, spread evenly over the queries (deterministic).
    """
    positives = {(int(i), int(t)) for i, t in pairs}
    q = outcome.i2t_queries
    rows = np.unique(np.linspace(0, len(q) - 1, num=min(n_queries, len(q))).round().astype(int))
    fig, axes = plt.subplots(len(rows), 2, figsize=(9, 2.0 * len(rows)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 4]})
    for ax_img, ax_txt, r in zip(axes[:, 0], axes[:, 1], rows):
        img = int(q[r])
        ax_img.imshow(images[img].open())
        ax_img.set_axis_off()
        ax_txt.set_axis_off()
        for rank, t in enumerate(outcome.i2t_topk[r, :k]):
            hit = (img, int(t)) in positives
            ax_txt.text(0.0, 1.0 - rank / k, f"{rank + 1}. {_short(texts[int(t)])}", va="top", fontsize=7.5,
                        color="green" if hit else "firebrick", transform=ax_txt.transAxes)
    fig.suptitle(title or "image → text: top-5 texts (green = positive)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_language_bars(langs: Sequence[str], i2t: Sequence[float], t2i: Sequence[float], chance_i2t: Sequence[float],
                       chance_t2i: Sequence[float], path: str | Path, title: str = "") -> Path:
    """Grouped bars of R@1 per language (image->text, text->image, in %), chance as black ticks, average line."""
    x = np.arange(len(langs))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(langs) + 2), 4))
    ax.bar(x - 0.2, 100 * np.asarray(i2t), 0.4, label="image→text R@1")
    ax.bar(x + 0.2, 100 * np.asarray(t2i), 0.4, label="text→image R@1")
    ax.scatter(x - 0.2, 100 * np.asarray(chance_i2t), marker="_", s=200, color="black", label="chance", zorder=3)
    ax.scatter(x + 0.2, 100 * np.asarray(chance_t2i), marker="_", s=200, color="black", zorder=3)
    ax.axhline(100 * np.mean(i2t), color="C0", ls="--", lw=1, label=f"avg I→T {100 * np.mean(i2t):.1f}")
    ax.axhline(100 * np.mean(t2i), color="C1", ls="--", lw=1, label=f"avg T→I {100 * np.mean(t2i):.1f}")
    ax.set_xticks(x, list(langs))
    ax.set_ylabel("recall@1 (%)")
    ax.set_title(title or "multilingual retrieval")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_classification(outcome: ClassificationOutcome, classnames: Sequence[str], path: str | Path,
                        title: str = "") -> Path:
    """Row-normalized confusion matrix for few classes, else per-class recall bars sorted high to low."""
    c = len(classnames)
    if c <= CONFUSION_MAX_CLASSES:
        conf = outcome.confusion.astype(float)
        conf = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
        fig, ax = plt.subplots(figsize=(2 + 0.45 * c, 1.5 + 0.45 * c))
        im = ax.imshow(conf, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(c), [_short(n, 20, 1) for n in classnames], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(c), [_short(n, 20, 1) for n in classnames], fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        fig.colorbar(im, ax=ax, fraction=0.046)
    else:
        rec = outcome.per_class_recall
        keep = np.flatnonzero(~np.isnan(rec))
        order = keep[np.argsort(-rec[keep], kind="stable")]
        fig, ax = plt.subplots(figsize=(10, 4))
        ax.bar(np.arange(len(order)), 100 * rec[order], width=1.0)
        ax.axhline(100 / c, color="black", ls="--", lw=1, label=f"chance {100 / c:.1f}%")
        if len(order) <= 60:
            ax.set_xticks(np.arange(len(order)), [_short(classnames[i], 18, 1) for i in order], rotation=90, fontsize=6)
        else:
            ax.set_xlabel(f"{len(order)} classes present, sorted by recall")
        ax.set_ylabel("per-class recall (%)")
        ax.legend(fontsize=7)
    acc = outcome.metrics["acc1"]
    ax.set_title(title or f"top-1 {100 * acc:.1f}%", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    """Write ``fig`` at 110 dpi to ``path`` atomically (format from its suffix), close it, return ``path``."""
    path = Path(path)
    try:
        with atomic_file(path) as tmp:  # the temporary name has no image suffix: name the format
            fig.savefig(tmp, dpi=110, format=path.suffix[1:] or None)
    finally:
        plt.close(fig)
    log.info("wrote %s", path)
    return path
