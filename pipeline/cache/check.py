"""The cheap check of a finished cache at open (:func:`check_parts`): every part present and of a consistent size.

It reads file sizes, Parquet footers, ``.npy`` headers, Arrow IPC footers and Zarr shard indexes, never the
vectors themselves: milliseconds per shard. It finds what a killed copy, a truncated file or a deleted part leaves
behind. It does not find a changed byte inside a vector; the per-shard checksums (``flame inspect --verify``) do.
"""

from __future__ import annotations

import json
from pathlib import Path

import google_crc32c  # zarr's own crc32c (its shard index codec)
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache.files import CacheFiles
from pipeline.cache.lookup import LOOKUP_JSON
from pipeline.cache.meta import CacheError, CacheMeta


def _redo(files: CacheFiles, shard: int) -> str:
    return f"delete {files.marker(shard)} and rerun flame embed to redo the shard"


def check_shard(files: CacheFiles, meta: CacheMeta, shard: int) -> None:
    """Check finished shard ``shard``: its marker parses and matches the layout, its index part's footer reads
    with the marker's number of keys, and its vector and mask shard files are there with an index that fits.

    Raises:
        CacheError: naming the damaged file and how to redo the shard.
    """
    rows = meta.layout.shard_range(shard)
    redo = _redo(files, shard)
    try:
        marker = json.loads(files.marker(shard).read_text(encoding="utf-8"))
        keys = int(marker["keys"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CacheError(f"{files.marker(shard)} is damaged ({exc}); {redo}") from None
    if list(marker.get("rows", [rows.start, rows.stop])) != [rows.start, rows.stop]:
        raise CacheError(f"{files.marker(shard)} covers rows {marker['rows']}, the layout {rows.start}-{rows.stop}; {redo}")
    part = files.index_part(shard)
    try:
        n = pq.read_metadata(part).num_rows
    except FileNotFoundError:
        raise CacheError(f"{part} is missing although shard {shard} is finished; {redo}") from None
    except (OSError, pa.ArrowException) as exc:
        raise CacheError(f"{part} is damaged ({str(exc).splitlines()[0]}); {redo}") from None
    if n != keys:
        raise CacheError(f"{part} holds {n} keys, its marker says {keys}; {redo}")
    if len(rows) == 0 or keys == 0:
        return
    for array in ("vectors", "mask"):
        _check_zarr_shard(files, meta, array, shard, redo)


def _check_zarr_shard(files: CacheFiles, meta: CacheMeta, array: str, shard: int, redo: str) -> None:
    """The Zarr v3 shard file of ``array`` for ``shard`` exists, and its trailing index (``(offset, nbytes)``
    uint64 pairs per inner chunk + a crc32c) lies inside the file, matches its crc32c and points inside it."""
    adir = files.store / array
    try:
        zmeta = json.loads((adir / "zarr.json").read_text(encoding="utf-8"))
        inner = zmeta["codecs"][0]["configuration"]["chunk_shape"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise CacheError(f"{adir / 'zarr.json'} is damaged ({exc}); the cache must be rebuilt") from None
    path = adir.joinpath("c", str(shard), *["0"] * (len(zmeta["shape"]) - 1))
    if not path.is_file():
        if array == "mask":
            raise CacheError(f"{path} is missing although shard {shard} is finished; {redo}")
        return  # all-zero vector shards are not stored; the reader refuses rows whose mask says otherwise
    n_index = -(-meta.layout.shard_rows // inner) * 16 + 4
    size = path.stat().st_size
    if size < n_index:
        raise CacheError(f"{path} is truncated ({size} bytes, its index alone is {n_index}); {redo}")
    if zmeta["codecs"][0]["configuration"].get("index_location", "end") != "end":
        return
    with open(path, "rb") as f:
        f.seek(size - n_index)
        raw = f.read(n_index)
    if int(np.frombuffer(raw[-4:], "<u4")[0]) != google_crc32c.value(raw[:-4]):
        raise CacheError(f"the chunk index of {path} fails its crc32c (a changed byte); {redo}")
    index = np.frombuffer(raw[:-4], "<u8").reshape(-1, 2)
    stored = index[:, 0] != np.uint64(2**64 - 1)
    if (index[stored, 0] + index[stored, 1] > size - n_index).any():
        raise CacheError(f"{path} is truncated or damaged (a chunk lies past its end); {redo}")


def _npy_shape(path: Path) -> tuple[tuple[int, ...], bool]:
    """Shape of a ``.npy`` file and whether its size matches header + data."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        header = f.tell()
    return shape, path.stat().st_size == header + int(np.prod(shape)) * dtype.itemsize


def check_lookup(files: CacheFiles, meta: CacheMeta) -> None:
    """If ``lookup/`` is there: every file present, each ``.npy`` of the size its header says, of K keys (or
    ``[N, F]`` for the mask), and ``keys.arrow`` readable with K keys. An absent lookup is fine (built on open).

    Raises:
        CacheError: naming the damaged file; deleting ``lookup/`` makes the next open rebuild it.
    """
    d = files.lookup_dir
    if not (d / LOOKUP_JSON).exists():
        return
    fix = f"delete {d} and the next open rebuilds it"
    try:
        info = json.loads((d / LOOKUP_JSON).read_text(encoding="utf-8"))
        k = int(info["keys"])
        want = {"hashes": (k,), "order": (k,), "rows": (k,),
                "mask": (meta.layout.n_rows, len(meta.identity.facets))}
        for name, shape in want.items():
            path = d / f"{name}.npy"
            got, whole = _npy_shape(path)
            if not whole or (name != "mask" and got != shape) or (name == "mask" and got[0] < shape[0]):
                raise CacheError(f"{path} is damaged (shape {got}, expected {shape}, complete: {whole}); {fix}")
        with pa.memory_map(str(d / "keys.arrow")) as source:
            reader = pa.ipc.open_file(source)
            n = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    except CacheError:
        raise
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        raise CacheError(f"the key lookup in {d} is damaged ({str(exc).splitlines()[0]}); {fix}") from None
    if n != k:
        raise CacheError(f"{d / 'keys.arrow'} holds {n} keys, {LOOKUP_JSON} says {k}; {fix}")


def check_parts(cache_dir: str | Path) -> CacheMeta:
    """The cheap open-time check of a cache that claims to be finished: ``meta.json`` parses, every shard
    is finished (:func:`check_shard`) and the stored lookup is whole (:func:`check_lookup`). Returns the meta.

    Raises:
        CacheError: the first missing, truncated or inconsistent part, named with how to repair it.
    """
    files = CacheFiles(cache_dir)
    meta = CacheMeta.read(files.root)
    missing = [s for s in range(meta.layout.n_shards) if not files.marker(s).exists()]
    if missing:
        raise CacheError(
            f"cache {files.root} is unfinished: {len(missing)} of {meta.layout.n_shards} shards missing "
            f"(first {missing[:5]}); rerun `flame embed` with the same arguments to finish it"
        )
    for s in range(meta.layout.n_shards):
        check_shard(files, meta, s)
    check_lookup(files, meta)
    return meta
