"""Write the README's demo block (between ``<!-- demo:begin -->`` and ``<!-- demo:end -->``) from a demo run's
``report.json``, so the README's demo numbers are only ever what a ``flame demo`` run measured.

It also keeps that run's key data in ``bench/results/demo.json`` (version, CPU, load, stage seconds, every headline
metric with its chance level), from which ``--check`` re-renders the block and fails on any difference.

    .venv/bin/python bench/demo_readme.py runs/demo-20261208-020000/report.json   # after make demo
    .venv/bin/python bench/demo_readme.py --check
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from flame_pipeline.demo.report import key_rows

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "bench" / "results" / "demo.json"
BEGIN, END = "<!-- demo:begin -->", "<!-- demo:end -->"


def summarize(report: dict[str, Any], load: str) -> dict[str, Any]:
    """The part of a demo ``report.json`` the README shows; no machine paths."""
    return {
        "version": report["results"].get("package_version"),
        "cpu": report.get("cpu"),
        "machine_load": load,
        "stages_s": {name: s["seconds"] for name, s in report["stages"].items() if not s["reused"]},
        "reused": [name for name, s in report["stages"].items() if s["reused"]],
        "total_s": report["total_seconds"],
        "data": report["data"].get("counts"),
        "rows": [{"task": t, "metric": m, "value": round(100 * v, 1), "chance": round(100 * c, 1)}
                 for t, m, v, c in key_rows(report["results"])],
    }


def render(doc: dict[str, Any]) -> str:
    """The Markdown between the markers."""
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in doc["stages_s"].items())
    data = " / ".join(f"{n:,} {split}" for split, n in doc["data"].items() if split != "total")
    lines = [
        f"Held-out test split of the default demo subset ({data} images), from one `make demo` run of "
        f"**{doc['version']}** on {doc['cpu']} ({doc['machine_load']}). Stages: {stages}; {doc['total_s']:.0f} s "
        "in all. Test concepts were never seen in training. All numbers in %:",
        "",
        "| task (test split) | metric | value | chance |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['task']} | {r['metric']} | {r['value']:.1f} | {r['chance']:.1f} |" for r in doc["rows"]]
    lines += ["", "Written by `bench/demo_readme.py` from the run's `report.json` (kept as `bench/results/demo.json`)."]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:a] + "\n" + block + "\n" + text[b:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", nargs="?", help="a demo run's report.json")
    ap.add_argument("--load", default="not recorded", help="how loaded the machine was, e.g. 'quiet' or 'shared'")
    ap.add_argument("--check", action="store_true", help="re-render from bench/results/demo.json and compare")
    args = ap.parse_args()
    text = README.read_text(encoding="utf-8")
    if args.check:
        want = replace_block(text, render(json.loads(RESULTS.read_text(encoding="utf-8"))))
        if want != text:
            print("README demo block differs from bench/results/demo.json; rerun bench/demo_readme.py", file=sys.stderr)
            return 1
        return 0
    if not args.report:
        ap.error("give a report.json or --check")
    doc = summarize(json.loads(Path(args.report).read_text(encoding="utf-8")), args.load)
    RESULTS.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    README.write_text(replace_block(text, render(doc)), encoding="utf-8")
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
