"""Import a text cache written by FLAME's own code (one ``.pth`` file per sample) as a flame cache (SPEC §3).

The official layout, as issue 13 describes the authors' release (``MIV-XJTU/FLAME``, ``embed_cc3m_mask.py``
and ``src/training/data.py``)::

    <root>/<key[:5]>/<key>.pth              CC3M ("prefix5" here)
    <root>/<key.split('_')[0]>/<key>.pth    YFCC15M ("underscore" here)

Each file is one ``torch.save``'d ``float16 [11, 5120]`` tensor: the rows are L2-normalized vectors of the facets
``[raw, short x3, long x7]`` (the FLAME prompt set, :data:`stage1_embed_text.encode.prompts.FLAME`), read from
Mistral-Nemo-Instruct-2407 at ``hidden_states[39]`` before the final norm, with the official (continuous)
position ids and the literal ``<s>`` marker kept (:func:`official_identity`).

:func:`import_cache` builds our cache from such a tree for the keys of a manifest:

1. **Find** (one pass over the manifest's keys): which keys have a file, under which layout; 1 byte per key is
   held (``uint8``), nothing else grows with the number of keys. Keys without a file are counted as missing; a key
   whose file would lie outside the root (absolute, ``..``) is refused without looking there (``outside_root``)
   and get no row: nothing is invented.
2. **Copy** (a second pass): rows are given to the found keys in manifest order; each cache shard is filled
   from its files (read by a few threads), checked, and committed with
   :meth:`pipeline.cache.store.CacheWriter.write_shard`. Memory: one shard's vectors (``shard_rows x F x D`` float16,
   115 MB at the default 1024 rows and D = 5120). A file that does not load, is not a ``[F, D]`` floating
   tensor, holds a non-finite value or a row that is not unit-norm (``|‖v‖ - 1| >``
   :data:`pipeline.cache.store.NORM_TOLERANCE`) is counted by reason;
   its row stays empty (mask false) and its key is left out of the index.

Files are only ever read with ``torch.load(..., weights_only=True, mmap=True)``: a file that needs arbitrary
unpickling is refused with a one-line :class:`pipeline.cache.store.CacheError` and the import stops. A killed import
rerun with the same arguments skips the finished shards (the found keys, and so the rows, must be the same).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from manifests.schema import MANIFEST_JSON, iter_batches
from pipeline.cache.files import (
    KEY,
    ROW,
    CacheFiles,
    index_schema,
    sha1_column,
    tokens_column,
    truncated_column,
)
from pipeline.cache.store import (
    NORM_TOLERANCE,
    CacheError,
    CacheIdentity,
    CacheLayout,
    CacheLock,
    CacheMeta,
    CacheWriter,
)
from pipeline.paths import confined_path
from stage1_embed_text.backends.model_source import weights_fingerprint
from stage1_embed_text.encode.prompts import FLAME, GROUPS, get_prompt_set

log = logging.getLogger(__name__)

# Key layouts of the official tree: how a sample key names its file under the root.
LAYOUTS = ("auto", "prefix5", "underscore")
_LAYOUT_CODE = {"prefix5": 1, "underscore": 2}  # 0 = no file
OUTSIDE = 255  # code of a key whose file would lie outside the root (absolute, ``..``): refused and counted

# The official LLM (issue 13; FLAME's README and embed_cc3m_mask.py).
OFFICIAL_LLM = "mistralai/Mistral-Nemo-Instruct-2407"
# An imported identity whose LLM weights were not hashed here: eval's text side, which checks the fingerprint
# of the weights it loads, then names the real digest; pass it with --llm-fingerprint (or "auto").
UNKNOWN_FINGERPRINT = "unknown (imported, not verified)"
IDENTITIES = ("official-nemo",)

DEFAULT_SHARD_ROWS = 1024
DEFAULT_CHUNK_ROWS = 8


def official_identity(name: str = "official-nemo", llm_fingerprint: str | None = None) -> CacheIdentity:
    """The text side FLAME's released caches and checkpoints were made with, as a :class:`CacheIdentity`.

    ``official-nemo`` (issue 13, SPEC §2.2-§2.4): Mistral-Nemo-Instruct-2407 (tokenizer of the same repository),
    ``hidden_states[39]`` before the final norm, D = 5120, the FLAME prompt set with the ``<s>`` marker kept,
    continuous position ids, whole-prompt tokenization (SPEC §2.4), computed in float16 (the official dtype,
    SPEC §2.3) and stored float16, ``backend = "official"``. ``max_tokens`` is not described for the official code: the default is kept.

    Args:
        name: a name of :data:`IDENTITIES`.
        llm_fingerprint: the ``sha256:`` digest of the LLM weight files (:func:`stage1_embed_text.backends.model_source.
            weights_fingerprint`); ``None`` records :data:`UNKNOWN_FINGERPRINT`.

    Raises:
        CacheError: unknown name.
    """
    if name != "official-nemo":
        raise CacheError(f"unknown identity {name!r}; known: {', '.join(IDENTITIES)} or a JSON file")
    prompt_set = get_prompt_set(FLAME.name, bos_marker="keep")
    return CacheIdentity.from_dict(dict(  # from_dict: fields this package version lacks are left out
        llm=OFFICIAL_LLM, llm_fingerprint=llm_fingerprint or UNKNOWN_FINGERPRINT, tokenizer=OFFICIAL_LLM,
        layer=39, readout="pre_norm", dim=5120, prompt_set=prompt_set.name,
        prompt_set_hash=prompt_set.content_hash, facets=prompt_set.facets, position_mode="continuous",
        bos_marker="keep", dtype_compute="float16", dtype_stored="float16", backend="official",
        tokenization="whole-prompt",  # each prompt tokenized as one string, as the official code does (SPEC §2.4)
    ))


def resolve_identity(spec: str, llm_fingerprint: str | None = None) -> CacheIdentity:
    """The identity named by ``spec``: a preset of :data:`IDENTITIES`, or a file/directory holding one.

    Args:
        spec: ``"official-nemo"``; a JSON file with the :class:`CacheIdentity` fields; a cache directory or its
            ``meta.json`` (its identity); an exported model directory or its ``config.json`` (its
            ``cache_identity``).
        llm_fingerprint: replaces the identity's ``llm_fingerprint``; ``"auto"`` hashes the LLM's weight files
            found locally (a hub id resolves to the snapshot already downloaded).

    Raises:
        CacheError: unknown preset, unreadable file, or no identity in it.
        FileNotFoundError: ``"auto"`` and the LLM's weights are not on this machine.
    """
    if llm_fingerprint == "auto":
        base = resolve_identity(spec)
        return CacheIdentity.from_dict(base.to_dict() | {"llm_fingerprint": weights_fingerprint(base.llm)})
    if spec in IDENTITIES:
        return official_identity(spec, llm_fingerprint)
    path = Path(spec)
    if path.is_dir():
        path = next((path / n for n in ("meta.json", "config.json") if (path / n).exists()), path / "meta.json")
    if not path.is_file():
        raise CacheError(f"identity {spec!r} is neither a preset ({', '.join(IDENTITIES)}) nor a JSON file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CacheError(f"cannot read identity {path}: {exc}") from None
    doc = doc.get("identity") or doc.get("cache_identity") or doc
    try:
        ident = CacheIdentity.from_dict(doc)
    except TypeError as exc:
        raise CacheError(f"{path} holds no complete cache identity: {exc}") from None
    if llm_fingerprint:
        ident = CacheIdentity.from_dict(ident.to_dict() | {"llm_fingerprint": llm_fingerprint})
    return ident


def pth_path(root: Path, key: str, layout: str) -> Path | None:
    """Where the official tree keeps ``key``'s file under layout ``prefix5`` or ``underscore``; ``None`` if that
    path would lie outside ``root`` (an absolute key, ``..`` components: :func:`pipeline.paths.confined_path`)."""
    if layout == "prefix5":
        return confined_path(root, f"{key[:5]}/{key}.pth")
    if layout == "underscore":
        return confined_path(root, f"{key.split('_')[0]}/{key}.pth")
    raise CacheError(f"layout must be one of {LAYOUTS[1:]}, got {layout!r}")


def find_file(root: Path, key: str, layout: str) -> int:
    """Code of the layout under which ``key``'s file exists (1 prefix5, 2 underscore), 0 if none, :data:`OUTSIDE`
    if the key names a path outside ``root`` (nothing there is looked at). ``auto`` tries ``prefix5`` first."""
    for name in (("prefix5", "underscore") if layout == "auto" else (layout,)):
        path = pth_path(root, key, name)
        if path is None:
            return OUTSIDE
        if path.is_file():
            return _LAYOUT_CODE[name]
    return 0


def refused_message(exc: BaseException) -> str:
    """What torch's ``weights_only`` refusal refused, in a few words (e.g. ``unsupported global
    __main__.Payload``), from the ``WeightsUnpickler error:`` line of its message."""
    text = str(exc)
    m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if m:
        return f"unsupported global {m.group(1)}"
    m = re.search(r"WeightsUnpickler error: ([^\n]*?)(?:\. |\n|$)", text)
    return (m.group(1) if m else text.strip().splitlines()[0] if text.strip() else type(exc).__name__)[:200]


def load_vectors(path: Path, shape: tuple[int, int]) -> tuple[np.ndarray | None, str | None]:
    """One official cache file as ``float16 [F, D]`` with its rows checked, or ``(None, reason)``.

    Reasons: ``unreadable`` (not a zip-format ``torch.save`` file, truncated...), ``not_a_tensor``, ``shape``
    (not ``shape``), ``dtype`` (not floating point), ``non_finite``, ``not_unit_norm`` (a row with
    ``|‖v‖₂ - 1| > NORM_TOLERANCE`` after the float16 cast).

    Raises:
        CacheError: the file needs unpickling that ``weights_only`` refuses (never done here).
    """
    try:
        t = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise CacheError(f"{path}: refused, not a plain tensor file ({refused_message(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file is counted, not fatal
        log.debug("%s: %s", path, exc)
        return None, "unreadable"
    if not isinstance(t, torch.Tensor):
        return None, "not_a_tensor"
    if tuple(t.shape) != shape:
        return None, "shape"
    if not t.is_floating_point():
        return None, "dtype"
    v = t.to(torch.float16).numpy().copy()
    v32 = v.astype(np.float32)
    if not np.isfinite(v32).all():
        return None, "non_finite"
    if (np.abs(np.linalg.norm(v32, axis=-1) - 1.0) > NORM_TOLERANCE).any():
        return None, "not_unit_norm"
    return v, None


@dataclass
class ImportSummary:
    """What :func:`import_cache` did.

    Attributes:
        keys: manifest keys considered (after ``split``).
        found: keys with a file; ``missing = keys - found`` (includes ``outside_root``).
        outside_root: keys refused because their file would lie outside the root (absolute, ``..``).
        imported: keys in the cache's index (all shards, also those finished by an earlier run).
        bad: files checked by this run and left out, by reason (see :func:`load_vectors`).
        layouts: found files by layout (``{"prefix5": n}``).
        shards, shards_skipped: cache shards, and those already finished by an earlier run.
    """

    out: str
    keys: int
    found: int
    outside_root: int = 0
    imported: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    layouts: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    shards_skipped: int = 0

    @property
    def missing(self) -> int:
        return self.keys - self.found

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "keys": self.keys, "found": self.found, "missing": self.missing,
                "outside_root": self.outside_root, "imported": self.imported, "bad": dict(self.bad), "layouts": dict(self.layouts),
                "shards": self.shards, "shards_skipped": self.shards_skipped}


def _manifest_keys(manifest: Path, split: str | None) -> Iterator[pa.Array]:
    """The manifest's keys in row order (one Arrow string array per batch), only ``split`` if given."""
    cols = ["key", "split"] if split else ["key"]
    for _, batch in iter_batches(manifest, cols):
        keys = batch.column(0)
        if split:
            keys = keys.filter(pc.equal(batch.column(1), split).fill_null(False))
        yield keys


