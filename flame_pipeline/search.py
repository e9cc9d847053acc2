"""Text-to-image search over your own images with a trained model: ``flame index`` and ``flame search``.

An index is a folder, published atomically (:func:`pipeline.atomic.atomic_directory`), so a killed
``flame index`` leaves nothing half-written::

    INDEX/index.json      model source, text identity, D, counts, skipped images by reason, version
    INDEX/items.parquet   one row per indexed image: id (= faiss id), name, path, member (tar), key (manifest)
    INDEX/vectors.npy     float32 [N, D], unit rows (np.load(..., mmap_mode="r") reads them without a copy)
    INDEX/index.faiss     faiss.IndexFlatIP over those rows: exact inner-product (= cosine) search

Images come from a folder (searched recursively for image files), a manifest (``flame manifest``; optionally one
split) or WebDataset tar shards (image members, listed with :mod:`webdataset`'s tar reader). They are decoded and
embedded by ``flame eval``'s batched loader (:func:`eval.embedding.embed_images`: DataLoader workers, a progress
bar); an image that does not open is skipped, counted by reason and logged, never indexed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from eval.benchmarks.base import ImageRef
from eval.embedding import embed_images
from manifests.schema import MANIFEST_JSON, iter_rows
from pipeline import __version__
from pipeline.atomic import atomic_directory
from pipeline.errors import FlameError

log = logging.getLogger(__name__)

INDEX_JSON, ITEMS, VECTORS, FAISS = "index.json", "items.parquet", "vectors.npy", "index.faiss"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class SearchIndexError(FlameError, ValueError):
    """An index input with no images, an index folder that is incomplete, or a bad query."""


@dataclass(frozen=True)
class Item:
    """One image to index: how to open it and how to name it in results."""

    ref: ImageRef
    name: str
    key: str | None = None


def list_images(src: str | Path, split: str | None = None) -> Iterator[Item]:
    """The images of a folder, a manifest folder, or one or more tar shards (``a.tar`` or a glob ``shards/*.tar``).

    Raises:
        SearchIndexError: ``src`` is none of these.
    """
    text = str(src)
    path = Path(text).expanduser()
    if (path / MANIFEST_JSON).is_file():
        yield from _manifest_items(path, split)
    elif path.is_dir():
        for p in sorted(q for q in path.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file()):
            yield Item(ImageRef(path=str(p)), str(p.relative_to(path)))
    else:
        shards = sorted(path.parent.glob(path.name)) if any(c in text for c in "*?[") else [path]
        shards = [s for s in shards if s.is_file() and s.suffix == ".tar"]
        if not shards:
            raise SearchIndexError(f"{src}: not a folder of images, a manifest or .tar shards")
        for shard in shards:
            yield from _tar_items(shard)


def _manifest_items(path: Path, split: str | None) -> Iterator[Item]:
    cols = ["key", "split", "image_path", "image_member", "image_bytes"]
    for row in iter_rows(path, cols):
        if split is None or row["split"] == split:
            ref = ImageRef(path=row["image_path"], member=row["image_member"], data=row["image_bytes"],
                           base_dir=str(path), name=row["key"])
            yield Item(ref, row["key"], row["key"])


def _tar_items(shard: Path) -> Iterator[Item]:
    from webdataset.tariterators import tar_file_iterator

    with open(shard, "rb") as f:
        for member in tar_file_iterator(f):
            name = member["fname"]
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Item(ImageRef(path=str(shard), member=name), f"{shard.name}/{name}")


def build_index(model: Any, model_src: str, src: str | Path, out: str | Path, split: str | None = None,
                batch_size: int = 64, workers: int = 0) -> dict[str, Any]:
    """Embed every image of ``src`` with ``model`` (a :class:`flame_pipeline.FlameModel`) and publish ``out``.

    Returns:
        the ``index.json`` document (``count``, ``skipped`` by reason, ``dim``, ``model``, ``text_identity``).

    Raises:
        SearchIndexError: ``src`` holds no images, or none of them opens.
    """
    import faiss

    items = list(list_images(src, split))
    if not items:
        raise SearchIndexError(f"{src}: no images found" + (f" in split {split!r}" if split else ""))
    emb = embed_images(model.vision, [it.ref for it in items], model.preprocess, batch_size, model.device,
                       workers=workers, desc="index images")
    skipped: dict[str, int] = {}
    for reason, _ in emb.failed.values():
        skipped[reason] = skipped.get(reason, 0) + 1
    keep = [i for i in range(len(items)) if i not in emb.failed]
    if not keep:
        raise SearchIndexError(f"{src}: none of the {len(items)} images opens ({skipped})")
    if emb.failed:
        log.warning("%d of %d images skipped (%s)", len(emb.failed), len(items), skipped)
    vectors = np.ascontiguousarray(emb.embeddings[keep], dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    doc = {"format": 1, "model": model_src, "dim": int(vectors.shape[1]), "count": len(keep), "skipped": skipped,
           "source": str(src), "split": split, "text_identity": model.text_identity,
           "package_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    kept = [items[i] for i in keep]
    table = pa.table({"id": pa.array(range(len(kept)), pa.int64()), "name": [it.name for it in kept],
                      "path": [it.ref.path for it in kept], "member": [it.ref.member for it in kept],
                      "key": [it.key for it in kept]})
    with atomic_directory(out) as tmp:
        np.save(tmp / VECTORS, vectors)
        faiss.write_index(index, str(tmp / FAISS))
        pq.write_table(table, tmp / ITEMS)
        (tmp / INDEX_JSON).write_text(json.dumps(doc, indent=2, ensure_ascii=False), encoding="utf-8")
    return doc


def read_index(index_dir: str | Path) -> tuple[dict[str, Any], Any, pa.Table]:
    """``(index.json, the faiss index, items)`` of an index folder.

    Raises:
        SearchIndexError: a file is missing or damaged.
    """
    import faiss

    d = Path(index_dir)
    missing = [n for n in (INDEX_JSON, ITEMS, FAISS) if not (d / n).is_file()]
    if missing:
        raise SearchIndexError(f"{d} is not a flame index (no {', '.join(missing)}); build it with flame index")
    try:
        doc = json.loads((d / INDEX_JSON).read_text(encoding="utf-8"))
        index = faiss.read_index(str(d / FAISS))
        items = pq.read_table(d / ITEMS)
    except (OSError, ValueError, RuntimeError, pa.ArrowException) as exc:
        raise SearchIndexError(f"{d}: damaged index ({str(exc).strip().splitlines()[0][:200]})") from None
    if index.ntotal != items.num_rows or index.d != doc.get("dim"):
        raise SearchIndexError(f"{d}: index.faiss holds {index.ntotal} x {index.d}, items {items.num_rows} x "
                               f"{doc.get('dim')}; rebuild it with flame index")
    return doc, index, items


def search(model: Any, index_dir: str | Path, queries: list[str], k: int = 10, mode: str = "single",
           loaded: tuple[dict[str, Any], Any, pa.Table] | None = None) -> list[list[dict[str, Any]]]:
    """Top-``k`` images per query: ``[{"rank", "score" (cosine), "id", "name", "path", "member", "key"}]``.

    Raises:
        SearchIndexError: ``k < 1``, no queries, or the model's D differs from the index's.
    """
    doc, index, items = loaded or read_index(index_dir)
    if k < 1 or not queries:
        raise SearchIndexError("search needs k >= 1 and at least one query")
    if model.dim != doc["dim"]:
        raise SearchIndexError(f"model has D={model.dim}, index {index_dir} D={doc['dim']}")
    q = model.encode_text(queries, mode).numpy()
    scores, ids = index.search(np.ascontiguousarray(q, dtype=np.float32), min(k, index.ntotal))
    rows = items.to_pydict()
    return [[{"rank": r + 1, "score": round(float(s), 6), "id": int(i),
              **{c: rows[c][int(i)] for c in ("name", "path", "member", "key")}}
             for r, (s, i) in enumerate(zip(srow, irow, strict=True)) if i >= 0]
            for srow, irow in zip(scores, ids, strict=True)]
