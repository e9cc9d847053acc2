"""Does the pipeline deliver FLAME's benefit? The fidelity study, second round (issues 14 and 23).

Five arms train with the **same** images, ViT and projector, steps, batch, optimizer, schedule, seeds and crops
(crops come from their own random stream, independent of the facet draw: ``stage2_train_vision.data.samples``):

=====================  ==============================================================================
``flame``              cached Gemma-3-270M vectors, all 11 facets, P = 6 (the recipe)
``flame_one_prompt``   the same three captions, one prompt each (the raw prompt for the raw caption, facet 1
                       of the short and of the long caption), P = 3: same content, fewer prompts
``raw_only``           the raw prompt only, P = 1 (issue 14's ``flame_single``): less content
``flame_english_llm``  as ``flame``, with SmolLM2-135M (an English-only LLM)
``clip_scratch``       open_clip's ``TextTransformer`` trained from scratch jointly with the ViT, one of the raw,
                       short and long captions per image and step (:mod:`stage2_train_vision.text_tower`)
=====================  ==============================================================================

``flame_one_prompt`` and ``raw_only`` read a copy of the Gemma cache in which only their facets are present
(:func:`facet_subset_cache`), so no training-code knob is needed: with P = number of present facets every step
sees all of them. ``clip_scratch`` reads the Gemma cache only to select the same training keys.

Evaluation (the ``emoji`` benchmark, unseen test concepts) scores English names and long captions in **both**
text modes (``single``: the raw prompt; ``multi``: the mean of the facet vectors), long captions in ``multi``
and every other task in ``single`` mode (names, SPEC §6); classification reports top-1 and mean per-class recall next to uniform chance and the
most-common-class baseline; multilingual retrieval is reported per language with its hit counts.

Claims and their metrics were fixed in :data:`CLAIMS` **before** the runs of this study were started (commit
that adds this docstring). Each claim is tested per metric on the paired (same-seed) differences: mean, a
percentile bootstrap 95 % interval (10,000 resamples of the seeds, fixed generator) and the exact two-sided
sign-flip permutation p over all 2^n sign patterns. A metric "holds" when the bootstrap interval lies above 0
**and** p <= 0.0625 = 2 / 2^5 (with 5 seeds: every seed agrees in sign, the smallest p that 5 seeds can
give; fewer than 5 seeds never hold). No correction for multiple comparisons is applied; the table says how many primary metrics hold.

The arms, table rows and claims, the statistics and everything derived from the per-run files live in
``bench/fidelity_report.py`` (re-exported here).

Usage::

    python bench/fidelity.py --train-bases 300 --steps 60 --jobs 2 --threads 1   # the committed demo-subset round
    python bench/fidelity.py --steps 60 --jobs 2 --threads 1 --out bench/results/fidelity-full \
        --reference bench/results --no-readme                  # the whole train split, verdicts compared
    python bench/fidelity.py --check                           # re-derive JSON + Markdown + README table; diff

Cost of the whole-split round: its stage-1 caches hold 6,488 rows per LLM against the subset's 900 (about 7x the
LLM work; the demo's 900-row Gemma cache took 180 s on a 2-core CPU with native bf16); the 25 training runs cost
the same as the subset's (fixed steps).

Each finished (arm, seed) writes ``bench/results/fidelity/<arm>-s<seed>.json`` (metrics in both modes, chance,
task counts, first/final loss, seconds, the hash of its inputs); a rerun skips every run whose file matches its
inputs, so an interrupted study resumes. ``fidelity.json``, ``fidelity.md``, ``fidelity.png`` and the README
block between ``<!-- fidelity:begin -->`` and ``<!-- fidelity:end -->`` are derived from those files only, and
only arms with every requested seed finished are reported. No file written holds an absolute path.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.machine import cpu_summary  # noqa: E402  (after the project root is on sys.path)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity_report import (  # noqa: E402,F401  (re-exported: the study's definitions and derived files)
    ARMS,
    BEGIN,
    CLAIMS,
    END,
    GEMMA,
    HOLD_P,
    MODES,
    ONE_PROMPT,
    SMOLLM,
    TABLE,
    Arm,
    aggregate,
    bootstrap_ci,
    build_document,
    check,
    paired,
    render_markdown,
    render_summary,
    run_file,
    sign_flip_p,
    write_outputs,
)

log = logging.getLogger("fidelity")


@dataclass
class StudyConfig:
    """What :func:`run_study` runs.

    Attributes:
        arms: names from :data:`ARMS`.
        seeds: training seeds (model init, data order, crops, facet and caption draws).
        steps: optimizer steps per run (``train.max_steps``), the same for every arm.
        train_config: the stage-2 TOML every arm starts from; ``overrides`` go on top (all arms).
        runs: root of reusable artifacts (``runs/demo-artifacts`` for data, ``runs/fidelity`` for runs).
        out: where ``fidelity.json``/``.md``/``.png`` and the per-run folder ``fidelity/`` go.
        readme: the README whose fidelity block is rewritten (``None``: leave it).
        threads: torch threads per training/eval (0 = torch default).
        jobs: runs trained and evaluated in parallel worker processes (1: in this process).
        text_cache: eval text-vector cache root (default ``<runs>/eval-text-cache``).
        tower: :class:`stage2_train_vision.text_tower.TextTowerConfig` fields for ``clip_scratch``.
        train_bases: train concepts of the study's manifest; ``None`` (default) = the whole emoji train
            split (6,188 images, skin-tone variants included); an int = that many base concepts, as the demo.
        test_bases: test concepts (base emoji only, both vendors), the same for every arm.
        reference: the ``out`` folder of a finished study whose verdicts are compared claim by claim
            (:func:`fidelity_report.reference_verdicts`), e.g. ``bench/results`` (the demo-subset round) for a
            whole-split run written to ``bench/results/fidelity-full``; stored relative to ``out``.
    """

    arms: tuple[str, ...] = tuple(ARMS)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int = 200
    train_config: Path = ROOT / "configs" / "demo-cpu.toml"
    overrides: tuple[str, ...] = ()
    runs: Path = Path("runs")
    out: Path = ROOT / "bench" / "results"
    readme: Path | None = ROOT / "README.md"
    threads: int = 0
    jobs: int = 1
    text_cache: Path | None = None
    tower: dict[str, Any] = field(default_factory=dict)
    train_bases: int | None = None
    test_bases: int = 150
    reference: Path | None = None


@dataclass
class StudyData:
    """The manifest every arm trains and is evaluated on, and one stage-1 cache per LLM."""

    manifest: Path
    caches: dict[str, Path]


def prepare_data(runs: Path, llms: tuple[str, ...], train_bases: int | None = None, test_bases: int = 150,
                 seed: int = 0) -> StudyData:
    """The study's manifest (:func:`~flame_pipeline.demo.run.build_subset`: the whole train split by default)
    and its stage-1 caches (one per LLM), reused from ``runs/demo-artifacts``.

    The stage inputs are those of :func:`flame_pipeline.demo.run.run_demo`, so with ``train_bases=300`` a
    finished ``flame demo`` is reused here and the other way round. Loads each LLM only to build a missing cache.
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


