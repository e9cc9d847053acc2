"""The demo's ``report.md`` and the key numbers printed at the end of `flame demo`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_bytes

# (task-name predicate, metric, label) of the numbers printed at the end of the demo.
_KEY_METRICS = (
    ("text_retrieval_recall@1", "image->text R@1"),
    ("image_retrieval_recall@1", "text->image R@1"),
    ("text_retrieval_recall@5", "image->text R@5"),
    ("acc1", "top-1"),
    ("acc5", "top-5"),
)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _took(stage: dict[str, Any]) -> str:
    return "reused" if stage["reused"] else f"{stage['seconds']:.1f} s"


def key_rows(results: dict[str, Any]) -> list[tuple[str, str, float, float]]:
    """``(task, metric label, value, chance)`` for every headline metric of an eval ``results.json``."""
    rows = []
    for name, task in results.get("tasks", {}).items():
        if task.get("kind") == "multilingual":
            continue
        for metric, label in _KEY_METRICS:
            if metric in task.get("metrics", {}):
                rows.append((name, label, task["metrics"][metric], task["chance"][metric]))
    avg = results.get("summary", {}).get("multilingual_average")
    if avg:
        langs = ",".join(avg["languages"])
        for metric, label in _KEY_METRICS[:2]:
            if metric in avg["metrics"]:
                rows.append((f"multilingual mean ({langs})", label, avg["metrics"][metric], avg["chance"][metric]))
    return rows


def key_numbers(report: dict[str, Any]) -> str:
    """A fixed-width table of the headline numbers next to chance, plus the stage timings."""
    lines = [f"{'task':<44} {'metric':<17} {'value %':>8} {'chance %':>9}"]
    for task, label, value, chance in key_rows(report["results"]):
        lines.append(f"{task:<44} {label:<17} {_pct(value):>8} {_pct(chance):>9}")
    timing = ", ".join(
        f"{name} {_took(s)}" for name, s in report["stages"].items()
    )
    lines.append(f"\nstages: {timing}; total {report['total_seconds']:.0f} s on {report.get('cpu', 'an unrecorded CPU')}")
    return "\n".join(lines)


def write_report_md(report: dict[str, Any], path: Path) -> Path:
    """Write the demo report: what ran, timings, key numbers vs chance, and the figures."""
    run_dir = path.parent
    data, cache, train = report["data"], report["cache"], report["train"]
    lines = [
        "# flame-pipeline demo report",
        "",
        "Emoji images (Noto + Twemoji) with templated CLDR captions; stage 1 with the embedded LLM, stage 2 with "
        "`configs/demo-cpu.toml`, zero-shot evaluation on test concepts never seen in training.",
        "",
        "## Stages",
        "",
        "| stage | time | artifact |",
        "|---|---|---|",
    ]
    for name, s in report["stages"].items():
        lines.append(f"| {name} | {_took(s)} | `{s['path']}` |")
    lines += [
        f"| **total** | {report['total_seconds']:.1f} s | CPU: {report.get('cpu', 'not recorded')} |",
        "",
        f"Data: {data.get('counts')}. Cache: {cache.get('rows')} rows for {cache.get('keys')} keys, "
        f"{cache.get('tokens_per_s', 0):.0f} tokens/s. Training: {train.get('steps')} steps, loss "
        f"{train.get('first_loss', 0):.4f} -> {train.get('final_loss', 0):.4f}, {train.get('images_per_s')} images/s.",
        "",
        "## Key numbers (%, chance in the last column)",
        "",
        "| task | metric | value | chance |",
        "|---|---|---|---|",
    ]
    for task, label, value, chance in key_rows(report["results"]):
        lines.append(f"| {task} | {label} | {_pct(value)} | {_pct(chance)} |")
    lines += ["", "Full tables: `eval/results.md`; every number with counts and identities: `eval/results.json`.", ""]
    lines += ["## Figures", ""]
    figures = [("loss.png", "Training loss"), ("facet_cosine.png", "Facet similarity (mean cosine, same caption)")]
    figures += [(os.path.relpath(p, run_dir), p.stem.replace("_", " ")) for p in sorted((run_dir / "eval").glob("*.png"))]
    for rel, title in figures:
        if (run_dir / rel).exists():
            lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    lines += ["## Cache anisotropy (mean cosine of random rows, per facet)", "",
              ", ".join(f"{k} {v:.3f}" for k, v in report["anisotropy"].items()), ""]
    if report.get("model"):
        lines += ["## Use this model", "", "```python", usage_snippet(report["model"], report.get("examples", [])),
                  "```", "", f"Publish it: `flame push {report['model']} USER/NAME --results "
                  f"{os.path.join(report['run_dir'], 'eval', 'results.json')}`.", ""]
    atomic_write_bytes(path, "\n".join(lines).encode("utf-8"))
    return path


def usage_snippet(model_dir: str, images: list[str]) -> str:
    """Python that loads the demo's model with the public API and classifies ``images`` into the categories."""
    shown = ", ".join(repr(p) for p in images[:3]) or "'image.png'"
    return "\n".join([
        "import flame_pipeline",
        "",
        f"model = flame_pipeline.load({model_dir!r})",
        f"images = [{shown}]",
        "img = model.encode_image(images)                           # float32 [n, D], unit rows",
        "txt = model.encode_text([\"grinning face\", \"red apple\"])    # the frozen LLM, loaded once",
        "print(img @ txt.T)                                          # cosine similarities",
        "classifier = model.zero_shot_classifier(",
        "    [\"Smileys & Emotion\", \"Animals & Nature\", \"Food & Drink\", \"Travel & Places\", \"Flags\"],",
        "    [\"an emoji of {}.\"])",
        "print(model.classify(images, classifier).argmax(1))       # top-1 category per image",
    ])
