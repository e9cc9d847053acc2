"""Which of our files a caption passes through, from manifest row to loss term: measured, not drawn.

Runs the real stage 1 (``run_embed``, the embedded LLM) and stage 2 (``train``, one optimizer step, memory mode)
on a few emoji rows under :func:`sys.setprofile` and records every call **into** a project file from another
project file (library frames are transparent: a call from our code through torch back into our code counts as
an edge between our two files). Two views:

* ``path``: the files under the caption's data path only, the calls made inside the roots :data:`ROOTS` (the
  functions that read, clean, plan, encode, write, look up, pair, draw and score a sample);
* ``run``: every project file the two commands execute (config, locks, logs, checkpoints, export included).

Planning, which the job runs in a spawned child process, runs in this process here so that it is traced too.
For each file: the order of first entry, and its **entry points**, the distinct ``caller file:function ->
function`` edges into it (a file "entered once" has one). Every module is imported before tracing starts, so
import-time code is not counted. Writes ``bench/results/caption_path.json`` and ``caption_path.md``.

    .venv/bin/python bench/caption_path.py             # SmolLM2-135M, 8 train rows, about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PACKAGES = ("pipeline", "manifests", "stage1_embed_text", "stage2_train_vision", "eval", "flame_pipeline")
RESULTS = Path(__file__).resolve().parent / "results"

#: (file, function): the calls whose whole subtree is the caption's data path.
ROOTS = {
    ("stage1_embed_text/plan/planner.py", "run"),            # manifest rows -> cleaned, digested, deduplicated plan
    ("stage1_embed_text/shards.py", "compute_shard"),        # plan rows -> texts -> prompts -> LLM -> vectors
    ("pipeline/cache/store.py", "write_shard"),              # vectors -> the cache's shard files
    ("pipeline/cache/store.py", "build_lookup"),             # key -> row
    ("stage2_train_vision/data/pairs.py", "load_memory_pairs"),  # manifest key + cache row -> a training pair
    ("stage2_train_vision/data/pairs.py", "__getitem__"),    # a pair -> crop + drawn facets
    ("stage2_train_vision/data/samples.py", "collate"),      # samples -> a batch
    ("stage2_train_vision/step.py", "train_step"),           # image embedding meets the facets in the loss
}


def import_all() -> list[str]:
    """Import every module of :data:`PACKAGES` (optional back ends that fail to import are skipped)."""
    done = []
    for name in PACKAGES:
        pkg = importlib.import_module(name)
        done.append(name)
        for m in pkgutil.walk_packages(pkg.__path__, prefix=name + "."):
            try:
                importlib.import_module(m.name)
                done.append(m.name)
            except ImportError:
                pass
    return done


class CallTracer:
    """A :func:`sys.setprofile` hook recording calls between project files (see the module docstring)."""

    def __init__(self, roots: set[tuple[str, str]]):
        self.roots = roots
        self.views: dict[str, dict[str, Any]] = {v: {"order": [], "edges": defaultdict(set)} for v in ("run", "path")}
        self._cache: dict[str, str | None] = {}

    def _rel(self, filename: str) -> str | None:
        rel = self._cache.get(filename, "")
        if rel == "":
            p = Path(filename)
            rel = None
            if p.is_absolute() and p.is_relative_to(ROOT) and p.parts[len(ROOT.parts)] in PACKAGES:
                rel = p.relative_to(ROOT).as_posix()
            self._cache[filename] = rel
        return rel

    def _caller(self, frame) -> tuple[str | None, str | None, bool]:
        """Nearest project frame above ``frame``: (file, function, inside a root)."""
        f, found, in_root = frame.f_back, (None, None), False
        while f is not None:
            rel = self._rel(f.f_code.co_filename)
            if rel is not None:
                if found == (None, None):
                    found = (rel, f.f_code.co_name)
                if (rel, f.f_code.co_name) in self.roots:
                    in_root = True
                    break
            f = f.f_back
        return found[0], found[1], in_root

    def __call__(self, frame, event, arg) -> None:
        if event != "call":
            return
        rel = self._rel(frame.f_code.co_filename)
        if rel is None:
            return
        caller, caller_fn, in_root = self._caller(frame)
        is_root = (rel, frame.f_code.co_name) in self.roots
        for view in ("run", "path") if (in_root or is_root) else ("run",):
            v = self.views[view]
            if rel not in v["order"]:
                v["order"].append(rel)
            if caller != rel and not (view == "path" and is_root and not in_root):
                v["edges"][rel].add(f"{caller}:{caller_fn} -> {frame.f_code.co_name}")

    def report(self) -> dict[str, Any]:
        out = {}
        for name, v in self.views.items():
            files = [{"file": f, "entry_points": sorted(v["edges"].get(f, ()))} for f in v["order"]]
            out[name] = {"files": len(files), "entered_once": sum(len(f["entry_points"]) <= 1 for f in files),
                         "order": files}
        return out


def small_manifest(runs: Path, out: Path, rows: int) -> Path:
    """The first ``rows`` train rows and 2 test rows of the emoji manifest (built once under ``runs``)."""
    from manifests.emoji import build_emoji_manifest
    from manifests.schema import ManifestWriter, iter_rows

    full = runs / "caption-path-manifest"
    if not (full / "manifest.json").is_file():
        build_emoji_manifest(full, seed=0)
    want = {"train": rows, "test": 2}
    writer = ManifestWriter(out, source={"name": "emoji-caption-path", "args": {"rows": rows}})
    for r in iter_rows(full):
        if want.get(r["split"], 0) > 0:
            want[r["split"]] -= 1
            writer.add(r)
        if not any(want.values()):
            break
    writer.close()
    return out


def trace(llm: str, rows: int, runs: Path) -> dict[str, Any]:
    """Run stage 1 and one stage-2 step on ``rows`` rows under :class:`CallTracer`; the two views."""
    from pipeline.assets import fetch_all
    from stage1_embed_text.job import EmbedConfig, run_embed
    from stage2_train_vision.config import load_config
    from stage2_train_vision.train import train

    fetch_all(llms=(llm,))
    import_all()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = small_manifest(runs, tmp / "manifest", rows)
        cfg = load_config(ROOT / "configs" / "demo-cpu.toml", [
            f"data.manifest={manifest}", f"data.cache={tmp / 'cache'}", f"train.output_dir={tmp / 'train'}",
            "train.max_steps=1", f"train.batch_size={rows}", "train.save_every=0", "optim.warmup_steps=0"])
        import stage1_embed_text.ranks as ranks
        from stage1_embed_text.plan import plan_job

        # the job plans in a spawned child process (memory); here in this process, so the planner is traced too
        ranks._plan_in_child_process = plan_job
        tracer = CallTracer(ROOTS)
        sys.setprofile(tracer)
        try:
            run_embed(EmbedConfig(manifest=str(manifest), out=str(tmp / "cache"), llm=llm))
            train(cfg)
        finally:
            sys.setprofile(None)
    return tracer.report()


def render(doc: dict[str, Any]) -> str:
    lines = ["# A caption's path through the code (bench/caption_path.py)", "",
             f"Stage 1 (`run_embed`, {doc['llm']}) and one stage-2 step (`train`, memory mode) on {doc['rows']} "
             "train rows. An entry point is a distinct `caller file:function -> function` edge into the file.", "",
             "| view | files | entered from one place |", "|---|---|---|"]
    for view in ("path", "run"):
        v = doc[view]
        lines.append(f"| {view} | {v['files']} | {v['entered_once']} |")
    lines += ["", "## The path, in order of first entry", "", "| # | file | entry points |", "|---|---|---|"]
    for i, f in enumerate(doc["path"]["order"], 1):
        lines.append(f"| {i} | `{f['file']}` | {len(f['entry_points'])} |")
    extra = [f["file"] for f in doc["run"]["order"] if f["file"] not in {g["file"] for g in doc["path"]["order"]}]
    lines += ["", f"## Executed by the two commands but not on the path ({len(extra)})", "",
              ", ".join(f"`{f}`" for f in extra), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llm", default="smollm2-135m", help="embedded LLM of stage 1")
    p.add_argument("--rows", type=int, default=8, help="train rows (also the batch size of the one step)")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="where the full emoji manifest is built once")
    p.add_argument("--out", type=Path, default=RESULTS, help="where caption_path.json/.md go")
    args = p.parse_args(argv)
    doc = {"llm": args.llm, "rows": args.rows, "roots": sorted(f"{f}:{fn}" for f, fn in ROOTS)}
    doc |= trace(args.llm, args.rows, args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "caption_path.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    (args.out / "caption_path.md").write_text(render(doc), encoding="utf-8")
    print(render(doc).split("## The path")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
