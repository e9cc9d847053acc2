"""Integrity of a cache, written once: the cheap check at open and the checksum check of ``flame inspect --verify``.

When :meth:`pipeline.cache.store.CacheWriter.write_shard` commits shard ``S`` it records, in the finished marker
``done/shard-SSSSS.json``, the SHA-256 of the shard's three files (:func:`shard_paths`)::

    "sha256": {"store.zarr/vectors/c/S/0/0": "9f2c...", "store.zarr/mask/c/S/0": "01ab...",
               "index/shard-SSSSS.parquet": "77de..."}

(``null`` for a Zarr shard file that was never stored because every value is the fill value). The key lookup
records the SHA-256 of its files in ``lookup/lookup.json`` (:mod:`pipeline.cache.lookup`).

Two levels of one check, :func:`verify_cache`:

* cheap (``checksums=False``; milliseconds per shard, no vector byte read): every finished shard's marker parses
  and covers its rows of the layout, its index part's Parquet footer opens with the number of keys the marker
  recorded, its vector and mask Zarr shard files are there with a trailing chunk index that fits in the file,
  matches its crc32c and points inside it; the stored lookup's ``.npy`` files are whole and of the recorded
  sizes, ``keys.arrow`` opens with the recorded number of keys. It finds what a killed copy, a truncated file or
  a deleted part leaves behind. :func:`check_parts` (run when training opens a cache) raises the first problem.
* full (``checksums=True``, ``flame inspect --verify``; reads every byte once): also recomputes the recorded
  digests, so a vector changed in any way (negated, set to NaN, a flipped bit) is found. Caches written before
  checksums existed verify as "no checksums recorded".

Each problem is one line naming its file relative to the cache folder, at most one per file (a cheap finding
wins over the digest that then differs too); a damaged shard comes with the command that redoes only that shard
(:func:`redo_command`). A shard is redone by deleting its marker and rerunning the command that built the cache:
finished shards are skipped, the plan (and so every row) is the same, and the key lookup, which depends only on
the plan, is kept.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google_crc32c  # zarr's own crc32c (its shard index codec)
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.assets import sha256_file as _sha256
from pipeline.cache.files import CacheFiles
from pipeline.cache.lookup import LOOKUP_JSON
from pipeline.cache.meta import CacheError, CacheMeta

ARRAYS = ("vectors", "mask")
"""The Zarr arrays of a cache, in the order of :func:`shard_paths`."""


def sha256_file(path: Path) -> str | None:
    """Hex SHA-256 of a file's bytes (:func:`pipeline.assets.sha256_file`); ``None`` if the file does not exist."""
    return _sha256(path) if path.exists() else None


def shard_paths(files: CacheFiles, shard: int) -> dict[str, Path]:
    """The files of cache shard ``shard`` by their path relative to the cache: its Zarr shard of
    ``store.zarr/vectors`` and of ``store.zarr/mask`` (Zarr v3 default chunk keys, as the writer creates the
    arrays) and its index part."""
    paths = [files.vectors / "c" / str(shard) / "0" / "0", files.store / "mask" / "c" / str(shard) / "0",
             files.index_part(shard)]
    return {_name(files, p): p for p in paths}


def shard_checksums(files: CacheFiles, shard: int) -> dict[str, str | None]:
    """What a finished marker records: :func:`sha256_file` of each of :func:`shard_paths`."""
    return {name: sha256_file(path) for name, path in shard_paths(files, shard).items()}


def read_marker(files: CacheFiles, shard: int) -> dict[str, Any] | None:
    """The finished marker of ``shard`` as a dict; ``None`` if absent. A marker that does not parse, is not a
    JSON object or records no integer key count is returned as ``{"unreadable": reason}``."""
    try:
        doc = json.loads(files.marker(shard).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"unreadable": _first_line(exc)}
    if not isinstance(doc, dict):
        return {"unreadable": "not a JSON object"}
    if not isinstance(doc.get("keys"), int):
        return {"unreadable": "no key count"}
    return doc