def _find_all(src: Path, manifest: Path, split: str | None, layout: str) -> np.ndarray:
    """Pass 1: ``uint8 [keys]`` layout code of each key's file in manifest order (0 = no file)."""
    codes: list[np.ndarray] = []
    with tqdm(desc="find .pth files", unit="key") as bar:
        for keys in _manifest_keys(manifest, split):
            codes.append(np.fromiter((find_file(src, k, layout) for k in keys.to_pylist()), np.uint8, len(keys)))
            bar.update(len(keys))
    return np.concatenate(codes) if codes else np.zeros(0, np.uint8)


def _plan_hash(src: Path, manifest: Path, split: str | None, codes: np.ndarray, shape: tuple[int, int]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([str(src), str(manifest), split, list(shape)]).encode())
    h.update(hashlib.sha1((manifest / MANIFEST_JSON).read_bytes()).digest())
    h.update(codes.tobytes())
    return "import:" + h.hexdigest()


def _found_keys(manifest: Path, split: str | None, codes: np.ndarray) -> Iterator[tuple[str, int]]:
    """Pass 2: ``(key, layout code)`` of the found keys, in manifest (= row) order."""
    pos = 0
    for keys in _manifest_keys(manifest, split):
        sel = codes[pos : pos + len(keys)]
        pos += len(keys)
        for k, c in zip(keys.to_pylist(), sel):
            if c and c != OUTSIDE:
                yield k, int(c)


