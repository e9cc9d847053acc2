"""``results.json`` and ``results.md`` of an evaluation run (SPEC §6 outputs).

``results.json``::

    {"benchmark", "split", "data", "counts", "skipped", "text_mode" (the override or null),
     "model": {"dir", "config"}, "cache_identity", "package_version", "created",
     "tasks": {NAME: {"type", "text_mode", "kind"?, "lang"?, "duplicate_texts"?, "r1_ceiling"?,
                    "counts", "metrics", "chance"}},
     "summary": {"multilingual_average": {"languages", "metrics", "chance"}}}   (when there are languages)

Metric keys follow CLIP_benchmark (``image_retrieval_recall@k`` = text->image, ``text_retrieval_recall@k`` =
image->text, ``acc1``, ``acc5``, ``mean_per_class_recall``); Winoground ``text_score``/``image_score``/
``group_score``; SugarCrepe ``acc``. Values are fractions; ``results.md`` prints percentages with the chance
level beside every number.

``counts`` are the sizes of the benchmark as loaded; ``skipped`` counts the images left out of every task
because they did not open, by reason (``{"undecodable_image": 2, "image_too_large": 1}``, ``{}`` when none;
reasons of :func:`eval.embedding.image_skip_reason`). Each task's own ``counts`` are what it was scored on.

Retrieval tasks also carry ``duplicate_texts`` (how many texts are identical to an earlier text of the task)
and ``r1_ceiling`` (``{"text_retrieval_recall@1", "image_retrieval_recall@1"}``: the most a perfect model can
reach, below 1 only when texts repeat; :func:`eval.metrics.duplicate_text_ceiling`); ``results.md`` prints a
line for every task whose texts repeat. The metrics themselves are the standard ones.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from eval.tasks import TaskResult
from pipeline import __version__
from pipeline.atomic import atomic_write_bytes

_RET_COLS = [("text_retrieval_recall@1", "I→T R@1"), ("text_retrieval_recall@5", "I→T R@5"),
             ("text_retrieval_recall@10", "I→T R@10"), ("image_retrieval_recall@1", "T→I R@1"),
             ("image_retrieval_recall@5", "T→I R@5"), ("image_retrieval_recall@10", "T→I R@10")]


#: FLAME ViT-B/16 R@1 (image->text, text->image) in %, SPEC §7, by training set: what results.md compares to.
PUBLISHED_R1 = {
    "sharegpt4v-1k": {"CC3M": (85.6, 80.0), "YFCC15M": (94.1, 93.2)},
    "urban1k": {"CC3M": (65.3, 66.6), "YFCC15M": (84.0, 87.9)},
    "dci": {"CC3M": (50.8, 49.3), "YFCC15M": (66.1, 68.1)},
    "docci": {"CC3M": (54.5, 51.9), "YFCC15M": (75.8, 76.2)},
    "xm3600": {"YFCC15M": (51.72, 49.00)},  # average over 36 languages
}


def multilingual_average(results: list[TaskResult]) -> dict[str, Any] | None:
    """Mean metrics and chance over the ``multilingual`` retrieval tasks (None when there are none)."""
    ml = [r for r in results if r.type == "retrieval" and r.info.get("kind") == "multilingual"]
    if not ml:
        return None
    keys = list(ml[0].metrics)
    return {"languages": [r.info["lang"] for r in ml],
            "metrics": {k: float(np.mean([r.metrics[k] for r in ml])) for k in keys},
            "chance": {k: float(np.mean([r.chance[k] for r in ml])) for k in keys}}


def build_results(benchmark: str, split: str, data: str, counts: dict[str, int], text_mode: str | None,
                  model_dir: str, config: dict[str, Any], results: list[TaskResult],
                  skipped: dict[str, int] | None = None) -> dict[str, Any]:
    """The ``results.json`` document; ``skipped`` = images left out by reason (module docstring)."""
    doc: dict[str, Any] = {
        "benchmark": benchmark, "split": split, "data": data, "counts": counts, "skipped": dict(skipped or {}),
        "text_mode": text_mode,
        "model": {"dir": model_dir, "config": config}, "cache_identity": config.get("cache_identity"),
        "package_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tasks": {r.name: r.to_json() for r in results},
        "summary": {},
    }
    avg = multilingual_average(results)
    if avg:
        doc["summary"]["multilingual_average"] = avg
    return doc


def _cell(value: float, chance: float) -> str:
    return f"{100 * value:.1f} ({100 * chance:.1f})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render_markdown(doc: dict[str, Any]) -> str:
    """Markdown tables of every task, each number followed by its chance level in parentheses (%)."""
    tasks = doc["tasks"]
    ident = doc.get("cache_identity") or {}
    lines = [f"# {doc['benchmark']} ({doc['split']} split)", "",
             f"Model `{doc['model']['dir']}`; text side {ident.get('llm', '?')} layer {ident.get('layer', '?')} "
             f"({ident.get('readout', '?')}), D={ident.get('dim', '?')}, prompt set {ident.get('prompt_set', '?')}.",
             f"Counts: {doc['counts']}. All numbers in %, chance level in parentheses."]
    skipped = doc.get("skipped") or {}
    if skipped:
        reasons = ", ".join(f"{reason} {n}" for reason, n in skipped.items())
        lines.append(f"Skipped images (did not open; left out of every task): {sum(skipped.values())} ({reasons}).")
    lines.append("")

    def section(title: str, names: list[str], header: list[str], row) -> None:
        if names:
            lines.extend([f"## {title}", ""] + _table(header, [row(n, tasks[n]) for n in names]) + [""])

    def duplicates(names: list[str]) -> None:
        for n in names:
            dup, ceil = tasks[n].get("duplicate_texts", 0), tasks[n].get("r1_ceiling")
            if dup and ceil:
                lines.append(f"Duplicate texts: `{n}` has {dup} texts identical to an earlier one; they cap R@1 at "
                             f"{100 * ceil['text_retrieval_recall@1']:.1f} (I→T) / "
                             f"{100 * ceil['image_retrieval_recall@1']:.1f} (T→I) for any model.")
        if any(tasks[n].get("duplicate_texts", 0) for n in names):
            lines.append("")

    ret = [n for n, t in tasks.items() if t["type"] == "retrieval" and t.get("kind") != "multilingual"]
    section("Retrieval", ret, ["task", "text mode", "images", "texts"] + [c for _, c in _RET_COLS],
            lambda n, t: [n, t["text_mode"], str(t["counts"]["n_images"]), str(t["counts"]["n_texts"])]
            + [_cell(t["metrics"][k], t["chance"][k]) for k, _ in _RET_COLS])
    duplicates(ret)
    ml = [n for n, t in tasks.items() if t["type"] == "retrieval" and t.get("kind") == "multilingual"]
    if ml:
        header = ["language", "text mode", "images", "texts"] + [c for _, c in _RET_COLS]
        rows = [[t["lang"], t["text_mode"], str(t["counts"]["n_images"]), str(t["counts"]["n_texts"])]
                + [_cell(t["metrics"][k], t["chance"][k]) for k, _ in _RET_COLS] for t in (tasks[n] for n in ml)]
        avg = doc["summary"]["multilingual_average"]
        rows.append(["**average**", "", "", ""] + [_cell(avg["metrics"][k], avg["chance"][k]) for k, _ in _RET_COLS])
        lines.extend(["## Multilingual retrieval", ""] + _table(header, rows) + [""])
        duplicates(ml)
    for typ, title in (("classification", "Zero-shot classification"), ("linear_probe", "Linear probe")):
        names = [n for n, t in tasks.items() if t["type"] == typ]
        section(title, names, ["task", "text mode", "images", "classes", "acc1", "acc5", "mean per-class recall"],
                lambda n, t: [n, str(t["text_mode"] or "-"), str(t["counts"]["n_images"]), str(t["counts"]["n_classes"])]
                + [_cell(t["metrics"][k], t["chance"][k]) if k in t["metrics"] else "-"
                   for k in ("acc1", "acc5", "mean_per_class_recall")])
    wg = [n for n, t in tasks.items() if t["type"] == "winoground"]
    section("Winoground", wg, ["task", "text mode", "examples", "text", "image", "group"],
            lambda n, t: [n, t["text_mode"], str(t["counts"]["examples"])]
            + [_cell(t["metrics"][k], t["chance"][k]) for k in ("text_score", "image_score", "group_score")])
    published = PUBLISHED_R1.get(doc["benchmark"])
    if published:
        lines.extend(["## Published FLAME ViT-B/16 (SPEC §7)", ""] + _table(
            ["trained on", "I→T R@1", "T→I R@1"], [[k, f"{a:.1f}", f"{b:.1f}"] for k, (a, b) in published.items()])
            + [""])
    sc = [n for n, t in tasks.items() if t["type"] == "sugarcrepe"]
    section("SugarCrepe", sc, ["subset", "text mode", "examples", "accuracy"],
            lambda n, t: [n, t["text_mode"], str(t["counts"]["examples"]), _cell(t["metrics"]["acc"], t["chance"]["acc"])])
    return "\n".join(lines)


def write_results(doc: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` (UTF-8) into ``out_dir`` (created); returns both paths.

    Each file is published atomically (:func:`pipeline.atomic.atomic_write_bytes`): a reader sees the previous
    run's file or the complete new one.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "results.json", out / "results.md"
    atomic_write_bytes(js, json.dumps(doc, indent=2, ensure_ascii=False, default=str).encode("utf-8"))
    atomic_write_bytes(md, render_markdown(doc).encode("utf-8"))
    return js, md