def arm_facets(facets: tuple[str, ...], text: str) -> tuple[str, ...] | None:
    """The facet names an arm keeps (``None``: all). ``ONE_PROMPT`` = ``raw`` and the first ``short.*`` and
    ``long.*`` facet in storage order (the same question as the raw prompt, asked of each caption).

    Raises:
        KeyError: the cache lacks a facet the arm needs.
    """
    if text in ("cache", "tower"):
        return None
    if text == "raw":
        want = ("raw",)
    else:
        want = ("raw", *(next((f for f in facets if f.startswith(g + ".")), g + ".?") for g in ("short", "long")))
    missing = [f for f in want if f not in facets]
    if missing:
        raise KeyError(f"cache has no facets {missing} (facets: {list(facets)})")
    return want


def facet_subset_cache(cache_dir: Path, out_dir: Path, keep_facets: tuple[str, ...]) -> dict[str, Any]:
    """Write a copy of a cache in which only ``keep_facets`` are present (the others marked absent, zeroed).

    Same identity, layout and keys, so a model trained on it is evaluated with the same LLM; with
    ``data.positives = len(keep_facets)`` every step sees every kept facet of every sample.

    Returns:
        ``{"facets": [...], "rows": N, "rows_with_facet": {facet: n}}``.

    Raises:
        KeyError: the cache has no facet of that name.
    """
    from pipeline.cache.store import CacheMeta, CacheReader, CacheWriter

    reader = CacheReader(cache_dir)
    missing = [f for f in keep_facets if f not in reader.facets]
    if missing:
        raise KeyError(f"cache {Path(cache_dir).name} has no facets {missing} (facets: {list(reader.facets)})")
    cols = [reader.facets.index(f) for f in keep_facets]
    meta = CacheMeta.read(cache_dir)
    meta = dataclasses.replace(meta, extra=dict(meta.extra) | {"derived": {"from": Path(cache_dir).name,
                                                                            "only": list(keep_facets)}})
    writer = CacheWriter.create(out_dir, meta)
    vectors, mask = reader.load_all()
    keep = np.zeros_like(mask)
    keep[:, cols] = mask[:, cols]
    vectors = np.where(keep[..., None], vectors, 0).astype(np.float16)
    for s, part in zip(range(meta.layout.n_shards), reader.iter_index()):
        r = meta.layout.shard_range(s)
        writer.write_shard(s, vectors[r.start : r.stop], keep[r.start : r.stop], part)
    writer.build_lookup(keep)
    return {"facets": list(keep_facets), "rows": int(len(mask)),
            "rows_with_facet": {f: int(keep[:, j].sum()) for f, j in zip(keep_facets, cols)}}


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def train_overrides(cfg: StudyConfig, arm: Arm, seed: int, manifest: Path, cache: Path, out_dir: Path) -> list[str]:
    """The stage-2 overrides of one run: the study's shared budget, then what the arm changes."""
    shared = [f"train.max_steps={cfg.steps}", f"train.seed={seed}", f"train.threads={cfg.threads}",
              "train.save_every=0", *cfg.overrides]
    return [f"data.manifest={manifest}", f"data.cache={cache}", *shared, f"data.positives={arm.positives}",
            f"train.output_dir={out_dir}"]