def _index_part(keys: list[str], rows: list[int]) -> pa.Table:
    """An index part of imported rows: the official cache holds no texts, so SHA-1s are null, token counts 0 and
    truncation flags false (:func:`pipeline.cache.files.index_schema`)."""
    n = len(keys)
    cols: dict[str, pa.Array] = {KEY: pa.array(keys, pa.string()), ROW: pa.array(rows, pa.int64())}
    for g in GROUPS:
        cols[sha1_column(g)] = pa.nulls(n, pa.string())
        cols[tokens_column(g)] = pa.array(np.zeros(n, np.int32))
        cols[truncated_column(g)] = pa.array(np.zeros(n, bool))
    return pa.table(cols, schema=index_schema(GROUPS))


def import_cache(
    src: str | Path,
    manifest: str | Path,
    out: str | Path,
    identity: CacheIdentity | None = None,
    layout: str = "auto",
    split: str | None = None,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    threads: int = 8,
) -> ImportSummary:
    """Build the cache ``out`` from the official per-sample ``.pth`` tree ``src`` for the keys of ``manifest``.

    Args:
        src: root of the official tree (see the module docstring for the layouts).
        manifest: the manifest (SPEC §4) whose keys are looked up; its order gives the rows.
        out: cache directory to create (or, with the same arguments, to finish).
        identity: the text side the files came from (default :func:`official_identity`); its facets give F and
            its ``dim`` D, so every file must be ``[F, D]``.
        layout: ``"prefix5"`` (CC3M), ``"underscore"`` (YFCC15M) or ``"auto"`` (each key: prefix5, then
            underscore).
        split: only the manifest rows of this split.
        shard_rows / chunk_rows: cache rows per shard / per Zarr chunk.
        threads: files read at once (the reads are small and I/O bound).

    Returns:
        the counts (:class:`ImportSummary`), also stored under ``meta.json["extra"]["import"]``.

    Raises:
        CacheError: ``src`` is not a directory, ``chunk_rows`` does not divide ``shard_rows``, no key has a file, a file is refused by ``weights_only``, another
            job writes ``out``, or ``out`` holds a cache of another identity or plan (:class:`CacheIdentityError`).
        manifests.schema.ManifestError: unfinished manifest.
    """
    src, manifest = Path(src).resolve(), Path(manifest).resolve()
    if layout not in LAYOUTS:
        raise CacheError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not src.is_dir():
        raise CacheError(f"{src} is not a directory of per-sample .pth files")
    if shard_rows <= 0 or chunk_rows <= 0 or shard_rows % chunk_rows:
        raise CacheError(f"need shard_rows > 0 and chunk_rows > 0 dividing it, got {shard_rows}, {chunk_rows}")
    identity = identity or official_identity()
    shape = (len(identity.facets), identity.dim)
    codes = _find_all(src, manifest, split, layout)
    outside = int((codes == OUTSIDE).sum())
    found = int(np.count_nonzero(codes)) - outside
    summary = ImportSummary(out=str(out), keys=len(codes), found=found, outside_root=outside,
                            layouts={n: int((codes == c).sum()) for n, c in _LAYOUT_CODE.items() if (codes == c).any()})
    log.info("%d of %d manifest keys have a file under %s (%s); %d missing", found, len(codes), src,
             summary.layouts, summary.missing)
    if outside:
        log.warning("%d manifest keys name a file outside %s (absolute or '..'); refused, counted as outside_root",
                    outside, src)
    if not found:
        raise CacheError(f"none of the {len(codes)} manifest keys has a file under {src} (layout {layout}): "
                         f"e.g. {pth_path(src, 'KEY', 'prefix5')} or {pth_path(src, 'KEY', 'underscore')}")
    lay = CacheLayout(n_rows=found, shard_rows=shard_rows, chunk_rows=chunk_rows,
                      plan_hash=_plan_hash(src, manifest, split, codes, shape))
    extra = {"import": {"source": str(src), "format": "official per-sample .pth", "layout": layout,
                        "manifest": str(manifest), "split": split} | summary.to_dict()}
    files = CacheFiles(Path(out))
    lock = CacheLock(files)
    lock.acquire()
    try:
        writer = CacheWriter.create(out, CacheMeta(identity, lay, extra=extra))
        bad, skipped = _copy_shards(src, manifest, split, codes, writer, shape, threads)
        writer.build_lookup()
        summary.bad = dict(sorted(bad.items()))
        summary.shards, summary.shards_skipped = lay.n_shards, skipped
        summary.imported = sum(pq.ParquetFile(files.index_part(s)).metadata.num_rows for s in range(lay.n_shards))
        writer.record({"import": summary.to_dict() | {"bad_total": found - summary.imported}})
    finally:
        lock.release()
    log.info("imported %d keys into %s (%d missing, %d bad files: %s)", summary.imported, out, summary.missing,
             found - summary.imported, summary.bad)
    return summary


