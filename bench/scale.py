"""Benchmark: peak memory and time of every pipeline stage at data-set scale (SPEC §11, issue 10).

Builds synthetic data of ``--samples`` N samples with FLAME-like captions, runs each stage in a subprocess of
its own, records that process's peak RSS and wall seconds, and writes one JSON file::

    {"samples": N, "cpu": "<lscpu model name>",
     "stages": {"manifest": {"peak_rss_mib": x, "seconds": y, ...}, "plan": {...}, "embed": {...},
                "cache_open": {...}, "first_batch": {...}, "lookup": {...}},
     "baseline": {"rev": REV, "samples": N, "cpu": ..., "stages": {...}}}    # with --baseline-rev only

Stages (``--stages``, any subset, always run in this order):

===============  ==========================================================================================
``manifest``     ``flame manifest webdataset`` on real tar shards (8x8 PNG/JPEG + ``.txt``, 10,000 samples
                 per shard) and FLAME recaption JSON files of the first ``--image-subset`` samples; also
                 reported per shard, since decoding and tar reading stream shard by shard
``plan``         ``stage1_embed_text.plan.plan_job`` (``job.plan_job`` or ``load_plan`` in older code)
``embed``        ``stage1_embed_text.job.run_embed`` with :class:`DigestStandInEncoder` in place of the LLM,
                 so that planning, copying and writing are measured at full N (the encoder's speed is
                 ``bench/stage1_throughput.py``'s business); reuses the plan the ``plan`` stage stored
``cache_open``   ``pipeline.cache.store.CacheReader(cache)``
``first_batch``  open the reader, ``build_training_data(mode="stream")``, first batch (256 images, 32 px)
``lookup``       open the reader, then 50 reads of 3,072 random keys (``reader.rows`` + ``reader.read_rows``)
===============  ==========================================================================================

Every stage but ``manifest`` reads a canonical manifest of all N samples, written directly as Parquet parts;
its rows reference 256 real images in four small tar files (only ``first_batch`` decodes images). The
synthetic manifest and the tar shards stay in ``--workdir`` and a later run of the same size reuses them.

Peak RSS: a Python stage reads ``VmHWM`` from ``/proc/self/status`` at its end (or the ``ru_maxrss`` of the
largest child process it waited for, if larger); the ``manifest`` stage is a fresh wrapper process that
reports ``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the largest process of the CLI's whole process tree.
``seconds`` leaves out interpreter start-up and imports (``imports_s``), except for the CLI.

``--baseline-rev REV`` runs the same stage subprocesses on a ``git worktree`` of REV in ``/tmp`` (same
synthetic manifest, its own cache) and prints ours, the baseline and their ratio. A baseline stage that
fails, or that its process tree takes over ``--baseline-max-rss-gib`` or ``--baseline-timeout`` seconds, is
killed and marked ``{"skipped": reason}``.

    .venv/bin/python bench/scale.py --samples 1000000 --json runs/scale-1m.json --baseline-rev 46db39e
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.machine import cpu_summary

REPO = Path(__file__).resolve().parents[1]
STAGES = ("manifest", "plan", "embed", "cache_open", "first_batch", "lookup")
MANIFEST_READERS = STAGES[1:]  # stages that read the full-N synthetic manifest
CACHE_READERS = STAGES[3:]  # stages that read the cache the embed stage writes
GENERATOR_VERSION = 1  # bump when the synthetic data changes: a workdir of another version is rebuilt

SHARD_SAMPLES = 10_000  # samples per webdataset tar shard; keys are f"{shard:05d}{index in shard:04d}"
ROWS_PER_PART = 50_000  # rows per Parquet part of the synthetic manifest (ManifestWriter's default)
CAPTION_FIELD = "minicpm"  # the caption field of the FLAME recaption JSON files
SHARD_ROWS = 4096  # stage-1 cache rows per shard

# Duplication of the synthetic data, in percent of the samples (exact; see ``sample_kinds``).
SET_DUPLICATE_PCT = 2  # repeat an earlier sample's whole caption set (same cache row)
RAW_DUPLICATE_PCT = 5  # repeat an earlier sample's raw caption only (own row; the raw text embedded once)
NO_LONG_PCT = 3  # no long recaption
MAX_DUPLICATE_DISTANCE = 500_000  # how far back (in samples) a duplicate's original may lie

POOL_TARS, IMAGES_PER_POOL_TAR = 4, 64  # tar files holding the images the full-N manifest points at
IMAGE_SIDE = 8  # pixels

RSS_POLL_S = 0.25  # how often the parent samples a stage's process-tree RSS
KILL_WAIT_S = 30.0  # how long the parent waits for a killed stage to end

# ---------------------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------------------

_ADJECTIVES = ("red", "weathered", "small", "bright yellow", "old wooden", "shiny", "striped", "tall",
               "pale blue", "rusty", "green", "tiny", "colorful", "dark", "white", "vintage")
_NOUNS = ("bicycle", "sailboat", "teapot", "dog", "armchair", "lighthouse", "umbrella", "guitar", "tram",
          "cat", "kite", "bookshelf", "lantern", "horse", "pickup truck", "clock tower")
_SETTINGS = ("on a rainy city street", "beside a quiet lake", "in a crowded market", "under a cloudy sky",
             "on a kitchen table", "at the edge of a forest", "in an empty parking lot",
             "near a stone bridge", "on a sandy beach", "in a snowy courtyard", "against a brick wall",
             "inside a bright studio", "along a country road", "on a wooden pier", "in a sunlit garden",
             "at a busy train station")
_LEADS = ("photo of a ", "close-up of a ", "picture of a ", "view of a ", "snapshot of a ",
          "stock image of a ", "a ", "old photo of a ")
_DETAILS = ("The main object sits slightly left of the center of the frame.",
            "It is photographed from a low angle, close to the ground.",
            "A few people pass by in the background, out of focus.",
            "The picture is taken late in the afternoon in warm light.",
            "Part of the object is cut off by the right edge of the image.",
            "Reflections of the surroundings are visible on its surface.",
            "The shot is framed tightly, leaving little empty space.",
            "Some leaves and small stones are scattered around it.")
_MOODS = ("The light is soft and the colors are muted.", "The scene feels calm and a little nostalgic.",
          "Strong contrast gives the picture a dramatic look.", "Everything looks clean, fresh and cheerful.",
          "The atmosphere is busy but friendly.", "A thin haze makes the distance look pale.",
          "The colors are saturated and vivid.", "It looks like an ordinary, quiet day.")
_LONG_TEMPLATES = (
    "In the foreground a {x} stands out clearly, its outline sharp against the softer background behind it. ",
    "The {x} shows small signs of wear, with scratches and faded patches that suggest years of daily use. ",
    "Behind the {x} the background is slightly blurred, which draws the eye toward the middle of the frame. ",
    "Light falls on the {x} from the left side, casting a long shadow that stretches across the ground. ",
    "A second, smaller object rests near the {x}, partly hidden and easy to overlook at first glance. ",
    "The colors around the {x} are muted greens and browns, giving the whole scene a calm, natural feeling. ",
    "Nobody is interacting with the {x} at the moment, and the setting feels quiet, still and unhurried. ",
    "Fine details such as the texture of the {x} and the grain of the surface beneath it are easy to see. ",
)
_WORDS = {
    "subject": pa.array([f"{a} {n}" for a in _ADJECTIVES for n in _NOUNS]),
    "setting": pa.array(_SETTINGS),
    "lead": pa.array(_LEADS),
    "detail": pa.array(_DETAILS),
    "mood": pa.array(_MOODS),
    "sentence": pa.array([t.format(x=n) for t in _LONG_TEMPLATES for n in _NOUNS]),
    "maybe_sentence": pa.array([t.format(x=n) for t in _LONG_TEMPLATES for n in _NOUNS] + [""] * 128),
}
LONG_SENTENCES = 7  # a long caption: 7 sentences, then an eighth one half of the time (~800 characters)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 mixing function, elementwise: ``uint64 [...]`` -> ``uint64 [...]`` (wraps mod 2**64)."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_kinds(index: np.ndarray) -> dict[str, np.ndarray]:
    """How the samples ``index`` (``int64 [n]``) are made.

    Each sample has a *slot* ``(37 i + 50) mod 100``; every 100 consecutive samples hold each slot once, so
    the percentages are exact for any N that is a multiple of 100. Slots ``0-1`` repeat an earlier sample's
    caption set, ``2-6`` an earlier sample's raw caption, ``7-9`` have no long caption. The original lies
    ``100 k + 3`` samples back (``k`` hashed from ``i``, up to :data:`MAX_DUPLICATE_DISTANCE`), in slot
    ``slot - 11 mod 100``: always a plain sample (samples 0-2 are plain too, having slots 50, 87, 24).

    Returns:
        ``set_duplicate``, ``raw_duplicate``, ``no_long``: ``bool [n]``, mutually exclusive;
        ``raw_id``, ``short_id``, ``long_id``: ``int64 [n]``, the sample whose caption of that kind this
        sample carries (``-1``: no long caption). A caption is a function of its kind and id and spells out
        the id, so two captions are equal exactly when their kinds and ids are.
    """
    slot = (37 * index + 50) % 100
    set_dup = slot < SET_DUPLICATE_PCT
    raw_dup = (slot >= SET_DUPLICATE_PCT) & (slot < SET_DUPLICATE_PCT + RAW_DUPLICATE_PCT)
    no_long = (slot >= SET_DUPLICATE_PCT + RAW_DUPLICATE_PCT) & (
        slot < SET_DUPLICATE_PCT + RAW_DUPLICATE_PCT + NO_LONG_PCT)
    k = (splitmix64(index) % np.uint64(MAX_DUPLICATE_DISTANCE // 100)).astype(np.int64)
    original = index - 100 * np.minimum(k, np.maximum(index - 3, 0) // 100) - 3
    own = index.astype(np.int64)
    return {
        "set_duplicate": set_dup, "raw_duplicate": raw_dup, "no_long": no_long,
        "raw_id": np.where(set_dup | raw_dup, original, own),
        "short_id": np.where(set_dup, original, own),
        "long_id": np.where(set_dup, original, np.where(no_long, -1, own)),
    }


def expected_counts(n: int) -> dict[str, int]:
    """What a correct stage 1 makes of samples ``0..n-1``: ``keys`` (every sample has captions), ``rows``
    (distinct caption sets), ``unique_texts`` (distinct (kind, caption) pairs) and the count of each kind."""
    counts = dict.fromkeys(("set_duplicate", "raw_duplicate", "no_long"), 0)
    for start in range(0, n, ROWS_PER_PART):
        kinds = sample_kinds(np.arange(start, min(n, start + ROWS_PER_PART), dtype=np.int64))
        for name in counts:
            counts[name] += int(kinds[name].sum())
    rows = n - counts["set_duplicate"]
    unique_texts = 3 * rows - counts["raw_duplicate"] - counts["no_long"]
    return {"keys": n, "rows": rows, "unique_texts": unique_texts, **counts}


def sample_keys(index: np.ndarray) -> pa.Array:
    """The keys ``f"{shard:05d}{index in shard:04d}"`` of the samples ``index``, as ``string [n]``."""
    shard = pc.utf8_lpad(pc.cast(pa.array(index // SHARD_SAMPLES), pa.string()), 5, "0")
    within = pc.utf8_lpad(pc.cast(pa.array(index % SHARD_SAMPLES), pa.string()), 4, "0")
    return pc.binary_join_element_wise(shard, within, "")


def key_of(i: int) -> str:
    """The key of sample ``i`` (:func:`sample_keys` of one sample)."""
    return f"{i // SHARD_SAMPLES:05d}{i % SHARD_SAMPLES:04d}"


def _pick(words: str, bits: np.ndarray, field: int) -> pa.Array:
    """``_WORDS[words][byte field of bits mod len]``: one choice per entry of ``bits`` (``uint64 [n]``)."""
    choices = _WORDS[words]
    return choices.take(((bits >> np.uint64(8 * field)) % np.uint64(len(choices))).astype(np.int64))


def caption_texts(kind: str, ids: np.ndarray) -> pa.Array:
    """Captions of ``kind`` (``"raw"`` ~60, ``"short"`` ~150, ``"long"`` ~800 characters) for the caption ids
    ``ids`` (``int64 [n]``, >= 0), as ``string [n]``: words hashed from ``(kind, id)``, the id spelled out."""
    bits = splitmix64(ids.astype(np.uint64) * np.uint64(4) + np.uint64(("raw", "short", "long").index(kind)))
    number = pc.cast(pa.array(ids), pa.string())
    if kind == "raw":
        parts = [_pick("lead", bits, 2), _pick("subject", bits, 0), " ", _pick("setting", bits, 1), ", no. ",
                 number]
    elif kind == "short":
        parts = ["A ", _pick("subject", bits, 0), " ", _pick("setting", bits, 1), ". ",
                 _pick("detail", bits, 2), " ", _pick("mood", bits, 3), " Image ", number, "."]
    else:
        parts = [_pick("sentence", bits, s) for s in range(LONG_SENTENCES)]
        parts += [_pick("maybe_sentence", splitmix64(bits), 0), "Reference ", number, "."]
    return pc.binary_join_element_wise(*parts, "")


def synthetic_captions(start: int, stop: int) -> pa.Table:
    """Samples ``start..stop-1``: ``key``, ``raw_caption``, ``short_caption``, ``long_caption`` (null where
    absent), all ``string``."""
    index = np.arange(start, stop, dtype=np.int64)
    kinds = sample_kinds(index)
    has_long = kinds["long_id"] >= 0
    long = caption_texts("long", np.where(has_long, kinds["long_id"], 0))
    return pa.table({
        "key": sample_keys(index),
        "raw_caption": caption_texts("raw", kinds["raw_id"]),
        "short_caption": caption_texts("short", kinds["short_id"]),
        "long_caption": pc.if_else(pa.array(has_long), long, pa.scalar(None, pa.string())),
    })


def tiny_images(n: int) -> list[tuple[str, bytes]]:
    """``n`` distinct 8x8 RGB images as ``(extension, encoded bytes)``, PNG and JPEG alternating."""
    from PIL import Image

    out = []
    for i in range(n):
        color = np.array([37 * i, 91 * i + 60, 151 * i + 120])
        rows = 16 * np.arange(IMAGE_SIDE)[:, None, None]
        pixels = ((color + rows + np.zeros((1, IMAGE_SIDE, 1), int)) % 256).astype(np.uint8)
        ext, fmt = ("png", "PNG") if i % 2 == 0 else ("jpg", "JPEG")
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, format=fmt)
        out.append((ext, buf.getvalue()))
    return out


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def write_image_pool(pool_dir: Path) -> list[tuple[str, str]]:
    """Write the images the full-N manifest points at; returns ``(absolute tar path, member)`` per image."""
    pool_dir.mkdir(parents=True, exist_ok=True)
    images = tiny_images(POOL_TARS * IMAGES_PER_POOL_TAR)
    refs = []
    for t in range(POOL_TARS):
        path = (pool_dir / f"pool-{t:02d}.tar").resolve()
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for j in range(IMAGES_PER_POOL_TAR):
                ext, data = images[t * IMAGES_PER_POOL_TAR + j]
                _add_member(tar, f"{j:03d}.{ext}", data)
                refs.append((str(path), f"{j:03d}.{ext}"))
    return refs


def write_synthetic_manifest(out: Path, n: int) -> None:
    """The canonical manifest (:mod:`manifests.schema`) of samples ``0..n-1``, written part by part.

    The files :class:`manifests.schema.ManifestWriter` writes (``data/part-NNNNN.parquet`` of
    :func:`manifests.schema.stored_schema`, zstd, ``manifest.json`` last), without a Python object per row. Row
    ``i`` references image ``i mod 256`` of the image pool in ``out/images``.
    """
    from manifests.schema import DATA_DIR, MANIFEST_JSON, SCHEMA, ManifestInfo, to_stored
    from pipeline.atomic import atomic_write_bytes

    shutil.rmtree(out, ignore_errors=True)
    (out / DATA_DIR).mkdir(parents=True)
    refs = write_image_pool(out / "images")
    ref_paths, ref_members = pa.array([r[0] for r in refs]), pa.array([r[1] for r in refs])
    source = {"name": "bench-scale", "args": {"samples": n, "generator": GENERATOR_VERSION}}
    info = ManifestInfo(source=source)
    for start in range(0, n, ROWS_PER_PART):
        captions = synthetic_captions(start, min(n, start + ROWS_PER_PART))
        rows = captions.num_rows
        image = np.arange(start, start + rows) % len(refs)
        columns = {
            **{name: captions[name] for name in captions.column_names},
            "image_path": ref_paths.take(image), "image_member": ref_members.take(image),
            "split": pa.array(["train"] * rows), "lang": pa.array(["en"] * rows),
        }
        arrays = [columns[f.name] if f.name in columns else pa.nulls(rows, f.type) for f in SCHEMA]
        name = f"{DATA_DIR}/part-{len(info.parts):05d}.parquet"
        pq.write_table(to_stored(pa.Table.from_arrays(arrays, schema=SCHEMA), image_feature=False), out / name,
                       compression="zstd")
        info.parts.append(name)
    info.counts = {"train": n, "total": n}
    atomic_write_bytes(out / MANIFEST_JSON, info.to_json().encode("utf-8"))


def write_webdataset(out: Path, n: int) -> None:
    """img2dataset-style shards ``out/shards/SSSSS.tar`` (``{key}.png|jpg`` + ``{key}.txt``, 10,000 samples
    each) and FLAME recaption files ``recap_long.json``, ``recap_short.json`` (``[{"__key__": ..., "minicpm":
    ...}, ...]``; no entry for a sample without a long caption) of samples ``0..n-1``."""
    shutil.rmtree(out, ignore_errors=True)
    (out / "shards").mkdir(parents=True)
    images = tiny_images(POOL_TARS * IMAGES_PER_POOL_TAR)
    recaptions = {"long_caption": out / "recap_long.json", "short_caption": out / "recap_short.json"}
    files = {column: open(path, "w", encoding="utf-8") for column, path in recaptions.items()}
    try:
        for shard, start in enumerate(range(0, n, SHARD_SAMPLES)):
            cols = synthetic_captions(start, min(n, start + SHARD_SAMPLES)).to_pydict()
            with tarfile.open(out / "shards" / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
                for i, (key, raw) in enumerate(zip(cols["key"], cols["raw_caption"]), start):
                    ext, data = images[i % len(images)]
                    _add_member(tar, f"{key}.{ext}", data)
                    _add_member(tar, f"{key}.txt", raw.encode("utf-8"))
            for column, f in files.items():
                entries = [{"__key__": k, CAPTION_FIELD: c} for k, c in zip(cols["key"], cols[column]) if c]
                f.write(("[\n" if shard == 0 else ",\n") + json.dumps(entries, ensure_ascii=False)[1:-1])
        for f in files.values():
            f.write("\n]\n" if n else "[]\n")
    finally:
        for f in files.values():
            f.close()


def ensure(path: Path, params: dict[str, Any], build: Callable[[], None]) -> bool:
    """Run ``build`` unless ``path/.bench-scale.json`` holds the same ``params``; True if it built."""
    stamp = path / ".bench-scale.json"
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return False
    build()
    stamp.write_text(json.dumps(params))
    return True


# ---------------------------------------------------------------------------------------------------------
# The stand-in encoder
# ---------------------------------------------------------------------------------------------------------


def digest_vectors(seeds: np.ndarray, facets: np.ndarray, dim: int) -> np.ndarray:
    """Unit vectors ``float32 [n, len(facets), dim]``, N(0, I) directions by counter-based hashing: entry
    ``[t, f, d]`` depends on ``seeds[t]`` (``uint64 [n]``), ``facets[f]`` (ints) and ``d`` only."""
    counter = facets.astype(np.uint64)[:, None] * np.uint64(dim) + np.arange(dim, dtype=np.uint64)
    bits = splitmix64(seeds[:, None, None] ^ (counter * np.uint64(0xD1B54A32D192ED03))[None])
    u1 = ((bits >> np.uint64(32)).astype(np.float64) + 0.5) / 2.0**32
    u2 = ((bits & np.uint64(0xFFFFFFFF)).astype(np.float64) + 0.5) / 2.0**32
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)  # Box-Muller
    return (z / np.linalg.norm(z, axis=-1, keepdims=True)).astype(np.float32)


class DigestStandInEncoder:
    """Stands in for the LLM in ``stage1_embed_text.job.run_embed``: no model; a text's facet vectors come
    from its SHA-1 digest (:func:`digest_vectors`), so the job's planning, copying and writing can be
    measured at 15M samples on a CPU. The vectors are unit-norm and deterministic, and mean nothing.

    Args:
        dim: D, the vector size.

    Attributes:
        prompt_set: the FLAME prompt set; facets: its 11 facet names; dim: D.
    """

    def __init__(self, dim: int):
        from stage1_embed_text.encode.prompts import get_prompt_set

        self.prompt_set = get_prompt_set("flame")
        self.facets: tuple[str, ...] = self.prompt_set.facets
        self.dim = int(dim)

    def identity(self):
        """The :class:`pipeline.cache.store.CacheIdentity` of these vectors (``llm="digest-stand-in"``)."""
        from stage1_embed_text.encode.encoded import text_identity

        return text_identity(
            name="digest-stand-in", fingerprint="sha1-of-text", layer=0, readout="pre_norm", dim=self.dim,
            prompt_set=self.prompt_set, position_mode="restart", context_tokens=512, dtype="float32",
            backend="digest-stand-in",
        )

    def encode(self, samples: Sequence[Mapping[str, str | None]],
               progress: Callable[[int, int], None] | None = None):
        """The ``stage1_embed_text.encode.encoded.EncodedSamples`` of ``samples`` (``{"raw"|"short"|"long": text}``; a
        missing, ``None`` or blank text is absent).

        Returns vectors ``float32 [n, 11, D]``, mask ``bool [n, 11]``, tokens ``int32 [n, 3]`` (a stand-in
        count, ``len(utf-8 bytes) // 4 + 20``; 0 if absent) and truncated ``bool [n, 3]`` (all False); calls
        ``progress(texts, tokens)`` once, at the end.
        """
        from stage1_embed_text.encode.encoded import EncodedSamples
        from stage1_embed_text.encode.prompts import GROUPS

        n, f = len(samples), len(self.facets)
        out = EncodedSamples(
            vectors=np.zeros((n, f, self.dim), np.float32), mask=np.zeros((n, f), bool),
            tokens=np.zeros((n, len(GROUPS)), np.int32), truncated=np.zeros((n, len(GROUPS)), bool),
        )
        n_texts = 0
        for col, group in enumerate(GROUPS):
            if group not in self.prompt_set.group_names:
                continue
            rows = [j for j, s in enumerate(samples) if (s.get(group) or "").strip()]
            texts = [samples[j][group].encode("utf-8") for j in rows]
            seeds = np.frombuffer(b"".join(hashlib.sha1(t).digest()[:8] for t in texts), dtype="<u8")
            fs = self.prompt_set.facet_slice(group)
            out.vectors[rows, fs] = digest_vectors(seeds, np.arange(fs.start, fs.stop), self.dim)
            out.mask[rows, fs] = True
            out.tokens[rows, col] = [len(t) // 4 + 20 for t in texts]
            n_texts += len(rows)
        if progress is not None:
            progress(n_texts, int(out.tokens.sum()))
        return out


# ---------------------------------------------------------------------------------------------------------
# Stages: each runs in a process of its own (``scale.py --_stage NAME``) and returns its measurements
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where one side (``role``: ``"ours"`` or ``"baseline"``) reads and writes in the work directory."""

    workdir: Path
    role: str

    @property
    def manifest(self) -> Path:
        """The full-N synthetic manifest (both sides)."""
        return self.workdir / "manifest"

    @property
    def webdataset(self) -> Path:
        """Tar shards and recaption files of the image subset (both sides)."""
        return self.workdir / "webdataset"

    @property
    def side(self) -> Path:
        return self.workdir / self.role

    @property
    def cache(self) -> Path:
        return self.side / "cache"

    @property
    def webdataset_manifest(self) -> Path:
        return self.side / "webdataset-manifest"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"


def _status_kib(field: str) -> int:
    """A ``VmXXX`` field of ``/proc/self/status`` in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_rss_mib() -> float:
    """Peak RSS (MiB) of this process (``VmHWM``) or of the largest child process it waited for."""
    children_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    return round(max(_status_kib("VmHWM"), children_kib) / 1024, 1)


def disk_mib(path: Path) -> float:
    """Disk space (allocated blocks) of the files under ``path``, in MiB."""
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.lstat(os.path.join(root, name)).st_blocks * 512 for name in files)
    return round(total / 2**20, 1)


class Clock:
    """Seconds since creation, and the imports a stage made before it (``imports_s``, ``imports_rss_mib``)."""

    def __init__(self, imports_started: float):
        self.start = time.perf_counter()
        self.imports = {"imports_s": round(self.start - imports_started, 2),
                        "imports_rss_mib": round(_status_kib("VmRSS") / 1024, 1)}

    def __call__(self) -> float:
        return time.perf_counter() - self.start

    def result(self, seconds: float, **extra: Any) -> dict[str, Any]:
        return {"seconds": round(seconds, 3), "peak_rss_mib": peak_rss_mib(), **self.imports, **extra}


def embed_config(paths: Paths):
    """The stage-1 job of the ``plan`` and ``embed`` stages: the synthetic manifest into the side's cache."""
    from stage1_embed_text.job import EmbedConfig

    return EmbedConfig(manifest=str(paths.manifest), out=str(paths.cache), llm="digest-stand-in",
                       readout="pre_norm", progress=False, shard_rows=SHARD_ROWS)


def stage_manifest(paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    """``flame manifest webdataset`` on the image subset's shards, timed as one child process tree."""
    out = paths.webdataset_manifest
    shutil.rmtree(out, ignore_errors=True)
    n_shards = math.ceil(args.image_subset / SHARD_SAMPLES)
    flame = str(Path(sys.executable).with_name("flame"))
    cmd = [flame, "manifest", "webdataset", str(paths.webdataset / "shards"),
           "--long-captions", str(paths.webdataset / "recap_long.json"),
           "--short-captions", str(paths.webdataset / "recap_short.json"),
           "--caption-field", CAPTION_FIELD, "--out", str(out)]
    if args._manifest_workers:
        cmd += ["--workers", str(args._manifest_workers)]
    t0 = time.perf_counter()
    with open(paths.logs / f"{paths.role}-manifest-cli.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    return {
        "seconds": round(seconds, 2), "peak_rss_mib": peak_rss_mib(), "samples": args.image_subset,
        "rows": counts.get("total"), "shards": n_shards, "seconds_per_shard": round(seconds / n_shards, 3),
        "workers": args._manifest_workers or 1, "manifest_mib": disk_mib(out),
    }


def stage_plan(paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    """``plan_job`` (plans and stores the plan in the cache), or ``load_plan`` in code without it."""
    t = time.perf_counter()
    from stage1_embed_text import job
    from stage1_embed_text.encode.prompts import get_prompt_set

    try:
        from stage1_embed_text.plan import plan_job
    except ImportError:  # older layouts: job.plan_job, or only job.load_plan
        plan_job = getattr(job, "plan_job", None)
    config = embed_config(paths)
    clock = Clock(t)
    if plan_job is not None:
        entry, plan = "plan_job", plan_job(config)
    else:
        entry, plan = "load_plan", job.load_plan(config, get_prompt_set("flame"))
    seconds = clock()
    counts = {name: int(getattr(plan, name)) for name in ("n_rows", "n_unique_texts") if hasattr(plan, name)}
    return clock.result(seconds, entry=entry, **counts)


def stage_embed(paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    """``run_embed`` with :class:`DigestStandInEncoder` as its encoder (patched in for ``job.build_encoder`` in
    older code, whose ``run_embed`` takes no encoder)."""
    t = time.perf_counter()
    import inspect

    from stage1_embed_text import job

    stand_in = DigestStandInEncoder(args.dim)
    takes_encoder = "encoder" in inspect.signature(job.run_embed).parameters
    if not takes_encoder:
        job.build_encoder = lambda config, device: stand_in
    config = embed_config(paths)
    clock = Clock(t)
    summary = (job.run_embed(config, encoder=stand_in) if takes_encoder else job.run_embed(config)).to_dict()
    seconds = clock()
    counts = {k: summary[k] for k in ("keys", "rows", "unique_texts", "shards") if k in summary}
    return clock.result(seconds, **counts, samples_per_s=round(args.samples / seconds, 1), dim=args.dim,
                        cache_mib=disk_mib(paths.cache))


def stage_cache_open(paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    """``CacheReader(cache)``."""
    t = time.perf_counter()
    from pipeline.cache.store import CacheReader

    clock = Clock(t)
    reader = CacheReader(paths.cache)
    return clock.result(clock(), keys=len(reader), rows=reader.meta.layout.n_rows, dim=reader.dim)


def stage_first_batch(paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    """Open the reader, build the streaming training data, take the first batch (256 images at 32 px)."""
    t = time.perf_counter()
    from pipeline.cache.store import CacheReader
    from stage2_train_vision.config import DataConfig
    from stage2_train_vision.data.pairs import build_training_data
    from stage2_train_vision.data.transforms import train_transform

    clock = Clock(t)
    reader = CacheReader(paths.cache)
    opened = clock()
    cfg = DataConfig(manifest=str(paths.manifest), cache=str(paths.cache), mode="stream")
    data = build_training_data(cfg, reader, train_transform({"size": 32}), size=32, batch_size=256,
                               rank=0, world=1, seed=0)
    data.set_epoch(0)
    built = clock()
    batch = next(iter(data.loader))
    seconds = clock()
    return clock.result(seconds, open_s=round(opened, 3), build_s=round(built - opened, 3),
                        batch_s=round(seconds - built, 3), images=list(batch["images"].shape))


def stage_lookup(paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    """Open the reader, then ``--reads`` reads of ``--keys-per-read`` distinct random keys each."""
    t = time.perf_counter()
    from pipeline.cache.store import CacheReader

    rng = np.random.default_rng(0)
    per_read = min(args.keys_per_read, args.samples)
    reads = [[key_of(int(i)) for i in rng.choice(args.samples, per_read, replace=False)]
             for _ in range(args.reads)]
    clock = Clock(t)
    reader = CacheReader(paths.cache)
    opened = clock()
    times_ms = []
    for keys in reads:
        t = time.perf_counter()
        reader.read_rows(reader.rows(keys))
        times_ms.append((time.perf_counter() - t) * 1000)
    return clock.result(clock(), open_s=round(opened, 3), reads=args.reads, keys_per_read=per_read,
                        median_ms=round(statistics.median(times_ms), 2), first_ms=round(times_ms[0], 2),
                        max_ms=round(max(times_ms), 2))


STAGE_FUNCTIONS: dict[str, Callable[[Paths, argparse.Namespace], dict[str, Any]]] = {
    "manifest": stage_manifest, "plan": stage_plan, "embed": stage_embed, "cache_open": stage_cache_open,
    "first_batch": stage_first_batch, "lookup": stage_lookup,
}


def run_stage_here(args: argparse.Namespace) -> None:
    """A stage process: run stage ``args._stage`` and write its result as JSON to ``args._result``."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = STAGE_FUNCTIONS[args._stage](Paths(Path(args.workdir), args._role), args)
    import pipeline

    result["code"] = str(Path(pipeline.__file__).resolve().parents[1])  # the checkout whose code ran
    Path(args._result).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------
# The parent process: data, one subprocess per stage, report
# ---------------------------------------------------------------------------------------------------------


def tree_rss_bytes(pid: int) -> int:
    """RSS of process ``pid`` and all its descendants, summed (0 once it has ended)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text().splitlines()
            total += 1024 * int(next(line.split()[1] for line in status if line.startswith("VmRSS:")))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):  # ended meanwhile, or a zombie without VmRSS
            continue
    return total


def run_stage(stage: str, paths: Paths, args: argparse.Namespace, code: Path, env: dict[str, str],
              manifest_workers: int, max_rss_gib: float | None, timeout_s: float | None) -> dict[str, Any]:
    """Run one stage of the code in ``code`` in a subprocess (its own session), watching its process tree.

    Returns the stage's measurements plus ``sampled_tree_rss_mib`` (the parent's samples of the summed RSS of
    the stage's processes), or ``{"skipped": reason, "seconds": ..., "peak_rss_mib": <sampled>}`` when it
    failed or was killed for a summed RSS over ``max_rss_gib`` or a wall time over ``timeout_s``.
    """
    result_path = paths.side / f"{stage}.result.json"
    result_path.unlink(missing_ok=True)
    log_path = paths.logs / f"{paths.role}-{stage}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_stage", stage, "--_role", paths.role,
           "--_result", str(result_path), "--_manifest-workers", str(manifest_workers),
           "--samples", str(args.samples), "--workdir", str(paths.workdir), "--dim", str(args.dim),
           "--image-subset", str(args.image_subset), "--reads", str(args.reads),
           "--keys-per-read", str(args.keys_per_read)]
    t0, peak, killed = time.perf_counter(), 0, None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        while proc.poll() is None:
            peak = max(peak, tree_rss_bytes(proc.pid))
            if max_rss_gib is not None and peak > max_rss_gib * 2**30:
                killed = f"RSS over {max_rss_gib:g} GiB"
            elif timeout_s is not None and time.perf_counter() - t0 > timeout_s:
                killed = f"over {timeout_s:g} s"
            if killed:
                os.killpg(proc.pid, signal.SIGKILL)  # the stage's own process group (start_new_session)
                proc.wait(timeout=KILL_WAIT_S)
                break
            time.sleep(RSS_POLL_S)
    seconds, sampled = round(time.perf_counter() - t0, 2), round(peak / 2**20, 1)
    if killed:
        return {"skipped": f"killed: {killed}", "seconds": seconds, "peak_rss_mib": sampled}
    if proc.returncode != 0 or not result_path.exists():
        last = (log_path.read_text(errors="replace").strip().splitlines() or ["(no output)"])[-1]
        return {"skipped": f"failed (exit {proc.returncode}): {last[:300]} (log: {log_path})",
                "seconds": seconds, "peak_rss_mib": sampled}
    result = json.loads(result_path.read_text())
    ran = Path(result.pop("code"))
    if ran != code.resolve():
        raise RuntimeError(f"the {paths.role} {stage} stage ran the code in {ran}, not {code}")
    return {**result, "sampled_tree_rss_mib": sampled}


def cli_has_workers(code: Path, env: dict[str, str]) -> bool:
    """Whether ``flame manifest`` of the code in ``code`` takes ``--workers``."""
    flame = str(Path(sys.executable).with_name("flame"))
    usage = subprocess.run([flame, "manifest", "--help"], cwd=code, env=env, capture_output=True, text=True,
                           check=True).stdout
    return "--workers" in usage


def run_side(role: str, code: Path, stages: list[str], args: argparse.Namespace,
             max_rss_gib: float | None = None, timeout_s: float | None = None) -> dict[str, dict[str, Any]]:
    """Run ``stages`` on the code in ``code`` (our checkout or the baseline's) in order: ``{stage: result}``.

    The first of ``plan``/``embed`` starts from an empty cache; the stages that read the cache are skipped
    once ``embed`` was.
    """
    paths = Paths(Path(args.workdir), role)
    paths.side.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    workers = args.manifest_workers if "manifest" in stages and cli_has_workers(code, env) else 0
    first_writer = next((s for s in stages if s in ("plan", "embed")), None)
    results: dict[str, dict[str, Any]] = {}
    for stage in stages:
        if stage == first_writer:
            shutil.rmtree(paths.cache, ignore_errors=True)
        if stage in CACHE_READERS and "skipped" in results.get("embed", {}):
            results[stage] = {"skipped": "no cache: the embed stage was skipped"}
        else:
            print(f"[{role}] {stage} ...", flush=True)
            results[stage] = run_stage(stage, paths, args, code, env, workers, max_rss_gib, timeout_s)
        print(f"[{role}] {stage}: {describe(results[stage])}", flush=True)
    return results


def baseline_checkout(rev: str) -> Path:
    """A detached ``git worktree`` of ``rev`` at ``/tmp/flame-baseline-REV`` (reused when there)."""
    path = Path(f"/tmp/flame-baseline-{rev}")
    want = subprocess.run(["git", "-C", str(REPO), "rev-parse", f"{rev}^{{commit}}"], capture_output=True,
                          text=True, check=True).stdout.strip()
    if path.exists():
        have = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
        if have.returncode == 0 and have.stdout.strip() == want:
            return path
        raise SystemExit(f"{path} exists but is not a checkout of {rev}; `git worktree remove {path}` it")
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), want], check=True,
                   capture_output=True)
    return path


def describe(result: dict[str, Any]) -> str:
    """A stage result as one progress line."""
    if "skipped" in result:
        return f"SKIPPED, {result['skipped']}"
    extra = ", ".join(f"{k}={v}" for k, v in result.items() if k not in ("seconds", "peak_rss_mib"))
    return f"{result['seconds']} s, peak RSS {result['peak_rss_mib']} MiB ({extra})"


def markdown_table(ours: dict[str, dict[str, Any]], baseline: dict[str, dict[str, Any]] | None = None) -> str:
    """Seconds and peak RSS per stage: ours, and with ``baseline`` also the baseline's and baseline / ours."""

    def cell(r: dict[str, Any] | None, field: str) -> str:
        return "-" if r is None else "skipped" if "skipped" in r else f"{r[field]:,}"

    def ratio(b: dict[str, Any] | None, o: dict[str, Any], field: str) -> str:
        if b is None or "skipped" in b or "skipped" in o or not o[field]:
            return "-"
        return f"{b[field] / o[field]:.2f}x"

    if baseline is None:
        lines = ["| stage | s | peak RSS MiB |", "|---|---|---|"]
        return "\n".join(lines + [f"| {s} | {cell(r, 'seconds')} | {cell(r, 'peak_rss_mib')} |"
                                  for s, r in ours.items()])
    lines = ["| stage | ours s | ours peak RSS MiB | baseline s | baseline peak RSS MiB | s baseline/ours "
             "| RSS baseline/ours |", "|---|---|---|---|---|---|---|"]
    for s, o in ours.items():
        b = baseline.get(s)
        lines.append(f"| {s} | {cell(o, 'seconds')} | {cell(o, 'peak_rss_mib')} | {cell(b, 'seconds')} "
                     f"| {cell(b, 'peak_rss_mib')} | {ratio(b, o, 'seconds')} "
                     f"| {ratio(b, o, 'peak_rss_mib')} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, required=True, help="N, the synthetic samples")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--workdir", help="data, caches, logs; reused by later runs (default: runs/bench-scale-N)")
    p.add_argument("--dim", type=int, default=8, help="D of the stand-in vectors")
    p.add_argument("--image-subset", type=int,
                   help="samples in the tar shards of the manifest stage (default: min(N, 1,000,000))")
    p.add_argument("--manifest-workers", type=int, default=2, help="flame manifest --workers (if it has it)")
    p.add_argument("--reads", type=int, default=50, help="lookup: reads timed")
    p.add_argument("--keys-per-read", type=int, default=3072, help="lookup: random keys per read")
    p.add_argument("--baseline-rev", help="also run the stages on this git revision (e.g. 46db39e)")
    p.add_argument("--baseline-max-rss-gib", type=float, default=8.0,
                   help="kill a baseline stage whose processes hold more RSS than this (summed)")
    p.add_argument("--baseline-timeout", type=float, default=1800.0,
                   help="kill a baseline stage after this many seconds")
    for internal in ("--_stage", "--_role", "--_result"):  # set by the parent for a stage process
        p.add_argument(internal, help=argparse.SUPPRESS)
    p.add_argument("--_manifest-workers", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.image_subset = args.image_subset or min(args.samples, 1_000_000)
    args.workdir = str(Path(args.workdir or REPO / "runs" / f"bench-scale-{args.samples}").resolve())
    if args._stage is None:
        unknown = {s.strip() for s in args.stages.split(",")} - set(STAGES)
        if unknown:
            p.error(f"unknown stages {sorted(unknown)}; known: {', '.join(STAGES)}")
        args.stages = [s for s in STAGES if s in {s.strip() for s in args.stages.split(",")}]
    return args


def prepare_data(args: argparse.Namespace, paths: Paths) -> None:
    """Write (or reuse) the full-N manifest and, for the manifest stage, the tar shards and recaptions."""
    if any(s in MANIFEST_READERS for s in args.stages):
        t = time.perf_counter()
        params = {"samples": args.samples, "generator": GENERATOR_VERSION}
        if ensure(paths.manifest, params, lambda: write_synthetic_manifest(paths.manifest, args.samples)):
            print(f"wrote the synthetic manifest ({disk_mib(paths.manifest):,} MiB) in "
                  f"{time.perf_counter() - t:.1f} s", flush=True)
    if "manifest" in args.stages:
        t = time.perf_counter()
        params = {"samples": args.image_subset, "generator": GENERATOR_VERSION}
        if ensure(paths.webdataset, params, lambda: write_webdataset(paths.webdataset, args.image_subset)):
            print(f"wrote {math.ceil(args.image_subset / SHARD_SAMPLES)} tar shards and the recaptions "
                  f"({disk_mib(paths.webdataset):,} MiB) in {time.perf_counter() - t:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._stage:
        run_stage_here(args)
        return 0
    paths = Paths(Path(args.workdir), "ours")
    paths.logs.mkdir(parents=True, exist_ok=True)
    cpu = cpu_summary()
    print(f"bench/scale.py: {args.samples:,} samples, stages {', '.join(args.stages)}; CPU {cpu}; "
          f"workdir {paths.workdir}", flush=True)
    prepare_data(args, paths)
    report: dict[str, Any] = {"samples": args.samples, "cpu": cpu,
                              "stages": run_side("ours", REPO, args.stages, args)}
    if args.baseline_rev:
        stages = run_side("baseline", baseline_checkout(args.baseline_rev), args.stages, args,
                          args.baseline_max_rss_gib, args.baseline_timeout)
        report["baseline"] = {"rev": args.baseline_rev, "samples": args.samples, "cpu": cpu, "stages": stages}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nN = {args.samples:,} samples, D = {args.dim}, CPU: {cpu}\n")
    print(markdown_table(report["stages"], report.get("baseline", {}).get("stages")))
    return 1 if any("skipped" in r for r in report["stages"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
