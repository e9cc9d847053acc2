"""Benchmark: reading the ``[F, D]`` vectors of random keys, our cache vs one ``.pth`` file per sample.

SPEC §10 / issue 4. Both layouts hold the same float16 vectors on the same disk, written in this run; reads are
training-style batches of random keys (``--batch`` keys per read, ``--reads`` batches, the same keys for both).
Ours: :meth:`pipeline.cache.store.CacheReader.get` (one batched read of the sorted rows). Baseline (the official
layout): ``torch.load`` of one file per key, then stack. Prints a markdown table and the ratio.

    .venv/bin/python bench/cache_read.py --n 10000 --dim 640 --chunk-rows 1 4 16
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipeline.cache.store import CacheIdentity, CacheLayout, CacheMeta, CacheReader, CacheWriter
from pipeline.machine import cpu_summary

log = logging.getLogger("bench.cache_read")


def write_cache(out: Path, keys: list[str], vectors: np.ndarray, mask: np.ndarray, shard_rows: int, chunk_rows: int) -> None:
    """Write ``vectors [N, F, D]`` as a cache, key ``i`` -> row ``i``."""
    n, f, d = vectors.shape
    identity = CacheIdentity(llm="bench", llm_fingerprint="-", tokenizer="-", layer=0, readout="pre_norm", dim=d,
                             prompt_set="flame", prompt_set_hash="-", facets=tuple(f"f{j}" for j in range(f)))
    layout = CacheLayout(n_rows=n, shard_rows=shard_rows, chunk_rows=chunk_rows, plan_hash="bench")
    writer = CacheWriter.create(out, CacheMeta(identity, layout))
    for s in range(layout.n_shards):
        r = layout.shard_range(s)
        index = pa.table({"key": keys[r.start : r.stop], "row": pa.array(list(r), pa.int64())})
        writer.write_shard(s, vectors[r.start : r.stop], mask[r.start : r.stop], index)


def write_pth(out: Path, keys: list[str], vectors: np.ndarray) -> None:
    """One ``torch.save`` file per sample holding its ``float16 [F, D]`` tensor (the official layout)."""
    out.mkdir(parents=True)
    for k, v in zip(keys, vectors):
        torch.save(torch.from_numpy(v.copy()), out / f"{k}.pth")


def time_reads(fn, batches: list[list[str]]) -> float:
    """Samples per second of ``fn(keys)`` over ``batches`` (after one warm-up batch)."""
    fn(batches[0])
    t = time.perf_counter()
    for keys in batches:
        fn(keys)
    return sum(len(b) for b in batches) / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000, help="samples in the store")
    p.add_argument("--facets", type=int, default=11)
    p.add_argument("--dim", type=int, default=640, help="D (640 = Gemma-3-270M)")
    p.add_argument("--batch", type=int, default=256, help="keys per read")
    p.add_argument("--reads", type=int, default=20, help="batches timed")
    p.add_argument("--shard-rows", type=int, default=4096)
    p.add_argument("--chunk-rows", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(args.n, args.facets, args.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    vectors = vectors.astype(np.float16)
    mask = np.ones((args.n, args.facets), bool)
    keys = [f"sample{i:08d}" for i in range(args.n)]
    batches = [[keys[i] for i in rng.choice(args.n, args.batch, replace=False)] for _ in range(args.reads)]

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        write_pth(root / "pth", keys, vectors)
        log.info("wrote %d .pth files in %.1fs", args.n, time.perf_counter() - t)

        def read_pth(ks: list[str]) -> torch.Tensor:
            return torch.stack([torch.load(root / "pth" / f"{k}.pth") for k in ks])

        baseline = time_reads(read_pth, batches)
        rows = [("one .pth per sample (official)", "-", baseline, 1.0)]
        for chunk_rows in args.chunk_rows:
            out = root / f"cache-c{chunk_rows}"
            t = time.perf_counter()
            write_cache(out, keys, vectors, mask, args.shard_rows, chunk_rows)
            log.info("wrote cache chunk_rows=%d in %.1fs", chunk_rows, time.perf_counter() - t)
            reader = CacheReader(out)
            got, _ = reader.get(batches[0])
            assert np.array_equal(got, read_pth(batches[0]).numpy()), "cache and .pth disagree"
            ours = time_reads(reader.get, batches)
            rows.append((f"flame cache (chunk_rows={chunk_rows})", str(chunk_rows), ours, ours / baseline))

    print(f"\nCPU {cpu_summary()}")
    print(f"N={args.n} F={args.facets} D={args.dim} float16, {args.reads} reads x {args.batch} random keys\n")
    print("| layout | chunk rows | samples/s | vs .pth |")
    print("|---|---|---|---|")
    for name, chunk, rate, ratio in rows:
        print(f"| {name} | {chunk} | {rate:,.0f} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