def redo_command(files: CacheFiles, meta: CacheMeta, shard: int) -> str:
    """The shell command that redoes only shard ``shard``: delete its marker, rerun the command that built the
    cache (reconstructed from ``meta.json``; the writer refuses it in one line if the identity would differ)."""
    root = str(files.root)
    rm = f"rm {shlex.quote(str(files.marker(shard)))}"
    imported = meta.extra.get("import")
    lay = meta.layout
    if isinstance(imported, dict):
        args = ["flame", "import", "cache", str(imported.get("source", "SRC")), "--manifest",
                str(imported.get("manifest", "MANIFEST")), "--out", root, "--layout", str(imported.get("layout", "auto")),
                "--shard-rows", str(lay.shard_rows), "--chunk-rows", str(lay.chunk_rows), "--identity",
                str(files.meta)]
        if imported.get("split"):
            args += ["--split", str(imported["split"])]
    else:
        ident = meta.identity
        args = ["flame", "embed", "--manifest", str(meta.extra.get("manifest", "MANIFEST")), "--out", root,
                "--llm", ident.llm, "--layer", str(ident.layer), "--readout", ident.readout,
                "--backend", ident.backend, "--position-mode", ident.position_mode,
                "--shard-rows", str(lay.shard_rows), "--chunk-rows", str(lay.chunk_rows)]
        if ident.dtype_compute in ("bfloat16", "float32"):
            args += ["--dtype", ident.dtype_compute]
        args += ["--context-tokens", str(ident.max_tokens)]
        batching = meta.extra.get("batching") or {}
        if batching.get("batch_size") is not None:
            args += ["--batch-size", str(batching["batch_size"])]
        elif batching.get("max_batch_tokens") is not None:
            args += ["--max-batch-tokens", str(batching["max_batch_tokens"])]
        for flag, key in (("--split", "split"), ("--limit", "limit")):
            if meta.extra.get(key) is not None:
                args += [flag, str(meta.extra[key])]
    return f"{rm} && {shlex.join(args)}"


@dataclass(frozen=True)
class _ShardIndex:
    """Where the Zarr chunk index of one array's shard files is: ``nbytes`` (16 per inner chunk + a 4-byte
    crc32c), at the file's end or not (then only its size is checked)."""

    nbytes: int
    at_end: bool


