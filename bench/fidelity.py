"""Does the pipeline deliver FLAME's benefit? A fidelity study on the embedded emoji data (issue 14).

Trains and evaluates four variants with the **same** images (the demo subset), ViT and projector, steps,
batch, optimizer, schedule and test concepts, each with several seeds, and writes ``fidelity.json``, a
markdown table and a plot:

=====================  ==============================================================================
``flame``              cached Gemma-3-270M vectors, all 11 facets, P = 6 positives (the recipe)
``flame_single``       cached Gemma-3-270M vectors, raw prompt only (P = 1)
``flame_english_llm``  as ``flame``, with SmolLM2-135M (an English-only LLM)
``clip_scratch``       open_clip's ``TextTransformer`` trained from scratch jointly with the ViT on the same
                       captions (one of raw / short / long per image and step), CLIP BPE tokenizer, the same
                       sigmoid loss (:mod:`stage2_train_vision.text_tower`)
=====================  ==============================================================================

Every variant trains with ``configs/demo-cpu.toml`` and only these differences: the cache (Gemma, the Gemma
cache reduced to its raw facet, SmolLM2), ``data.positives`` (1 for ``flame_single``) and, for
``clip_scratch``, the text tower. ``clip_scratch`` reads the same cache only to select the same training keys
and keeps ``data.positives = 6`` so that its images and crops are drawn exactly as ``flame``'s (the sampled
vectors are not used). Evaluation: the ``emoji`` benchmark on the unseen test concepts (each task's default
text mode, SPEC §6); ``clip_scratch`` embeds eval texts with its own tower.

Usage::

    .venv/bin/python bench/fidelity.py                        # 3 seeds x 4 variants, --steps 200
    .venv/bin/python bench/fidelity.py --steps 100 --seeds 0 1 2 --jobs 2 --threads 1

Data stages (manifest, subset, stage-1 caches) are those of ``flame demo`` and are reused from
``runs/demo-artifacts``; each (variant, seed) training and evaluation is a reusable stage under
``runs/fidelity/`` (a rerun skips finished ones). Results go to ``bench/results/fidelity.{json,md,png}``.

JSON layout::

    {"config": {...}, "variants": {NAME: {"text_side": str, "seeds": [0, 1, 2],
      "metrics": {"<task>/<metric>": {"mean": x, "std": y, "values": [...]}}, "chance": {...},
      "runs": [{"seed", "train_seconds", "eval_seconds", "final_loss", ...}]}}}

``std`` is the sample standard deviation over seeds (0 for one seed). Metrics are fractions in [0, 1].
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.machine import cpu_summary  # noqa: E402  (after the project root is on sys.path)

log = logging.getLogger("fidelity")

GEMMA, SMOLLM = "gemma3-270m", "smollm2-135m"


@dataclass(frozen=True)
class Variant:
    """One arm of the study.

    Attributes:
        name: variant name in the results.
        llm: the stage-1 cache it reads (for ``clip_scratch``: only to select the same training keys).
        text: ``"cache"`` (all facets), ``"raw"`` (the cache reduced to the raw facet) or ``"tower"``.
        positives: ``data.positives``.
        describe: the text side in words (table and JSON).
    """

    name: str
    llm: str
    text: str
    positives: int
    describe: str


VARIANTS = {v.name: v for v in (
    Variant("flame", GEMMA, "cache", 6, "cached Gemma-3-270M vectors, 11 facets, P = 6"),
    Variant("flame_single", GEMMA, "raw", 1, "cached Gemma-3-270M vectors, raw prompt only, P = 1"),
    Variant("flame_english_llm", SMOLLM, "cache", 6, "cached SmolLM2-135M vectors, 11 facets, P = 6"),
    Variant("clip_scratch", GEMMA, "tower", 6,
            "open_clip TextTransformer from scratch ({layers} layers x {width}), CLIP BPE, one caption per image, "
            "P = 1"),
)}

#: (column, "<task>/<metric>") of the markdown table and the plot.
TABLE = [
    ("EN names I→T R@1", "retrieval_en_raw/text_retrieval_recall@1"),
    ("EN names T→I R@1", "retrieval_en_raw/image_retrieval_recall@1"),
    ("EN names I→T R@5", "retrieval_en_raw/text_retrieval_recall@5"),
    ("EN long I→T R@1", "retrieval_en_long/text_retrieval_recall@1"),
    ("EN long T→I R@1", "retrieval_en_long/image_retrieval_recall@1"),
    ("category top-1", "classification_category/acc1"),
    ("subcategory top-1", "classification_subcategory/acc1"),
    ("multilingual mean I→T R@1", "multilingual_mean/text_retrieval_recall@1"),
    ("multilingual mean T→I R@1", "multilingual_mean/image_retrieval_recall@1"),
]


@dataclass
class StudyConfig:
    """What :func:`run_study` runs.

    Attributes:
        variants: names from :data:`VARIANTS`.
        seeds: training seeds (model init, data order, crops, facet and caption draws).
        steps: optimizer steps per run (``train.max_steps``), the same for every variant.
        train_config: the stage-2 TOML every variant starts from; ``overrides`` go on top (all variants).
        runs: root of reusable artifacts (``runs/demo-artifacts`` for data, ``runs/fidelity`` for runs).
        out: where ``fidelity.json``/``.md``/``.png`` are written.
        threads: torch threads per training/eval process (0 = torch default).
        jobs: trainings run in parallel processes (evaluation runs one at a time in this process).
        text_cache: eval text-vector cache root (``None``: ``$FLAME_HOME/eval-text-cache``).
        keep_checkpoints: keep each run's training checkpoint (only the exported model is needed).
    """

    variants: tuple[str, ...] = tuple(VARIANTS)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 200
    train_config: Path = ROOT / "configs" / "demo-cpu.toml"
    overrides: tuple[str, ...] = ()
    runs: Path = Path("runs")
    out: Path = ROOT / "bench" / "results"
    threads: int = 0
    jobs: int = 1
    text_cache: Path | None = None
    keep_checkpoints: bool = False
    tower: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyData:
    """The manifest every variant trains and is evaluated on, and one stage-1 cache per LLM."""

    manifest: Path
    caches: dict[str, Path]


def prepare_data(runs: Path, llms: tuple[str, ...], train_bases: int = 300, test_bases: int = 150,
                 seed: int = 0) -> StudyData:
    """The demo's manifest, subset and stage-1 caches (one per LLM), reused from ``runs/demo-artifacts``.

    The stage inputs are exactly those of :func:`flame_pipeline.demo.run.run_demo`, so a finished ``flame demo`` is
    reused here and the other way round. Loads each LLM only to build a missing cache.
    """
    from flame_pipeline.demo.artifacts import run_stage
    from flame_pipeline.demo.run import build_subset
    from manifests.emoji import build_emoji_manifest
    from pipeline import __version__
    from pipeline.assets import fetch_all
    from stage1_embed_text.job import EmbedConfig, run_embed

    art = runs / "demo-artifacts"
    fetch_all(llms=llms)
    manifest = run_stage(art, "manifest", {"source": "emoji", "seed": seed, "version": __version__},
                         lambda out: dataclasses.asdict(build_emoji_manifest(out, seed=seed)) | {"parts": None})
    subset = run_stage(art, "subset", {"manifest": str(manifest.path), "train_bases": train_bases,
                                       "test_bases": test_bases, "seed": seed},
                       lambda out: build_subset(manifest.path, out, train_bases, test_bases, seed))
    caches = {}
    for llm in llms:
        embed_cfg = EmbedConfig(manifest=str(subset.path), out="", llm=llm)
        cache = run_stage(art, "cache", {"manifest": str(subset.path),
                                         "embed": dataclasses.asdict(embed_cfg) | {"out": None},
                                         "version": __version__},
                          lambda out, c=embed_cfg: run_embed(dataclasses.replace(c, out=str(out))).to_dict())
        log.info("cache %s: %s (%s)", llm, cache.path, "reused" if cache.reused else f"{cache.seconds:.0f} s")
        caches[llm] = cache.path
    return StudyData(subset.path, caches)


def raw_only_cache(cache_dir: Path, out_dir: Path, facet: str = "raw") -> dict[str, Any]:
    """Write a copy of a cache in which only ``facet`` is present (the others are marked absent and zeroed).

    Same identity, layout and keys, so a model trained on it is evaluated with the same LLM; with
    ``data.positives = 1`` training then sees exactly the raw prompt's vector of every sample.

    Returns:
        ``{"facet": facet, "rows": N, "rows_with_facet": n}``.

    Raises:
        KeyError: the cache has no facet called ``facet``.
    """
    from pipeline.cache.store import CacheMeta, CacheReader, CacheWriter

    reader = CacheReader(cache_dir)
    if facet not in reader.facets:
        raise KeyError(f"cache {cache_dir} has no facet {facet!r} (facets: {reader.facets})")
    j = reader.facets.index(facet)
    meta = CacheMeta.read(cache_dir)
    meta = dataclasses.replace(meta, extra=dict(meta.extra) | {"derived": {"from": str(cache_dir), "only": facet}})
    writer = CacheWriter.create(out_dir, meta)
    vectors, mask = reader.load_all()
    keep = np.zeros_like(mask)
    keep[:, j] = mask[:, j]
    vectors = np.where(keep[..., None], vectors, 0).astype(np.float16)
    for s, part in zip(range(meta.layout.n_shards), reader.iter_index()):
        r = meta.layout.shard_range(s)
        writer.write_shard(s, vectors[r.start : r.stop], keep[r.start : r.stop], part)
    writer.build_lookup(keep)
    return {"facet": facet, "rows": int(len(mask)), "rows_with_facet": int(keep[:, j].sum())}


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def train_overrides(cfg: StudyConfig, variant: Variant, seed: int, manifest: Path, cache: Path,
                    out_dir: Path) -> list[str]:
    """The stage-2 overrides of one run: the study's shared budget, then what the variant changes."""
    shared = [f"train.max_steps={cfg.steps}", f"train.seed={seed}", f"train.threads={cfg.threads}",
              "train.save_every=0", *cfg.overrides]
    return [f"data.manifest={manifest}", f"data.cache={cache}", *shared, f"data.positives={variant.positives}",
            f"train.output_dir={out_dir}"]


