"""Integrity of a finished cache: the checksums each shard records when it is committed, and their checks.

When :meth:`pipeline.cache.store.CacheWriter.write_shard` commits shard ``S`` it records, in the finished marker
``done/shard-SSSSS.json``, the SHA-256 of the shard's three files (:func:`shard_paths`)::

    "sha256": {"store.zarr/vectors/c/S/0/0": "9f2c...", "store.zarr/mask/c/S/0": "01ab...",
               "index/shard-SSSSS.parquet": "77de..."}

(``null`` for a Zarr shard file that was never stored because every value is the fill value). The key lookup
records the SHA-256 of its files in ``lookup/lookup.json`` (:mod:`pipeline.cache.lookup`).

Two checks use them:

* :func:`cheap_problems` (milliseconds per shard, no vector bytes read): every finished shard's files are
  present, its index part's Parquet footer opens with the row count its marker recorded, and its vector shard
  file is at least as long as its chunk index.
* :func:`verify_cache` (reads every byte once): recomputes the recorded digests, so a vector changed in any way
  (negated, set to NaN, a flipped bit) is found, and names each damaged shard with the command that redoes only
  that shard (:func:`redo_command`). Caches written before checksums existed verify as "no checksums recorded".

A shard is redone by deleting its marker and rerunning the command that built the cache: finished shards are
skipped, the plan (and so every row) is the same, and the key lookup, which depends only on the plan, is kept.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.assets import sha256_file as _sha256
from pipeline.cache.files import CacheFiles
from pipeline.cache.meta import CacheError, CacheMeta


def sha256_file(path: Path) -> str | None:
    """Hex SHA-256 of a file's bytes (:func:`pipeline.assets.sha256_file`); ``None`` if the file does not exist."""
    return _sha256(path) if path.exists() else None


def shard_paths(files: CacheFiles, shard: int) -> dict[str, Path]:
    """The files of cache shard ``shard`` by their path relative to the cache: its Zarr shard of
    ``store.zarr/vectors`` and of ``store.zarr/mask`` (Zarr v3 default chunk keys, as the writer creates the
    arrays) and its index part."""
    paths = [files.vectors / "c" / str(shard) / "0" / "0", files.store / "mask" / "c" / str(shard) / "0",
             files.index_part(shard)]
    return {p.relative_to(files.root).as_posix(): p for p in paths}


def shard_checksums(files: CacheFiles, shard: int) -> dict[str, str | None]:
    """What a finished marker records: :func:`sha256_file` of each of :func:`shard_paths`."""
    return {name: sha256_file(path) for name, path in shard_paths(files, shard).items()}


def read_marker(files: CacheFiles, shard: int) -> dict[str, Any] | None:
    """The finished marker of ``shard`` as a dict; ``None`` if absent. A marker that is not a JSON object is
    returned as ``{"unreadable": reason}``."""
    try:
        doc = json.loads(files.marker(shard).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"unreadable": str(exc)}
    return doc if isinstance(doc, dict) else {"unreadable": "not a JSON object"}


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


