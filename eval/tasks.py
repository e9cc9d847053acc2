"""Evaluate one benchmark task from image embeddings and a text encoder (SPEC §6).

:func:`evaluate_task` dispatches on the task type; every result is a :class:`TaskResult` whose ``metrics``
and ``chance`` have the same keys (fractions in ``[0, 1]``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eval.benchmarks.base import (
    ClassificationTask,
    LinearProbeTask,
    RetrievalTask,
    SugarCrepeTask,
    Task,
    WinogroundTask,
)
from eval.compositionality import (
    SUGARCREPE_CHANCE,
    WINOGROUND_CHANCE,
    pair_similarity,
    sugarcrepe_accuracy,
    winoground_scores,
)
from eval.linear_probe import linear_probe
from eval.metrics import class_prototypes, classification_metrics, duplicate_text_ceiling, retrieval_metrics
from stage1_embed_text.config import SINGLE

log = logging.getLogger(__name__)


@dataclass
class TaskResult:
    """One task's numbers.

    Attributes:
        name: task name (``retrieval_en_raw``, ``multilingual_de``, ``classification_category``, ...).
        type: ``retrieval``, ``classification``, ``winoground``, ``sugarcrepe`` or ``linear_probe``.
        text_mode: ``single``/``multi`` (``None`` for the linear probe).
        metrics, chance: same keys; chance = expected value for random scores.
        counts: sizes used (images, texts, queries, classes, examples).
        info: ``kind``, ``lang`` and other descriptors written to ``results.json``; retrieval adds
            ``duplicate_texts`` and ``r1_ceiling`` (:func:`eval.metrics.duplicate_text_ceiling`).
        details: in-memory outcome for plots (not serialized).
    """

    name: str
    type: str
    text_mode: str | None
    metrics: dict[str, float]
    chance: dict[str, float]
    counts: dict[str, int]
    info: dict[str, Any] = field(default_factory=dict)
    details: Any = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "text_mode": self.text_mode, **self.info, "counts": self.counts,
                "metrics": self.metrics, "chance": self.chance}


_PLACEHOLDER = re.compile(r"\{c?\}")


def fill_template(template: str, name: str) -> str:
    """``template`` with each ``{}`` or ``{c}`` replaced by the class name, in one pass: braces inside the name
    stay as they are (``fill_template("a photo of a {c}.", "curly {} braces")`` = ``"a photo of a curly {}
    braces."``)."""
    return _PLACEHOLDER.sub(lambda _: name, template)


def evaluate_task(task: Task, image_emb: np.ndarray, features: np.ndarray | None, text_encoder: Any,
                  text_mode: str | None = None, backend: str = "auto") -> TaskResult:
    """Evaluate ``task``.

    Args:
        task: a task of :mod:`eval.benchmarks.base`.
        image_emb: ``float32 [N_pool, D]`` embeddings of the benchmark's image pool.
        features: ``float32 [N_pool, W]`` pre-projector features (needed by linear probes only).
        text_encoder: has ``encode(texts, mode, desc) -> float32 [n, D]`` (:class:`eval.embedding.TextEncoder`).
        text_mode: overrides the task's default mode.
        backend: ranking backend for retrieval (:func:`eval.ranking.topk`).
    """
    mode = text_mode or getattr(task, "text_mode", None) or SINGLE
    if isinstance(task, RetrievalTask):
        txt = text_encoder.encode(task.texts, mode, desc=task.name)
        out = retrieval_metrics(image_emb[task.image_ids], txt, task.pairs, backend=backend)
        n_dup, ceiling = duplicate_text_ceiling(task.texts, task.pairs)
        info = {"kind": task.kind, "lang": task.lang, "duplicate_texts": n_dup, "r1_ceiling": ceiling}
        return TaskResult(task.name, "retrieval", mode, out.metrics, out.chance, out.counts, info, out)
    if isinstance(task, ClassificationTask):
        prompts = [fill_template(t, c) for c in task.classnames for t in task.templates]
        txt = text_encoder.encode(prompts, mode, desc=task.name)
        protos = class_prototypes(txt.reshape(len(task.classnames), len(task.templates), -1))
        scores = image_emb[task.image_ids].astype(np.float64) @ protos.T.astype(np.float64)
        out = classification_metrics(scores, task.labels)
        counts = out.counts | {"n_templates": len(task.templates)}
        return TaskResult(task.name, "classification", mode, out.metrics, out.chance, counts,
                          {"classnames": task.classnames}, out)
    if isinstance(task, WinogroundTask):
        txt = text_encoder.encode([c for pair in task.captions for c in pair], mode, desc=task.name)
        txt = txt.reshape(len(task.captions), 2, -1)
        img = image_emb[task.image_ids]  # [E, 2, D]
        sim = np.einsum("ecd,eid->eci", txt.astype(np.float64), img.astype(np.float64))
        return TaskResult(task.name, "winoground", mode, winoground_scores(sim), dict(WINOGROUND_CHANCE),
                          {"examples": len(task.captions)})
    if isinstance(task, SugarCrepeTask):
        img = image_emb[task.image_ids]
        pos = text_encoder.encode(task.positives, mode, desc=f"{task.name} positives")
        neg = text_encoder.encode(task.negatives, mode, desc=f"{task.name} negatives")
        acc = sugarcrepe_accuracy(pair_similarity(img, pos), pair_similarity(img, neg))
        return TaskResult(task.name, "sugarcrepe", mode, {"acc": acc}, {"acc": SUGARCREPE_CHANCE},
                          {"examples": len(task.positives)})
    if isinstance(task, LinearProbeTask):
        if features is None:
            raise ValueError("linear probe needs pre-projector features")
        out, c = linear_probe(features[task.train_ids], task.train_labels, features[task.test_ids],
                              task.test_labels, len(task.classnames))
        counts = out.counts | {"n_train": len(task.train_ids)}
        return TaskResult(task.name, "linear_probe", None, out.metrics, out.chance, counts,
                          {"C": c, "classnames": task.classnames}, out)
    raise TypeError(f"unknown task type {type(task).__name__}")