def _copy_shards(src: Path, manifest: Path, split: str | None, codes: np.ndarray, writer: CacheWriter,
                 shape: tuple[int, int], threads: int) -> tuple[Counter, int]:
    """Pass 2: fill and commit every unfinished shard; returns the bad-file counts by reason and the number of
    shards an earlier run had finished."""
    lay = writer.meta.layout
    bad: Counter = Counter()
    skipped, good = 0, 0
    names = {c: n for n, c in _LAYOUT_CODE.items()}
    found = _found_keys(manifest, split, codes)
    with tqdm(total=lay.n_rows, desc="import .pth", unit="key") as bar, ThreadPoolExecutor(max(1, threads)) as pool:
        for s in range(lay.n_shards):
            rows = lay.shard_range(s)
            batch = [next(found) for _ in rows]
            if writer.is_done(s):
                skipped += 1
                bar.update(len(rows))
                continue
            vectors = np.zeros((len(rows), *shape), np.float16)
            mask = np.zeros((len(rows), shape[0]), bool)
            keys, kept = [], []
            paths = [pth_path(src, k, names[c]) for k, c in batch]
            for j, ((k, _), (v, reason)) in enumerate(zip(batch, pool.map(lambda p: load_vectors(p, shape), paths))):
                if v is None:
                    bad[reason] += 1
                    continue
                vectors[j], mask[j] = v, True
                keys.append(k)
                kept.append(rows.start + j)
            good += len(keys)
            if not good:  # fail early: the tree or the identity is wrong, not a few files
                raise CacheError(f"none of the {len(rows)} files of shard {s} is a valid [{shape[0]}, {shape[1]}] unit-row "
                                 f"float tensor ({dict(bad)}); is this the cache of identity {writer.meta.identity.llm} "
                                 f"(F={shape[0]}, D={shape[1]})?")
            writer.write_shard(s, vectors, mask, _index_part(keys, kept))
            bar.update(len(rows))
            bar.set_postfix(bad=sum(bad.values()))
    return bad, skipped