def cheap_problems(files: CacheFiles, meta: CacheMeta, shard: int, marker: dict[str, Any]) -> list[str]:
    """What is visibly wrong with finished shard ``shard`` without reading its vectors (empty list: nothing).

    Checks: the marker is readable; the index part is present, its Parquet footer opens and holds the number of
    keys the marker recorded; a vector or mask shard file recorded as stored is present, and a vector shard file
    is at least as long as its chunk index (``16`` bytes per chunk plus a 4-byte CRC).
    """
    if "unreadable" in marker:
        return [f"finished marker {files.marker(shard).name} is damaged ({marker['unreadable']})"]
    problems = []
    part = files.index_part(shard)
    name = part.relative_to(files.root).as_posix()
    try:
        n = pq.ParquetFile(part).metadata.num_rows
        if "keys" in marker and n != marker["keys"]:
            problems.append(f"{name} holds {n} keys, its marker recorded {marker['keys']}")
    except FileNotFoundError:
        problems.append(f"{name} is missing")
    except (OSError, ValueError, pa.ArrowException) as exc:
        problems.append(f"{name} is damaged ({_first_line(exc)})")
    recorded = marker.get("sha256") or {}
    paths = shard_paths(files, shard)
    vector_name = next(iter(paths))
    n_chunks = -(-meta.layout.shard_rows // meta.layout.chunk_rows)
    for name, path in list(paths.items())[:2]:
        if recorded.get(name) and not path.exists():
            problems.append(f"{name} is missing")
        elif name == vector_name and path.exists() and path.stat().st_size < 16 * n_chunks + 4:
            problems.append(f"{name} is truncated ({path.stat().st_size} bytes)")
    return problems


@dataclass
class VerifyReport:
    """What :func:`verify_cache` found.

    Attributes:
        shards: shards checked (finished ones); ``unfinished``: shards without a marker (not checked).
        damaged: shard -> problems (each one line); ``redo``: shard -> the command that redoes it.
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
    """Check every finished shard of a cache (and its key lookup) against what was recorded when it was written.

    Args:
        cache_dir: the cache.
        checksums: recompute the SHA-256 digests (reads the whole cache once); ``False`` runs only
            :func:`cheap_problems`.

    Raises:
        CacheError: not a cache (no readable ``meta.json``).
    """
    files = CacheFiles(cache_dir)
    meta = CacheMeta.read(cache_dir)
    report = VerifyReport()
    for s in range(meta.layout.n_shards):
        marker = read_marker(files, s)
        if marker is None:
            report.unfinished.append(s)
            continue
        report.shards += 1
        problems = cheap_problems(files, meta, s, marker)
        recorded = marker.get("sha256")
        if not recorded and "unreadable" not in marker:
            report.no_checksums.append(s)
        elif recorded and checksums:
            for name, digest in shard_checksums(files, s).items():
                if name in recorded and digest != recorded[name]:
                    problems.append(f"{name} {'is missing' if digest is None else 'differs from its checksum'}")
        if problems:
            report.damaged[s] = list(dict.fromkeys(problems))
            report.redo[s] = redo_command(files, meta, s)
    if checksums:
        report.lookup, report.lookup_checked = lookup_problems(files)
    return report


def lookup_problems(files: CacheFiles) -> tuple[list[str], bool]:
    """Recompute the checksums ``lookup/lookup.json`` recorded: ``(problems, whether any were recorded)``.
    Every problem ends with the fix (delete ``lookup/``; the next reader rebuilds it from the index parts)."""
    info_path = files.lookup_dir / "lookup.json"
    if not info_path.exists():
        return [], False
    fix = f"delete {files.lookup_dir} (the next reader rebuilds it from the index parts)"
    try:
        recorded = json.loads(info_path.read_text(encoding="utf-8")).get("sha256") or {}
    except (OSError, ValueError, AttributeError) as exc:
        return [f"lookup.json is damaged ({_first_line(exc)}); {fix}"], False
    bad = [name for name, digest in recorded.items() if sha256_file(files.lookup_dir / name) != digest]
    return ([f"{', '.join(bad)} differ from their checksums; {fix}"] if bad else []), bool(recorded)


def require_intact(cache_dir: str | Path) -> None:
    """Raise :class:`CacheError` (one line, naming the first damaged shard and its redo command) unless
    :func:`verify_cache` finds nothing."""
    report = verify_cache(cache_dir)
    if report.lookup:
        raise CacheError(f"cache {cache_dir}: {report.lookup[0]}")
    if report.damaged:
        s = next(iter(report.damaged))
        raise CacheError(f"cache {cache_dir}: {len(report.damaged)} damaged shards; shard {s}: "
                         f"{'; '.join(report.damaged[s])}; redo it with: {report.redo[s]}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