def tower_config(cfg: StudyConfig):
    """The ``clip_scratch`` text tower (:class:`stage2_train_vision.text_tower.TextTowerConfig`)."""
    from stage2_train_vision.text_tower import TextTowerConfig

    return TextTowerConfig(**cfg.tower)


def _train_job(cfg: StudyConfig, variant: Variant, overrides: list[str], out_dir: str) -> dict[str, Any]:
    """Train one run (in this process or a worker); returns the training summary plus its wall time."""
    from stage2_train_vision.config import load_config
    from stage2_train_vision.train import train

    logging.basicConfig(level=logging.WARNING)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    summary = train(load_config(cfg.train_config, overrides),
                    text_tower=tower_config(cfg) if variant.text == "tower" else None)
    if not cfg.keep_checkpoints:
        shutil.rmtree(Path(out_dir) / "checkpoints", ignore_errors=True)
    return summary | {"train_seconds": round(time.perf_counter() - t0, 1)}


def flatten_metrics(doc: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """``results.json`` -> ``({"<task>/<metric>": value}, {same keys: chance})``, plus ``multilingual_mean/*``."""
    metrics, chance = {}, {}
    for task, t in doc["tasks"].items():
        for k, v in t["metrics"].items():
            metrics[f"{task}/{k}"], chance[f"{task}/{k}"] = float(v), float(t["chance"][k])
    avg = doc.get("summary", {}).get("multilingual_average")
    if avg:
        for k, v in avg["metrics"].items():
            metrics[f"multilingual_mean/{k}"] = float(v)
            chance[f"multilingual_mean/{k}"] = float(avg["chance"][k])
    return metrics, chance


def aggregate(per_seed: dict[int, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """``{seed: {metric: value}}`` -> ``{metric: {"mean", "std" (sample, ddof=1; 0 for one seed), "values"}}``
    over the metrics every seed has, values in seed order."""
    seeds = sorted(per_seed)
    keys = [k for k in per_seed[seeds[0]] if all(k in per_seed[s] for s in seeds)]
    out = {}
    for k in keys:
        vals = [per_seed[s][k] for s in seeds]
        out[k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                  "values": vals}
    return out


def run_study(cfg: StudyConfig, data: StudyData | None = None) -> dict[str, Any]:
    """Train and evaluate every (variant, seed); write ``fidelity.json``, ``fidelity.md`` and ``fidelity.png``.

    Args:
        cfg: the study.
        data: manifest and caches (default: :func:`prepare_data`, the demo's artifacts).

    Returns:
        The ``fidelity.json`` document (module docstring).

    Raises:
        KeyError: an unknown variant name.
    """
    from eval.run import run_benchmark
    from flame_pipeline.demo.artifacts import run_stage

    t_start = time.perf_counter()
    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        raise KeyError(f"unknown variants {unknown} (known: {', '.join(VARIANTS)})")
    variants = [VARIANTS[v] for v in cfg.variants]
    if data is None:
        data = prepare_data(cfg.runs, tuple(dict.fromkeys(v.llm for v in variants)))
    root = cfg.runs / "fidelity"
    caches = dict(data.caches)
    if any(v.text == "raw" for v in variants):
        raw = run_stage(root, "cache-raw", {"cache": str(data.caches[GEMMA])},
                        lambda out: raw_only_cache(data.caches[GEMMA], out))
        caches["raw"] = raw.path
    tower = tower_config(cfg).to_dict()
    cfg_digest = _digest(cfg.train_config)

    jobs: dict[tuple[str, int], dict[str, Any]] = {}
    for seed in cfg.seeds:  # seed-major: a study cut short still has every variant for its first seeds
        for v in variants:
            cache = caches["raw" if v.text == "raw" else v.llm]
            inputs = {"variant": dataclasses.asdict(v), "seed": seed, "steps": cfg.steps, "config": cfg_digest,
                      "overrides": list(cfg.overrides), "manifest": str(data.manifest), "cache": str(cache),
                      "tower": tower if v.text == "tower" else None}
            from flame_pipeline.demo.artifacts import inputs_hash

            out_dir = root / f"{v.name}-s{seed}-{inputs_hash(inputs)}"
            jobs[(v.name, seed)] = {"variant": v, "seed": seed, "inputs": inputs, "dir": out_dir,
                                    "overrides": train_overrides(cfg, v, seed, data.manifest, cache, out_dir / "train")}

    def marker(job: dict[str, Any]) -> Path:
        return job["dir"] / "run.json"

    def finished(job: dict[str, Any]) -> dict[str, Any] | None:
        if marker(job).exists():
            saved = json.loads(marker(job).read_text())
            if saved.get("inputs") == json.loads(json.dumps(job["inputs"], default=str)):
                return saved
        return None

    def evaluate(job: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        doc = run_benchmark(job["dir"] / "train" / "model", "emoji", data.manifest, job["dir"] / "eval",
                            text_cache=cfg.text_cache, linear_probe=False, plots=False)
        metrics, chance = flatten_metrics(doc)
        record = {"inputs": job["inputs"], "summary": summary, "eval_seconds": round(time.perf_counter() - t0, 1),
                  "metrics": metrics, "chance": chance, "counts": doc["counts"]}
        marker(job).write_text(json.dumps(record, indent=2, default=str))
        log.info("%s seed %d: %s", job["variant"].name, job["seed"],
                 {c: round(100 * metrics[k], 1) for c, k in TABLE if k in metrics})
        return record

    records: dict[tuple[str, int], dict[str, Any]] = {}
    todo = []
    for key, job in jobs.items():
        saved = finished(job)
        if saved is not None:
            log.info("%s seed %d: reused %s", key[0], key[1], job["dir"])
            records[key] = saved
        else:
            todo.append(key)

    def start(key: tuple[str, int]) -> bool:
        """Prepare a fresh run folder, unless another invocation (e.g. one started with other --seeds on the
        same --runs) finished this run meanwhile: then its record is taken and False returned."""
        saved = finished(jobs[key])
        if saved is not None:
            log.info("%s seed %d: finished meanwhile by another invocation, reused", *key)
            records[key] = saved
            return False
        shutil.rmtree(jobs[key]["dir"], ignore_errors=True)
        jobs[key]["dir"].mkdir(parents=True)
        return True

    if cfg.jobs > 1 and len(todo) > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(cfg.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_train_job, cfg, jobs[k]["variant"], jobs[k]["overrides"],
                                   str(jobs[k]["dir"] / "train")): k for k in todo if start(k)}
            for fut in as_completed(futures):
                k = futures[fut]
                records[k] = evaluate(jobs[k], fut.result())
    else:
        for k in todo:
            if not start(k):
                continue
            job = jobs[k]
            log.info("training %s seed %d (%d steps)", k[0], k[1], cfg.steps)
            records[k] = evaluate(job, _train_job(cfg, job["variant"], job["overrides"], str(job["dir"] / "train")))

    doc = build_document(cfg, variants, records, time.perf_counter() - t_start, data)
    write_outputs(doc, cfg.out)
    return doc


def build_document(cfg: StudyConfig, variants: list[Variant], records: dict[tuple[str, int], dict[str, Any]],
                   seconds: float, data: StudyData) -> dict[str, Any]:
    """The ``fidelity.json`` document from the per-run records (module docstring)."""
    from stage2_train_vision.config import load_config

    base = load_config(cfg.train_config, list(cfg.overrides))
    out: dict[str, Any] = {
        "config": {
            "cpu": cpu_summary(), "seeds": list(cfg.seeds), "steps": cfg.steps, "batch_size": base.train.batch_size,
            "images_per_run": cfg.steps * base.train.batch_size, "train_config": str(cfg.train_config),
            "overrides": list(cfg.overrides), "model": dataclasses.asdict(base.model), "optim": dataclasses.asdict(base.optim),
            "loss": base.loss.kind, "mixed_precision": base.train.mixed_precision, "threads": cfg.threads,
            "jobs": cfg.jobs, "manifest": str(data.manifest), "caches": {k: str(v) for k, v in data.caches.items()},
            "cache_tokenization": _cache_tokenization(data), "text_tower": tower_config(cfg).to_dict(),
            "benchmark": "emoji (test split: unseen concepts)", "wall_seconds": round(seconds, 1),
            "run_seconds_sum": round(sum((r["summary"].get("train_seconds") or 0) + r["eval_seconds"]
                                         for r in records.values()), 1),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "variants": {},
    }
    for v in variants:
        runs = {seed: records[(v.name, seed)] for seed in cfg.seeds}
        any_run = next(iter(runs.values()))
        out["variants"][v.name] = {
            "text_side": v.describe.format(**tower_config(cfg).to_dict()),
            "seeds": list(cfg.seeds),
            "metrics": aggregate({s: r["metrics"] for s, r in runs.items()}),
            "chance": any_run["chance"],
            "counts": any_run["counts"],
            "runs": [{"seed": s, "train_seconds": r["summary"].get("train_seconds"), "eval_seconds": r["eval_seconds"],
                      "first_loss": r["summary"].get("first_loss"), "final_loss": r["summary"].get("final_loss"),
                      "images_per_s": r["summary"].get("images_per_s")} for s, r in runs.items()],
        }
    return out


def _cache_tokenization(data: StudyData) -> dict[str, str]:
    """``identity.tokenization`` of each cache's ``meta.json`` (absent: ``split-segments``, written before the
    field existed; ``"?"``: unreadable)."""
    out = {}
    for llm, path in data.caches.items():
        try:
            out[llm] = json.loads((Path(path) / "meta.json").read_text())["identity"].get("tokenization", "split-segments")
        except (OSError, ValueError, KeyError):
            out[llm] = "?"
    return out


def render_markdown(doc: dict[str, Any]) -> str:
    """The results table: mean ± std over seeds in %, chance in the last row."""
    c = doc["config"]
    names = list(doc["variants"])
    lines = [f"Emoji test split (unseen concepts); {len(c['seeds'])} seeds ({', '.join(map(str, c['seeds']))}), "
             f"{c['steps']} steps x {c['batch_size']} images per run; mean ± std over seeds, %. "
             f"CPU: {c.get('cpu', 'not recorded')}.", "",
             "| variant | " + " | ".join(col for col, _ in TABLE) + " |", "|---" * (len(TABLE) + 1) + "|"]
    for name in names:
        m = doc["variants"][name]["metrics"]
        cells = [f"{100 * m[k]['mean']:.1f} ± {100 * m[k]['std']:.1f}" if k in m else "-" for _, k in TABLE]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    chance = doc["variants"][names[0]]["chance"] if names else {}
    lines.append("| chance | " + " | ".join(f"{100 * chance[k]:.1f}" if k in chance else "-" for _, k in TABLE) + " |")
    lines += ["", "| variant | text side | train s / run | final loss |", "|---|---|---|---|"]
    for name in names:
        v = doc["variants"][name]
        secs = [r["train_seconds"] for r in v["runs"] if r["train_seconds"] is not None]
        losses = [r["final_loss"] for r in v["runs"] if r["final_loss"] is not None]
        lines.append(f"| `{name}` | {v['text_side']} | {np.mean(secs):.0f} | {np.mean(losses):.4f} |")
    lines += ["", f"This invocation: {c['wall_seconds'] / 60:.1f} min wall ({c['jobs']} parallel trainings, "
              f"{c['threads'] or 'default'} torch threads each; reused runs cost nothing); training + evaluation "
              f"of all runs: {c['run_seconds_sum'] / 60:.1f} process-minutes."]
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> Path:
    """Grouped bars (mean, error bar = std over seeds) of the :data:`TABLE` metrics per variant, chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["variants"])
    cols = [(c, k) for c, k in TABLE if all(k in doc["variants"][n]["metrics"] for n in names)]
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(cols)), 4.5))
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(cols))
    for i, n in enumerate(names):
        m = doc["variants"][n]["metrics"]
        ax.bar(x + i * width - 0.4 + width / 2, [100 * m[k]["mean"] for _, k in cols], width,
               yerr=[100 * m[k]["std"] for _, k in cols], capsize=2, label=n)
    chance = doc["variants"][names[0]]["chance"]
    for j, (_, k) in enumerate(cols):
        ax.hlines(100 * chance[k], j - 0.4, j + 0.4, colors="k", linestyles="dashed", linewidth=0.8)
    ax.set_xticks(x, [c for c, _ in cols], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("% (dashed: chance)")
    c = doc["config"]
    ax.set_title(f"emoji test split, {len(c['seeds'])} seeds, {c['steps']} steps x {c['batch_size']}: mean ± std")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(doc: dict[str, Any], out: Path) -> dict[str, Path]:
    """``fidelity.json``, ``fidelity.md`` and ``fidelity.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "fidelity.json", "md": out / "fidelity.md", "png": out / "fidelity.png"}
    paths["json"].write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["md"].write_text(render_markdown(doc), encoding="utf-8")
    plot(doc, paths["png"])
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=StudyConfig.steps, help="optimizer steps per run (every variant)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(StudyConfig.seeds))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--config", type=Path, default=StudyConfig.train_config, help="stage-2 TOML for every variant")
    p.add_argument("--runs", type=Path, default=StudyConfig.runs, help="root of reusable artifacts")
    p.add_argument("--out", type=Path, default=StudyConfig.out, help="where fidelity.json/.md/.png go")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (1 on a busy machine)")
    p.add_argument("--jobs", type=int, default=1, help="trainings in parallel processes")
    p.add_argument("overrides", nargs="*", help="stage-2 overrides for every variant, e.g. train.batch_size=64")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        import torch

        torch.set_num_threads(args.threads)
    doc = run_study(StudyConfig(variants=tuple(args.variants), seeds=tuple(args.seeds), steps=args.steps,
                                train_config=args.config, overrides=tuple(args.overrides), runs=args.runs,
                                out=args.out, threads=args.threads, jobs=args.jobs))
    print(render_markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
