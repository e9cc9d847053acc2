"""`flame demo`: the whole pipeline on the embedded default (SPEC §9), ending in a printed report.

Stages, each reused on a rerun when its inputs are unchanged (:mod:`flame_pipeline.demo.artifacts`):

1. assets    the npm emoji/CLDR packages and the Gemma-3-270M GGUF, fetched once into ``$FLAME_HOME``
2. manifest  the full emoji manifest (7,572 images)
3. subset    the demo's subset: base emoji only (no skin-tone variants), ``train_bases`` train concepts and
             ``test_bases`` test concepts, both vendors; ``--full`` keeps every row
4. cache     stage 1 with the embedded LLM
5. train     stage 2 with ``configs/demo-cpu.toml``
6. eval      the ``emoji`` benchmark on the test split
7. report    ``report.md`` + plots under ``runs/demo-<timestamp>/``

Reusable artifacts (manifest, subset, cache, model) live in ``<runs>/demo-artifacts/``; each run directory
holds the evaluation, the plots and the report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from eval.run import run_benchmark
from flame_pipeline.demo.artifacts import StageResult, run_stage
from flame_pipeline.demo.config import DemoConfig
from flame_pipeline.demo.report import key_numbers, write_report_md
from flame_pipeline.inspect import inspect_cache, plot_facet_cosine
from manifests.emoji import build_emoji_manifest
from manifests.images import load_image
from manifests.schema import ManifestWriter, iter_rows, read_manifest_info
from pipeline import __version__
from pipeline.assets import EMBEDDED_LLMS, fetch_all
from pipeline.atomic import atomic_file, atomic_write_bytes
from pipeline.cache.store import CacheReader
from pipeline.hub import write_card
from pipeline.machine import cpu_summary
from pipeline.paths import flame_home
from stage1_embed_text.job import EmbedConfig, run_embed
from stage2_train_vision.config import load_config
from stage2_train_vision.train import train

log = logging.getLogger(__name__)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def build_subset(manifest_dir: Path, out_dir: Path, train_bases: int | None, test_bases: int,
                 seed: int) -> dict[str, Any]:
    """Write the demo subset of an emoji manifest: base emoji only, a seeded choice of concepts per split.

    Concepts are ranked by ``sha256(seed:base)`` within their split, so the choice is stable and the split
    boundaries of the full manifest are kept (test concepts never appear in training).

    Args:
        train_bases: train concepts to keep; ``None`` keeps the **whole** train split, skin-tone variants
            included (the fidelity study's training set), while the test side is still ``test_bases``
            base concepts.

    Returns:
        ``{"counts": {split: rows}, "bases": {split: concepts}}``.
    """
    keep = {"train": train_bases, "val": 0, "test": test_bases}

    def wanted(r: dict[str, Any]) -> bool:
        return (train_bases is None and r["split"] == "train") or r["labels"]["base"] == r["key"].split("/", 1)[1]

    rows = [r for r in iter_rows(manifest_dir) if wanted(r)]
    by_split: dict[str, set[str]] = {}
    for r in rows:
        by_split.setdefault(r["split"], set()).add(r["labels"]["base"])
    chosen = {
        split: set(sorted(bases, key=lambda b: hashlib.sha256(f"{seed}:{b}".encode()).hexdigest())[: keep.get(split, 0)])
        if keep.get(split, 0) is not None else bases
        for split, bases in by_split.items()
    }
    source = read_manifest_info(manifest_dir).source
    writer = ManifestWriter(out_dir, source={"name": "emoji-demo-subset", "args": {
        "from": source, "train_bases": train_bases, "test_bases": test_bases, "seed": seed}})
    for r in rows:
        if r["labels"]["base"] in chosen[r["split"]]:
            writer.add(r)
    info = writer.close()
    return {"counts": info.counts, "bases": {s: len(b) for s, b in chosen.items()}}


def _example_images(manifest_dir: Path, out: Path, n: int = 3) -> list[Path]:
    """The first ``n`` test images of the manifest as PNG files (for the report's usage snippet)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for row in iter_rows(manifest_dir):
        if row["split"] == "test" and len(paths) < n:
            path = out / f"{row['key'].replace('/', '_')}.png"
            load_image(row, manifest_dir).save(path)
            paths.append(path)
    return paths


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run every stage; returns the report dict (also written as ``report.json``/``report.md``)."""

    run_dir = Path(cfg.out or cfg.runs / f"demo-{datetime.now():%Y%m%d-%H%M%S}")
    run_dir.mkdir(parents=True, exist_ok=True)
    art = cfg.runs / "demo-artifacts"
    stages: list[StageResult] = []

    def stage(name: str, inputs: dict[str, Any], build) -> StageResult:
        print(f"\n== {name} ==", flush=True)
        res = run_stage(art, name, inputs, build)
        print(f"== {name}: {'reused ' + str(res.path) if res.reused else f'{res.seconds:.1f} s'}", flush=True)
        stages.append(res)
        return res

    t0 = time.perf_counter()
    print("== assets ==", flush=True)
    fetch_all(llms=(cfg.llm,) if cfg.llm in EMBEDDED_LLMS else ())
    stages.append(StageResult("assets", flame_home(), False, time.perf_counter() - t0, {}))
    print(f"== assets: {time.perf_counter() - t0:.1f} s", flush=True)

    manifest = stage("manifest", {"source": "emoji", "seed": cfg.seed, "version": __version__},
                     lambda out: dataclasses.asdict(build_emoji_manifest(out, seed=cfg.seed)) | {"parts": None})
    data = manifest
    if not cfg.full:
        data = stage("subset", {"manifest": str(manifest.path), "train_bases": cfg.train_bases,
                                "test_bases": cfg.test_bases, "seed": cfg.seed},
                     lambda out: build_subset(manifest.path, out, cfg.train_bases, cfg.test_bases, cfg.seed))
    embed_cfg = EmbedConfig(manifest=str(data.path), out="", llm=cfg.llm)
    cache = stage("cache", {"manifest": str(data.path), "embed": dataclasses.asdict(embed_cfg) | {"out": None},
                            "version": __version__},
                  lambda out: run_embed(dataclasses.replace(embed_cfg, out=str(out))).to_dict())
    cache_dir = cache.path
    overrides = [f"data.manifest={data.path}", f"data.cache={cache_dir}", *cfg.train_overrides]
    trained = stage("train", {"cache": str(cache_dir), "config": _file_digest(cfg.train_config),
                              "overrides": overrides, "version": __version__},
                    lambda out: train(load_config(cfg.train_config, [*overrides, f"train.output_dir={out}"])))
    model_dir = trained.path / "model"

    print("\n== eval ==", flush=True)
    t_eval = time.perf_counter()
    results = run_benchmark(model_dir, "emoji", data.path, run_dir / "eval")
    eval_s = time.perf_counter() - t_eval
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    write_card(model_dir, config, [results], datasets=["emoji (Noto Apache-2.0, Twemoji CC-BY-4.0, Unicode CLDR)"])
    examples = _example_images(data.path, run_dir / "examples")
    print(f"== eval: {eval_s:.1f} s", flush=True)

    reader = CacheReader(cache_dir)
    cache_report = inspect_cache(reader)
    plot_facet_cosine(cache_report, reader.facets, run_dir / "facet_cosine.png")
    if (trained.path / "loss.png").exists():
        with atomic_file(run_dir / "loss.png") as tmp:
            shutil.copyfile(trained.path / "loss.png", tmp)
    report = {
        "run_dir": str(run_dir),
        "stages": {s.name: {"path": str(s.path), "reused": s.reused, "seconds": round(s.seconds, 1)} for s in stages}
        | {"eval": {"path": str(run_dir / "eval"), "reused": False, "seconds": round(eval_s, 1)}},
        "total_seconds": round(time.perf_counter() - t0, 1),
        "cpu": cpu_summary(),
        "data": data.info,
        "cache": cache.info,
        "train": trained.info,
        "anisotropy": cache_report.anisotropy,
        "results": results,
        "model": str(model_dir),
        "examples": [str(p) for p in examples],
    }
    atomic_write_bytes(run_dir / "report.json",
                       json.dumps(report, indent=2, default=str, ensure_ascii=False).encode("utf-8"))
    write_report_md(report, run_dir / "report.md")
    print("\n" + key_numbers(report))
    print(f"\nreport: {run_dir / 'report.md'}")
    return report
