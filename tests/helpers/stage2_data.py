"""Tiny stage-2 fixtures built from scratch: a manifest of PNG bytes and a cache of unit vectors (F=11, D=16).

Images of class ``c`` are a solid colour with a little noise; the vectors of a class are a fixed random
projection of it plus per-key noise, so a model can learn the pairing. Helpers, no tests.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from manifests.schema import ManifestWriter
from pipeline.cache.store import CacheIdentity, CacheLayout, CacheMeta, CacheWriter

F, D = 11, 16
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 40)]


def png_bytes(colour: tuple[int, int, int], seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None, :] + rng.integers(-20, 21, (size, size, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def key(i: int) -> str:
    return f"k{i:03d}"


def make_manifest(out: Path, n: int = 24, n_test: int = 4, bad: tuple[int, ...] = (), rows_per_part: int = 1000) -> Path:
    """Keys ``k000..``; the last ``n_test`` are split "test"; indices in ``bad`` get undecodable bytes."""
    writer = ManifestWriter(out, {"name": "stage2-test", "args": {}}, rows_per_part=rows_per_part)
    for i in range(n):
        data = b"not a png" if i in bad else png_bytes(COLOURS[i % len(COLOURS)], i)
        writer.add({"key": key(i), "image_bytes": data, "split": "test" if i >= n - n_test else "train"})
    writer.close()
    return out


def make_cache(out: Path, keys: list[str], classes: list[int] | None = None, dim: int = D, seed: int = 0,
               absent: dict[int, list[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cache with one row per key (row = position). Vectors: class direction + noise (random if no classes).
    ``absent`` maps a row to facets marked absent. Returns the float32 vectors ``[N, F, D]`` and mask."""
    rng = np.random.default_rng(seed)
    n = len(keys)
    if classes is None:
        vec = rng.normal(size=(n, F, dim))
    else:
        centres = rng.normal(size=(max(classes) + 1, dim))
        vec = centres[classes][:, None, :] + 0.3 * rng.normal(size=(n, F, dim))
    vec /= np.linalg.norm(vec, axis=-1, keepdims=True)
    mask = np.ones((n, F), bool)
    for r, facets in (absent or {}).items():
        mask[r, facets] = False
        vec[r, facets] = 0
    identity = CacheIdentity(llm="test-llm", llm_fingerprint="f0", tokenizer="t", layer=3, readout="pre_norm",
                             dim=dim, prompt_set="flame", prompt_set_hash="h0",
                             facets=tuple(f"facet{j}" for j in range(F)))
    layout = CacheLayout(n_rows=n, shard_rows=16, chunk_rows=4, plan_hash="p")
    writer = CacheWriter.create(out, CacheMeta(identity, layout))
    for s in range(layout.n_shards):
        r = layout.shard_range(s)
        index = pa.table({"key": keys[r.start:r.stop], "row": pa.array(list(r), pa.int64())})
        writer.write_shard(s, vec[r.start:r.stop], mask[r.start:r.stop], index)
    return vec.astype(np.float16).astype(np.float32), mask


def tiny_overrides(manifest: Path, cache: Path, out: Path, **extra: object) -> list[str]:
    """Overrides for a ViT of depth 1, width 32, 32 px, patch 8, on the fixtures (deterministic, 1 thread)."""
    base = {
        "model.name": "vit_tiny_patch16_224", "model.img_size": 32, "model.patch_size": 8, "model.depth": 1,
        "model.width": 32, "model.num_heads": 2, "model.proj_hidden": 64,
        "data.manifest": str(manifest), "data.cache": str(cache), "data.positives": 3,
        "train.output_dir": str(out), "train.batch_size": 8, "train.epochs": 2, "train.threads": 1,
        "optim.lr": 1e-3, "optim.warmup_steps": 2, "optim.weight_decay": 0.1,
    }
    base.update(extra)
    return [f"{k}={_toml(v)}" for k, v in base.items()]


def _toml(v: object) -> str:
    """A TOML literal for an override: strings quoted unless they already are a TOML table/array."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return v if v[:1] in "{[" else f'"{v}"'
    return str(v)