def tower_config(cfg: StudyConfig):
    """The ``clip_scratch`` text tower (:class:`stage2_train_vision.text_tower.TextTowerConfig`)."""
    from stage2_train_vision.text_tower import TextTowerConfig

    return TextTowerConfig(**cfg.tower)


def flatten_metrics(doc: dict[str, Any], mode: str) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """``results.json`` of one text mode -> ``{"<mode>:<task>/<metric>": value}``, the same keys' chance, and
    ``{"<mode>:<task>": counts}``; adds ``multilingual_mean/*`` from the summary."""
    metrics, chance, counts = {}, {}, {}
    for task, t in doc["tasks"].items():
        counts[f"{mode}:{task}"] = t["counts"]
        for k, v in t["metrics"].items():
            metrics[f"{mode}:{task}/{k}"], chance[f"{mode}:{task}/{k}"] = float(v), float(t["chance"][k])
    avg = doc.get("summary", {}).get("multilingual_average")
    if avg:
        for k, v in avg["metrics"].items():
            metrics[f"{mode}:multilingual_mean/{k}"] = float(v)
            chance[f"{mode}:multilingual_mean/{k}"] = float(avg["chance"][k])
    return metrics, chance, counts


def class_baselines(manifest: Path) -> dict[str, dict[str, Any]]:
    """Most-common-class and uniform baselines of each emoji classification task on the test split:
    ``{task: {"classes": C, "images": N, "most_common": name, "most_common_acc1": n_max / N,
    "most_common_mean_per_class_recall": 1 / C_present, "uniform_acc1": 1 / C}}``."""
    from eval.benchmarks import load_benchmark
    from eval.benchmarks.base import ClassificationTask

    bench = load_benchmark("emoji", manifest, "test", linear_probe=False)
    out = {}
    for t in bench.tasks:
        if isinstance(t, ClassificationTask):
            counts = np.bincount(np.asarray(t.labels), minlength=len(t.classnames))
            out[t.name] = {"classes": len(t.classnames), "images": int(counts.sum()),
                           "most_common": t.classnames[int(counts.argmax())],
                           "most_common_acc1": float(counts.max() / counts.sum()),
                           "most_common_mean_per_class_recall": float(1 / (counts > 0).sum()),
                           "uniform_acc1": 1 / len(t.classnames)}
    return out


