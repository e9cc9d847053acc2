"""Run a benchmark end to end: load the model and its text side, embed, score, write results and plots.

:func:`run_benchmark` is what ``flame eval`` (:func:`main`) and the demo call. :func:`evaluate_benchmark` does
the work on already-loaded parts (tests pass small fakes to it).
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from eval.benchmarks import Benchmark, BenchmarkError, load_benchmark
from eval.benchmarks.base import ClassificationTask, LinearProbeTask, RetrievalTask
from eval.embedding import (
    ModelConfigError,
    TextEncoder,
    embed_images,
    load_model_text_encoder,
    load_text_encoder,
)
from eval.plots import plot_classification, plot_language_bars, plot_retrieval_examples
from eval.ranking import check_backend
from eval.report import build_results, render_markdown, write_results
from eval.tasks import TaskResult, evaluate_task
from eval.text_cache import default_root
from pipeline.hub import resolve_model_dir
from stage2_train_vision.data.transforms import eval_transform
from stage2_train_vision.export import load_exported

log = logging.getLogger(__name__)


def load_model(model_dir: str | Path) -> tuple[torch.nn.Module, dict[str, Any], Any]:
    """The exported stage-2 encoder, its ``config.json`` and its eval transform.

    Args:
        model_dir: a model folder or a hub id ``user/repo[@revision]`` (:func:`pipeline.hub.resolve_model_dir`).

    Raises:
        ModelSourceError: not a model folder, or a hub id that cannot be fetched.
        ModelConfigError: the config names neither a ``cache_identity`` nor its own ``text_side``.
    """
    model, config = load_exported(resolve_model_dir(model_dir, what="--model"))
    if not config.get("cache_identity") and not config.get("text_side"):
        raise ModelConfigError(f"{model_dir}/config.json has no cache_identity; export the model with flame train")
    return model, config, eval_transform(config["image"])


def evaluate_benchmark(bench: Benchmark, model: torch.nn.Module, transform: Any, text_encoder: TextEncoder,
                       out_dir: str | Path, text_mode: str | None = None, batch_size: int = 64,
                       device: str | None = None, backend: str = "auto", workers: int = 0,
                       plots: bool = True) -> tuple[list[TaskResult], dict[str, int]]:
    """Embed the benchmark's image pool once, evaluate every task, draw the plots into ``out_dir``.

    An image that does not open (undecodable, over Pillow's pixel limit, missing) is skipped: logged, counted
    by reason, and left out of every task with what belongs to it (:meth:`Benchmark.without_images`), so
    the metrics are those of the remaining images with their ground truth intact.

    Args:
        bench: from :func:`eval.benchmarks.load_benchmark`.
        model: image encoder (see :func:`eval.embedding.embed_images`).
        transform: PIL -> tensor eval transform.
        text_encoder: cached text side.
        out_dir: where PNGs go (``results.json``/``.md`` are written by the caller).
        text_mode: ``single``/``multi`` for every task, or ``None`` for each task's default (SPEC §6).
        batch_size: images per forward pass.
        device: ``cuda`` when available unless given.
        backend: retrieval ranking backend (:func:`eval.ranking.topk`).
        workers: image-decoding worker processes.
        plots: draw PNGs.

    Returns:
        the task results and the skipped images by reason (``{"undecodable_image": 1}``; empty if none).

    Raises:
        BenchmarkError: no image opens, or no task has images left.
        eval.ranking.RankingBackendError: an unknown ``backend`` (refused before any image is embedded).
    """
    check_backend(backend)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    need_features = any(isinstance(t, LinearProbeTask) for t in bench.tasks)
    emb, feats, failed = embed_images(model, bench.images, transform, batch_size, device, features=need_features,
                                      workers=workers, desc=f"{bench.name} images")
    skipped = dict(sorted(Counter(reason for reason, _ in failed.values()).items()))
    if failed:
        if len(failed) == len(bench.images):
            first = failed[min(failed)][1]
            raise BenchmarkError(f"{bench.name}: none of the {len(failed)} images opens ({skipped}); first: {first}")
        log.warning("%s: %d of %d images skipped (%s); metrics use the remaining images", bench.name,
                    len(failed), len(bench.images), ", ".join(f"{k} {v}" for k, v in skipped.items()))
        bench = bench.without_images(failed)
    results = []
    for task in bench.tasks:
        r = evaluate_task(task, emb, feats, text_encoder, text_mode, backend)
        shown = {k: round(v, 4) for k, v in r.metrics.items()}
        log.info("%s [%s]: %s (chance %s)", r.name, r.text_mode, shown, {k: round(v, 4) for k, v in r.chance.items()})
        results.append(r)
    if plots:
        draw_plots(bench, results, Path(out_dir))
    return results, skipped


def draw_plots(bench: Benchmark, results: list[TaskResult], out_dir: Path) -> list[Path]:
    """Retrieval examples per non-multilingual retrieval task, per-language bars, classification figures."""
    tasks = {t.name: t for t in bench.tasks}
    paths = []
    for r in results:
        task = tasks[r.name]
        if isinstance(task, RetrievalTask) and task.kind != "multilingual":
            gallery = [bench.images[i] for i in task.image_ids]
            paths.append(plot_retrieval_examples(gallery, task.texts, r.details, task.pairs,
                                                 out_dir / f"retrieval_examples_{r.name}.png",
                                                 title=f"{bench.name} {r.name} ({r.text_mode}): image → top-5 texts"))
        elif isinstance(task, ClassificationTask) or r.type == "linear_probe":
            paths.append(plot_classification(r.details, r.info["classnames"], out_dir / f"{r.name}.png",
                                             title=f"{bench.name} {r.name}: top-1 {100 * r.metrics['acc1']:.1f}% "
                                                   f"(chance {100 * r.chance['acc1']:.1f}%)"))
    ml = [r for r in results if r.type == "retrieval" and r.info.get("kind") == "multilingual"]
    if ml:
        k1, k2 = "text_retrieval_recall@1", "image_retrieval_recall@1"
        paths.append(plot_language_bars([r.info["lang"] for r in ml], [r.metrics[k1] for r in ml],
                                        [r.metrics[k2] for r in ml], [r.chance[k1] for r in ml],
                                        [r.chance[k2] for r in ml], out_dir / "multilingual_recall.png",
                                        title=f"{bench.name}: per-language R@1 ({ml[0].text_mode})"))
    return paths


def run_benchmark(model_dir: str | Path, benchmark: str, data: str | Path, out_dir: str | Path,
                  text_mode: str | None = None, split: str = "test", batch_size: int = 64,
                  text_batch_size: int = 32, text_cache: str | Path | None = None, device: str | None = None,
                  strict: bool = False, image_root: str | Path | None = None, languages: list[str] | None = None,
                  linear_probe: bool = True, backend: str = "auto", workers: int = 0,
                  plots: bool = True) -> dict[str, Any]:
    """Evaluate an exported model on a benchmark; write ``results.json``, ``results.md`` and PNGs to ``out_dir``.

    Args:
        model_dir: exported stage-2 model (``model.safetensors`` + ``config.json``).
        benchmark: a name of :data:`eval.benchmarks.BENCHMARKS`.
        data: the benchmark's files (a manifest directory for ``emoji``).
        out_dir: output folder (created).
        text_mode: force ``single`` or ``multi`` for every task (default: per task, SPEC §6).
        split: split to evaluate.
        batch_size, text_batch_size: images per forward pass, texts per text-embedder call.
        text_cache: eval text-vector cache root (default ``$FLAME_HOME/eval-text-cache``).
        device: image-encoder device (default ``cuda`` when available).
        strict: a benchmark size different from the published one is an error, not a warning.
        image_root: images folder for JSON-described benchmarks.
        languages: multilingual languages (default: all for XM3600, de fr es ja zh ar hi for emoji;
            ``["all"]``: every language present).
        linear_probe: run the linear probe where the benchmark has a train split.
        backend: retrieval ranking backend (``auto``, ``torch``, ``faiss``).
        workers: image-decoding worker processes.
        plots: draw the PNG figures.

    Returns:
        the ``results.json`` document (see :mod:`eval.report`).

    Raises:
        pipeline.cache.store.CacheIdentityError: the text embedder is not the one the model was trained against.
            A model whose config names a ``text_side`` embeds texts with its own tower (no LLM, no text cache).
        eval.benchmarks.BenchmarkError: unreadable benchmark data, no image that opens (or a size mismatch
            with ``strict``). Single images that do not open are skipped and counted in ``skipped``.
        FileNotFoundError, ModelConfigError: ``model_dir`` is not an exported model.
        OSError: ``out_dir`` cannot be created (e.g. it is a file); checked first, before any work.
    """
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    bench = load_benchmark(benchmark, data, split, strict=strict, image_root=image_root, languages=languages,
                           linear_probe=linear_probe)
    model, config, transform = load_model(model_dir)
    if config.get("text_side"):  # the model carries its own text encoder (stage2_train_vision.text_tower)
        text_encoder = load_model_text_encoder(model, config, device)
    else:
        text_encoder = load_text_encoder(config["cache_identity"], text_cache or default_root(), text_batch_size)
    results, skipped = evaluate_benchmark(bench, model, transform, text_encoder, out_dir, text_mode, batch_size,
                                          device, backend, workers, plots)
    doc = build_results(bench.name, bench.split, str(data), bench.counts, text_mode, str(model_dir), config, results,
                        skipped)
    js, md = write_results(doc, out_dir)
    log.info("wrote %s and %s", js, md)
    return doc


def main(args: argparse.Namespace) -> int:
    """`flame eval` with the options parsed by :func:`eval.cli.add_parser`: :func:`run_benchmark`, then print
    ``results.md`` to stdout. Returns the exit code 0; refused input raises (the ``flame`` entry point turns a
    :class:`pipeline.errors.FlameError` into exit code 2)."""
    doc = run_benchmark(
        args.model, args.benchmark, args.data, args.out, text_mode=args.text_mode, split=args.split,
        batch_size=args.batch_size, text_batch_size=args.text_batch_size, text_cache=args.text_cache,
        device=args.device, strict=args.strict, image_root=args.image_root,
        languages=args.languages.split(",") if args.languages else None,
        linear_probe=not args.no_linear_probe, backend=args.ranking, workers=args.workers,
        plots=not args.no_plots,
    )
    print(render_markdown(doc))
    return 0
