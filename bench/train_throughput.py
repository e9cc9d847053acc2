"""Benchmark: stage-2 training images/s with the real loader vs the same model fed from in-memory tensors.

SPEC §10 / issue 4. Both runs use the model, optimizer, schedule, loss and batch size of ``--config`` (default:
the CPU demo) and time the shipped training step, :func:`stage2_train_vision.step.train_step` (forward, loss,
backward, clip, optimizer and scheduler step under an Accelerate ``Accelerator`` on the CPU, mixed precision per
``train.mixed_precision``); the only difference is where batches come from: the real
:func:`stage2_train_vision.data.pairs.build_training_data` loader (decode, crop, facet draw, cache reads; per
``--workers``) or one batch of tensors built beforehand and reused. The ratio is loader / in-memory (target
>= 0.9). Data: ``--manifest`` (e.g. the emoji manifest) or a synthetic manifest of 64 px PNGs, with a
cache of random unit vectors (D = ``--dim``) for its keys, written to a temporary directory.

    .venv/bin/python bench/train_throughput.py --manifest /tmp/emoji-full --steps 10 --workers 0 1
"""

from __future__ import annotations

import argparse
import io
import itertools
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from cache_read import write_cache  # bench/ is on sys.path when run as a script
from PIL import Image

from manifests.schema import ManifestWriter, read_manifest
from pipeline.cache.store import CacheReader
from stage2_train_vision.config import load_config
from stage2_train_vision.data.pairs import build_training_data
from stage2_train_vision.data.transforms import train_transform
from stage2_train_vision.model import FlameVisionModel
from stage2_train_vision.run.launch import resolve_mixed_precision
from stage2_train_vision.step import prepare_step, train_step
from stage2_train_vision.train import resolve_model_config

log = logging.getLogger("bench.train_throughput")


def synthetic_manifest(out: Path, n: int, size: int = 64) -> Path:
    """``n`` random-noise PNGs of ``size`` px (emoji-sized), split "train"."""
    rng = np.random.default_rng(0)
    writer = ManifestWriter(out, {"name": "bench", "args": {"n": n}})
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        writer.add({"key": f"img{i:06d}", "image_bytes": buf.getvalue(), "split": "train"})
    writer.close()
    return out


def random_cache(out: Path, keys: list[str], facets: int, dim: int) -> Path:
    rng = np.random.default_rng(1)
    vec = rng.normal(size=(len(keys), facets, dim)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=-1, keepdims=True)
    write_cache(out, keys, vec.astype(np.float16), np.ones((len(keys), facets), bool), 4096, 8)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo-cpu.toml")
    p.add_argument("--manifest", default=None, help="manifest to read images from (default: synthetic)")
    p.add_argument("--n", type=int, default=2048, help="synthetic images when no --manifest")
    p.add_argument("--dim", type=int, default=640, help="D of the random cache (640 = Gemma-3-270M)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run (after 2 warm-up steps)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="DataLoader workers to try")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.batch_size=64")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(args.manifest) if args.manifest else synthetic_manifest(Path(tmp) / "manifest", args.n)
        cfg = load_config(args.config, [f"data.manifest={str(manifest)!r}", *args.overrides])
        keys = read_manifest(manifest, columns=["key"], split=cfg.data.split).column("key").to_pylist()
        cache = random_cache(Path(tmp) / "cache", keys, 11, args.dim)
        reader = CacheReader(cache)
        model_cfg = resolve_model_config(cfg.model, reader.dim)
        accelerator = Accelerator(cpu=True, mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision))
        total_steps = (len(args.workers) + 2) * (args.steps + 2)  # every run below, so the schedule never ends
        parts = prepare_step(cfg, accelerator, FlameVisionModel(model_cfg), total_steps)
        parts.model.train()

        def run(batches, n_images: int) -> float:
            it = iter(batches)
            for _ in range(2):
                train_step(parts, next(it))
            t = time.perf_counter()
            for _ in range(args.steps):
                train_step(parts, next(it))
            return args.steps * n_images / (time.perf_counter() - t)

        batch = cfg.train.batch_size
        results = []
        fixed = None
        for workers in args.workers:
            cfg.data.num_workers = workers
            t = time.perf_counter()
            data = build_training_data(cfg.data, reader, train_transform(cfg), model_cfg.img_size, batch, 0, 1,
                                       cfg.train.seed)
            log.info("loader (%s, %d workers) built in %.1fs", data.mode, workers, time.perf_counter() - t)
            if data.steps_per_epoch(0) < args.steps + 2:
                raise SystemExit(f"{data.n_samples} samples give fewer than {args.steps + 2} batches of {batch}")
            if fixed is None:  # in-memory runs bracket the loader runs, so load drift on a shared machine shows
                data.set_epoch(0)
                fixed = next(iter(data.loader))
                before = run(itertools.repeat(fixed), batch)
            data.set_epoch(0)
            results.append((f"real loader ({data.mode}, {workers} workers)", run(data.loader, batch)))
        after = run(itertools.repeat(fixed), batch)
        in_memory = (before + after) / 2

    print(f"\n{cfg.model.name} img {cfg.model.img_size} patch {cfg.model.patch_size} depth {cfg.model.depth}, "
          f"batch {batch}, {cfg.train.mixed_precision}, D={args.dim}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads\n")
    print("| batches from | images/s | vs in-memory |")
    print("|---|---|---|")
    print(f"| in-memory tensors (mean of runs before/after: {before:.1f} / {after:.1f}) | {in_memory:.1f} | 1.00 |")
    for name, rate in results:
        print(f"| {name} | {rate:.1f} | {rate / in_memory:.2f} |")


if __name__ == "__main__":
    main()