def eval_tasks(bench: Any, mode: str) -> Any:
    """The tasks scored in ``mode``: ``single`` = every emoji task but long captions (long captions are
    scored in ``multi`` only, as in SPEC §6); ``multi`` = English names and long captions."""
    keep = (lambda n: n != "retrieval_en_long") if mode == "single" else (lambda n: n.startswith("retrieval_en_"))
    return dataclasses.replace(bench, tasks=[t for t in bench.tasks if keep(t.name)])


def eval_texts(bench: Any, mode: str) -> list[str]:
    """Every text :func:`evaluate_both_modes` embeds in ``mode`` (retrieval texts, filled class templates)."""
    from eval.benchmarks.base import ClassificationTask
    from eval.tasks import fill_template

    out: list[str] = []
    for t in eval_tasks(bench, mode).tasks:
        if isinstance(t, ClassificationTask):
            out += [fill_template(tpl, c) for c in t.classnames for tpl in t.templates]
        else:
            out += list(t.texts)
    return list(dict.fromkeys(out))


def evaluate_both_modes(model_dir: Path, manifest: Path, text_cache: Path) -> tuple[dict, dict, dict]:
    """The tasks of :func:`eval_tasks` in both modes; metrics, chance and task counts keyed
    ``"<mode>:<task>/<metric>"`` (:func:`flatten_metrics`)."""
    import eval.run as er
    from eval.benchmarks import load_benchmark
    from eval.report import build_results

    bench = load_benchmark("emoji", manifest, "test", linear_probe=False)
    model, config, transform = er.load_model(model_dir)
    if config.get("text_side"):
        encoder = er.load_model_text_encoder(model, config, "cpu")
    else:
        encoder = er.load_text_encoder(config["cache_identity"], text_cache, 32)
    metrics, chance, counts = {}, {}, {}
    for mode in MODES:
        b = eval_tasks(bench, mode)
        results, skipped = er.evaluate_benchmark(b, model, transform, encoder, model_dir, mode, device="cpu",
                                                 plots=False)
        doc = build_results(b.name, b.split, "", b.counts, mode, "", config, results, skipped)
        m, c, n = flatten_metrics(doc, mode)
        metrics, chance, counts = metrics | m, chance | c, counts | n
    return metrics, chance, counts


def prewarm_eval_texts(cache_dir: Path, manifest: Path, text_cache: Path) -> dict[str, int]:
    """Embed every eval text of both modes with the LLM of ``cache_dir``'s identity into ``text_cache`` (what
    the runs' evaluations then read); usable while that cache is still being written (its ``meta.json`` is
    written first). Returns ``{mode: number of texts}``."""
    import eval.run as er
    from eval.benchmarks import load_benchmark

    identity = json.loads((Path(cache_dir) / "meta.json").read_text())["identity"]
    bench = load_benchmark("emoji", manifest, "test", linear_probe=False)
    encoder = er.load_text_encoder(identity, text_cache, 32)
    out = {}
    for mode in MODES:
        texts = eval_texts(bench, mode)
        encoder.encode(texts, mode, desc=f"prewarm {identity['llm']} {mode}")
        out[mode] = len(texts)
    return out