def _shard_indexes(files: CacheFiles, meta: CacheMeta) -> dict[str, _ShardIndex]:
    """The chunk index of each array's shard files, from its ``zarr.json``.

    Raises:
        CacheError: a ``zarr.json`` that does not parse (the cache must be rebuilt).
    """
    out = {}
    for array in ARRAYS:
        path = files.store / array / "zarr.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))["codecs"][0]["configuration"]
            inner = int(config["chunk_shape"][0])
            at_end = config.get("index_location", "end") == "end"
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise CacheError(f"{path} is damaged ({_first_line(exc)}); the cache must be rebuilt") from None
        out[array] = _ShardIndex(-(-meta.layout.shard_rows // inner) * 16 + 4, at_end)
    return out


def _zarr_shard_problem(name: str, path: Path, index: _ShardIndex) -> str | None:
    """What is wrong with the Zarr v3 shard file ``path`` (named ``name``) that exists: shorter than its trailing
    chunk index (``(offset, nbytes)`` uint64 pairs + a crc32c), an index failing its crc32c, a chunk past the
    index's start; ``None`` if nothing."""
    size = path.stat().st_size
    if size < index.nbytes:
        return f"{name} is truncated ({size} bytes, its chunk index alone is {index.nbytes})"
    if not index.at_end:
        return None
    with open(path, "rb") as f:
        f.seek(size - index.nbytes)
        raw = f.read(index.nbytes)
    if int(np.frombuffer(raw[-4:], "<u4")[0]) != google_crc32c.value(raw[:-4]):
        return f"{name} has a chunk index that does not match its CRC-32C (a changed byte)"
    pairs = np.frombuffer(raw[:-4], "<u8").reshape(-1, 2)
    stored = pairs[:, 0] != np.uint64(2**64 - 1)
    if (pairs[stored, 0] + pairs[stored, 1] > size - index.nbytes).any():
        return f"{name} is truncated or damaged (a chunk lies past its end)"
    return None


def shard_problems(files: CacheFiles, meta: CacheMeta, shard: int, marker: dict[str, Any],
                   indexes: dict[str, _ShardIndex]) -> dict[str, str]:
    """The cheap check of finished shard ``shard`` (module docstring): file name -> its problem (empty: none).

    A vector shard file may be absent when every value is the fill value (recorded as ``null``); a mask shard
    file of a shard with keys may not (in markers without checksums too).
    """
    marker_name = _name(files, files.marker(shard))
    if "unreadable" in marker:
        return {marker_name: f"{marker_name} is damaged ({marker['unreadable']})"}
    rows = meta.layout.shard_range(shard)
    if list(marker.get("rows", [rows.start, rows.stop])) != [rows.start, rows.stop]:
        return {marker_name: f"{marker_name} covers rows {marker['rows']}, the layout {rows.start}-{rows.stop}"}
    problems = {}
    paths = shard_paths(files, shard)
    recorded = marker.get("sha256") or {}
    keys = marker["keys"]
    for (name, path), array in zip(paths.items(), ARRAYS):
        if path.is_file():
            problem = _zarr_shard_problem(name, path, indexes[array])
        else:
            needed = recorded.get(name) if recorded else array == "mask" and keys > 0 and len(rows) > 0
            problem = f"{name} is missing" if needed else None
        if problem:
            problems[name] = problem
    name, part = list(paths.items())[2]
    try:
        n = pq.read_metadata(part).num_rows
        if n != keys:
            problems[name] = f"{name} holds {n} keys, its marker recorded {keys}"
    except FileNotFoundError:
        problems[name] = f"{name} is missing"
    except (OSError, ValueError, pa.ArrowException) as exc:
        problems[name] = f"{name} is damaged ({_first_line(exc)})"
    return problems


def checksum_problems(files: CacheFiles, shard: int, marker: dict[str, Any]) -> dict[str, str]:
    """The full check of finished shard ``shard``: file name -> problem for each file whose SHA-256 differs from
    the one its marker recorded (empty when none differs, or nothing was recorded)."""
    recorded = marker.get("sha256") or {}
    return {name: f"{name} {'is missing' if digest is None else 'differs from its checksum'}"
            for name, digest in shard_checksums(files, shard).items() if name in recorded and digest != recorded[name]}


def _npy_shape(path: Path) -> tuple[tuple[int, ...], bool]:
    """Shape of a ``.npy`` file and whether its size matches header + data."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        header = f.tell()
    return shape, path.stat().st_size == header + int(np.prod(shape)) * dtype.itemsize


def lookup_problems(files: CacheFiles, meta: CacheMeta, checksums: bool = True) -> tuple[list[str], bool]:
    """Check the stored key lookup, if ``lookup/`` is there (an absent one is fine: the next reader builds it):
    ``(problems, whether recorded checksums were recomputed)``.

    Cheap: ``lookup.json`` parses; each ``.npy`` is whole, of K keys (``[N, F]`` for the mask); ``keys.arrow``
    opens with K keys. Full (``checksums``): the SHA-256 ``lookup.json`` recorded of each file. Each problem names
    its file relative to the cache folder and ends with the fix (delete ``lookup/``; the next reader rebuilds it
    from the index parts).
    """
    d = files.lookup_dir
    info_path = d / LOOKUP_JSON
    if not info_path.exists():
        return [], False
    fix = f"delete {d} (the next reader rebuilds it from the index parts)"
    problems: dict[str, str] = {}
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        k = int(info["keys"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{_name(files, info_path)} is damaged ({_first_line(exc)}); {fix}"], False
    want = {"hashes": (k,), "order": (k,), "rows": (k,), "mask": (meta.layout.n_rows, len(meta.identity.facets))}
    for array, shape in want.items():
        path = d / f"{array}.npy"
        name = _name(files, path)
        try:
            got, whole = _npy_shape(path)
        except (OSError, ValueError) as exc:
            problems[name] = f"{name} is damaged ({_first_line(exc)})"
            continue
        if not whole or (array != "mask" and got != shape) or (array == "mask" and got[0] < shape[0]):
            problems[name] = f"{name} is damaged (shape {got}, expected {shape}, complete: {whole})"
    name = _name(files, d / "keys.arrow")
    try:
        with pa.memory_map(str(d / "keys.arrow")) as source:
            reader = pa.ipc.open_file(source)
            n = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
        if n != k:
            problems[name] = f"{name} holds {n} keys, {LOOKUP_JSON} recorded {k}"
    except (OSError, ValueError, pa.ArrowException) as exc:
        problems[name] = f"{name} is damaged ({_first_line(exc)})"
    recorded = (info.get("sha256") or {}) if checksums else {}
    for file, digest in recorded.items():
        name = _name(files, d / file)
        if name not in problems and sha256_file(d / file) != digest:
            problems[name] = f"{name} differs from its checksum"
    return [f"{p}; {fix}" for p in problems.values()], bool(recorded)


@dataclass
class VerifyReport:
    """What :func:`verify_cache` found.

    Attributes:
        shards: shards checked (finished ones); ``unfinished``: shards without a marker (not checked).
        damaged: shard -> problems (each one line, naming its file relative to the cache folder); ``redo``:
            shard -> the command that redoes it.
        no_checksums: finished shards whose marker records no checksums (written before they existed):
            only the cheap checks ran for them.
        lookup: problems of the key lookup (empty: fine, or absent); ``lookup_checked``: its checksums were
            recomputed.
    """

    shards: int = 0
    unfinished: list[int] = field(default_factory=list)
    damaged: dict[int, list[str]] = field(default_factory=dict)
    redo: dict[int, str] = field(default_factory=dict)
    no_checksums: list[int] = field(default_factory=list)
    lookup: list[str] = field(default_factory=list)
    lookup_checked: bool = False

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.lookup

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "shards": self.shards, "unfinished": self.unfinished,
                "damaged": {str(s): p for s, p in self.damaged.items()}, "redo": {str(s): c for s, c in self.redo.items()},
                "no_checksums": self.no_checksums, "lookup": self.lookup, "lookup_checked": self.lookup_checked}

    def lines(self) -> list[str]:
        """The report as text lines (what ``flame inspect --verify`` prints)."""
        out = [f"verify     : {self.shards} finished shards checked, {len(self.damaged)} damaged"
               + (f", {len(self.unfinished)} unfinished (not checked)" if self.unfinished else "")]
        if self.no_checksums:
            out.append(f"             {len(self.no_checksums)} shards have no checksums recorded (written before "
                       "shards recorded them): only their files and sizes were checked")
        for s, problems in self.damaged.items():
            out.append(f"  shard {s}: " + "; ".join(problems))
            out.append(f"    redo   : {self.redo[s]}")
        for p in self.lookup:
            out.append(f"  lookup : {p}")
        return out


def verify_cache(cache_dir: str | Path, checksums: bool = True) -> VerifyReport:
    """Check every finished shard of a cache and its key lookup (module docstring).

    Args:
        cache_dir: the cache.
        checksums: the full level: also recompute the SHA-256 digests (reads the whole cache once); ``False``
            runs only the cheap level (no vector byte read).

    Raises:
        CacheError: not a cache (no readable ``meta.json``), or a ``zarr.json`` that does not parse.
    """
    files = CacheFiles(cache_dir)
    meta = CacheMeta.read(cache_dir)
    indexes = _shard_indexes(files, meta)
    report = VerifyReport()
    for s in range(meta.layout.n_shards):
        marker = read_marker(files, s)
        if marker is None:
            report.unfinished.append(s)
            continue
        report.shards += 1
        problems = shard_problems(files, meta, s, marker, indexes)
        if "unreadable" not in marker and not marker.get("sha256"):
            report.no_checksums.append(s)
        elif checksums and "unreadable" not in marker:
            problems = checksum_problems(files, s, marker) | problems  # the cheap finding of a file wins
        if problems:
            report.damaged[s] = list(problems.values())
            report.redo[s] = redo_command(files, meta, s)
    report.lookup, report.lookup_checked = lookup_problems(files, meta, checksums)
    return report


def check_parts(cache_dir: str | Path) -> None:
    """The cheap check of a cache that claims to be finished (run when training opens it): ``meta.json``
    parses, every shard is finished and passes the cheap level of :func:`verify_cache`, and so does the stored
    lookup.

    Raises:
        CacheError: an unfinished cache, or the first damaged part in one line: the shard, its file (relative to
            the cache folder) and the command that redoes only that shard (or, for the lookup, the fix).
    """
    report = verify_cache(cache_dir, checksums=False)
    if report.unfinished:
        n = report.shards + len(report.unfinished)
        raise CacheError(
            f"cache {cache_dir} is unfinished: {len(report.unfinished)} of {n} shards missing "
            f"(first {report.unfinished[:5]}); rerun `flame embed` with the same arguments to finish it"
        )
    if report.damaged:
        s = next(iter(report.damaged))
        raise CacheError(f"cache {cache_dir}: shard {s}: {report.damaged[s][0]}; redo only this shard with: "
                         f"{report.redo[s]}")
    if report.lookup:
        raise CacheError(f"cache {cache_dir}: {report.lookup[0]}")


def _name(files: CacheFiles, path: Path) -> str:
    """``path`` relative to the cache folder, with ``/``."""
    return path.relative_to(files.root).as_posix()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