def _train_and_eval(cfg: StudyConfig, arm: Arm, job: dict[str, Any], manifest: Path) -> dict[str, Any]:
    """Train one run, evaluate its exported model (:func:`evaluate_both_modes`), drop its checkpoints; the
    run record (no paths)."""
    from stage2_train_vision.config import load_config
    from stage2_train_vision.train import train

    out_dir = job["dir"]
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    summary = train(load_config(cfg.train_config, job["overrides"]),
                    text_tower=tower_config(cfg) if arm.text == "tower" else None)
    train_s = time.perf_counter() - t0
    shutil.rmtree(out_dir / "train" / "checkpoints", ignore_errors=True)
    t0 = time.perf_counter()
    metrics, chance, counts = evaluate_both_modes(out_dir / "train" / "model", manifest,
                                                  cfg.text_cache or cfg.runs / "eval-text-cache")
    return {"arm": arm.name, "seed": job["seed"], "inputs_hash": job["hash"], "inputs": job["inputs"],
            "first_loss": summary.get("first_loss"), "final_loss": summary.get("final_loss"),
            "train_seconds": round(train_s, 1), "eval_seconds": round(time.perf_counter() - t0, 1),
            "metrics": metrics, "chance": chance, "task_counts": counts}


def _run_one(cfg: StudyConfig, name: str, job: dict[str, Any], manifest: Path, path: Path) -> None:
    """Train and evaluate one (arm, seed) (in this process or a worker) and write its per-run file last, so an
    interrupted run leaves no file and is redone."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if cfg.threads:
        os.environ["OMP_NUM_THREADS"] = str(cfg.threads)
        import torch

        torch.set_num_threads(cfg.threads)
    log.info("training %s seed %d (%d steps)", name, job["seed"], cfg.steps)
    record = _train_and_eval(cfg, ARMS[name], job, manifest)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    log.info("%s seed %d: %s (train %.0f s, eval %.0f s)", name, job["seed"],
             {c: round(100 * record["metrics"][k], 1) for c, k in TABLE[:3] if k in record["metrics"]},
             record["train_seconds"], record["eval_seconds"])


def plan_jobs(cfg: StudyConfig, data: StudyData, caches: dict[str, Path]) -> dict[tuple[str, int], dict[str, Any]]:
    """Every (arm, seed) of the study, arm-major in the order of ``cfg.arms`` (a study cut short has every
    seed of its first arms, so the first claims can be decided), with the hash of everything its result
    depends on (no absolute paths: artifacts are named by their hashes)."""
    from flame_pipeline.demo.artifacts import inputs_hash

    tower = tower_config(cfg).to_dict()
    jobs = {}
    for name in cfg.arms:
        for seed in cfg.seeds:
            arm = ARMS[name]
            cache = caches[arm.text if arm.text in ("raw", ONE_PROMPT) else arm.llm]
            inputs = {"arm": dataclasses.asdict(arm), "seed": seed, "steps": cfg.steps,
                      "config": _digest(cfg.train_config), "overrides": list(cfg.overrides),
                      "manifest": Path(data.manifest).name, "cache": Path(cache).name,
                      "tower": tower if arm.text == "tower" else None}
            h = inputs_hash(inputs)
            out_dir = cfg.runs / "fidelity" / f"{name}-s{seed}-{h}"
            jobs[(name, seed)] = {"seed": seed, "inputs": inputs, "hash": h, "dir": out_dir,
                                  "overrides": train_overrides(cfg, arm, seed, data.manifest, cache, out_dir / "train")}
    return jobs


def run_study(cfg: StudyConfig, data: StudyData | None = None) -> dict[str, Any]:
    """Train and evaluate every missing (arm, seed), then write every derived file (:func:`write_outputs`).

    Args:
        cfg: the study.
        data: manifest and caches (default: :func:`prepare_data`, the demo's artifacts).

    Returns:
        The ``fidelity.json`` document.

    Raises:
        KeyError: an unknown arm name.
    """
    from flame_pipeline.demo.artifacts import run_stage
    from pipeline.cache.store import CacheReader

    unknown = [a for a in cfg.arms if a not in ARMS]
    if unknown:
        raise KeyError(f"unknown arms {unknown} (known: {', '.join(ARMS)})")
    if data is None:
        data = prepare_data(cfg.runs, tuple(dict.fromkeys(ARMS[a].llm for a in cfg.arms)), cfg.train_bases,
                            cfg.test_bases)
    caches = dict(data.caches)
    gemma_facets = tuple(CacheReader(data.caches[GEMMA]).facets) if GEMMA in data.caches else ()
    for text in ("raw", ONE_PROMPT):
        if any(ARMS[a].text == text for a in cfg.arms):
            keep = arm_facets(gemma_facets, text)
            caches[text] = run_stage(cfg.runs / "fidelity", f"cache-{text}",
                                     {"cache": Path(data.caches[GEMMA]).name, "facets": list(keep)},
                                     lambda out, k=keep: facet_subset_cache(data.caches[GEMMA], out, k)).path
    baselines = class_baselines(data.manifest)
    (cfg.out / "fidelity").mkdir(parents=True, exist_ok=True)
    study = {"arms": list(cfg.arms), "seeds": list(cfg.seeds), "steps": cfg.steps,
             "train_config": str(Path(cfg.train_config).resolve().relative_to(ROOT))
             if Path(cfg.train_config).resolve().is_relative_to(ROOT) else Path(cfg.train_config).name,
             "train_config_sha256_12": _digest(cfg.train_config), "overrides": list(cfg.overrides),
             "manifest": Path(data.manifest).name, "caches": {k: Path(v).name for k, v in caches.items()},
             "text_tower": tower_config(cfg).to_dict(), "threads": cfg.threads, "jobs": cfg.jobs, "cpu": cpu_summary(),
             "batch_size": _batch_size(cfg), "baselines": baselines,
             "train_bases": "all" if cfg.train_bases is None else cfg.train_bases, "test_bases": cfg.test_bases,
             "split_rows": manifest_counts(data.manifest),
             "reference": reference_name(cfg.out, cfg.reference),
             "benchmark": "emoji, test split (concepts unseen in training)"}
    (cfg.out / "fidelity" / "study.json").write_text(json.dumps(study, indent=1, sort_keys=True) + "\n",
                                                      encoding="utf-8")

    def refresh(draw: bool = False) -> dict[str, Any]:  # the derived files always show every finished run
        doc = build_document(cfg.out)
        write_outputs(doc, cfg.out, cfg.readme, draw)
        return doc

    todo = []
    for (name, seed), job in plan_jobs(cfg, data, caches).items():
        path = run_file(cfg.out, name, seed)
        if path.exists() and json.loads(path.read_text()).get("inputs_hash") == job["hash"]:
            log.info("%s seed %d: done (%s)", name, seed, path.name)
        else:
            todo.append((name, job, path))
    if cfg.jobs > 1 and len(todo) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(cfg.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_run_one, cfg, name, job, data.manifest, path): (name, job["seed"])
                       for name, job, path in todo}
            for fut in as_completed(futures):
                if fut.exception() is not None:  # the others go on; the arm is then reported as incomplete
                    log.error("%s seed %d failed: %r", *futures[fut], fut.exception())
                else:
                    refresh()
    else:
        for name, job, path in todo:
            _run_one(cfg, name, job, data.manifest, path)
            refresh()
    return refresh(draw=True)


def reference_name(out: Path, reference: Path | str | None) -> str | None:
    """``reference`` relative to ``out`` (POSIX) if it holds a finished study (``fidelity/study.json``), else
    ``None``; with ``reference`` given but holding no study, :class:`FileNotFoundError`."""
    if not reference:
        return None
    if not (Path(reference) / "fidelity" / "study.json").is_file():
        raise FileNotFoundError(f"--reference {reference}: no finished study there (no fidelity/study.json)")
    return Path(os.path.relpath(Path(reference).resolve(), Path(out).resolve())).as_posix()


def manifest_counts(manifest: Path) -> dict[str, int]:
    """Rows per split of the study's manifest (``{"train": 6188, "test": 300}`` for the whole train split)."""
    from manifests.schema import read_manifest_info

    return dict(sorted(read_manifest_info(manifest).counts.items()))


def _batch_size(cfg: StudyConfig) -> int:
    from stage2_train_vision.config import load_config

    return load_config(cfg.train_config, list(cfg.overrides)).train.batch_size




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=StudyConfig.steps, help="optimizer steps per run (every arm)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(StudyConfig.seeds))
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--config", type=Path, default=StudyConfig.train_config, help="stage-2 TOML for every arm")
    p.add_argument("--runs", type=Path, default=StudyConfig.runs, help="root of reusable artifacts")
    p.add_argument("--out", type=Path, default=StudyConfig.out, help="where fidelity.json/.md/.png go")
    p.add_argument("--readme", type=Path, default=StudyConfig.readme, help="README whose fidelity block is written")
    p.add_argument("--no-readme", action="store_true", help="leave the README alone")
    p.add_argument("--train-bases", default="all",
                   help="train concepts: 'all' = the whole emoji train split (default), N = N base concepts (the demo: 300)")
    p.add_argument("--reference", type=Path, default=None,
                   help="the --out folder of a finished study whose verdicts are compared claim by claim, e.g. "
                        "bench/results (the demo-subset round) for a whole-split run with --out bench/results/fidelity-full")
    p.add_argument("--threads", type=int, default=0, help="torch threads per training run (0: torch default); with --jobs > 1 stage 1 still uses every core")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel worker processes")
    p.add_argument("--check", action="store_true",
                   help="re-derive fidelity.json from the per-run files, re-render fidelity.md and the README "
                        "block from it; exit 1 on any difference (trains nothing)")
    p.add_argument("--render", action="store_true",
                   help="write fidelity.json/.md/.png and the README block from the finished runs (trains nothing)")
    p.add_argument("overrides", nargs="*", help="stage-2 overrides for every arm, e.g. train.batch_size=64")
    args = p.parse_args(argv)
    readme = None if args.no_readme else args.readme
    if args.check:
        problems = check(args.out, readme)
        for line in problems:
            print(f"fidelity --check: {line}", file=sys.stderr)
        if not problems:
            print("fidelity --check: fidelity.json, fidelity.md and the README block match")
        return 1 if problems else 0
    if args.render:  # also (re)names the reference study in study.json, the one field a render may change
        path = args.out / "fidelity" / "study.json"
        study = json.loads(path.read_text(encoding="utf-8"))
        if args.reference is not None and study.get("reference") != reference_name(args.out, args.reference):
            study["reference"] = reference_name(args.out, args.reference)
            path.write_text(json.dumps(study, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        doc = build_document(args.out)
        write_outputs(doc, args.out, readme)
        print(render_summary(doc))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.threads and args.jobs <= 1:  # with workers, only they are limited (stage 1 here keeps every core)
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        import torch

        torch.set_num_threads(args.threads)
    doc = run_study(StudyConfig(arms=tuple(args.arms), seeds=tuple(args.seeds), steps=args.steps,
                                train_config=args.config, overrides=tuple(args.overrides), runs=args.runs,
                                out=args.out, readme=readme, threads=args.threads, jobs=args.jobs,
                                train_bases=None if args.train_bases == "all" else int(args.train_bases),
                                reference=args.reference))
    print(render_summary(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
