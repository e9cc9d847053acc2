"""Step 5: the manifest parts, one per shard with rows, in shard order; then their publication.

A part's rows are its shard's staged samples that are usable (no skip reason, not a dropped duplicate) and
have a caption; their recaptions come from the join outputs (:class:`manifests.wds.recaptions.SortedRuns`).
Memory: one shard's staged rows and one row group per join output.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from manifests.schema import (
    DATA_DIR,
    MANIFEST_JSON,
    RAW_CAPTION,
    SCHEMA,
    ManifestError,
    ManifestInfo,
    to_stored,
)
from manifests.wds.recaptions import RECAPTION_COLUMNS, SortedRuns
from manifests.wds.samples import Samples, stage_file
from manifests.wds.shards import shard_reference
from pipeline.atomic import atomic_write_bytes


def count(coverage: dict[str, int], reason: str, n: int) -> None:
    """Add ``n`` (any integer type) to ``coverage[reason]``; a zero adds no entry."""
    if n:
        coverage[reason] = coverage.get(reason, 0) + int(n)


def write_parts(samples: Samples, dropped: np.ndarray, joined: dict[str, list[Path]], urls: list[str],
                out_dir: Path, stage: Path, split: str, coverage: dict[str, int]) -> list[str]:
    """Step 5: one part per shard with rows, into ``stage/parts``; returns their names (``data/part-*``).

    Args:
        samples: steps 1 and 3's samples; ``dropped`` (``(n,)`` bool) marks the duplicates dropped.
        joined: per recaption column, its join outputs (:func:`manifests.wds.recaptions.join_recaptions`).
        urls: the shards, in order; out_dir: the manifest folder (for relative image paths).
        stage: the staging folder; split: every row's ``split``.
        coverage: the outcomes of the samples are counted into it.

    Raises:
        ManifestError: two different keys with one digest met in a join (probability 2^-128 per pair).
    """
    runs = {column: SortedRuns(paths) for column, paths in joined.items()}
    (stage / "parts").mkdir()
    parts: list[str] = []
    offsets = samples.offsets
    rows_written = 0
    bar = tqdm(samples.shards, desc="write manifest", unit="shard", disable=None)
    for i, (index, take) in enumerate(bar):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        staged = pq.read_table(stage_file(stage, index)).slice(0, take)
        captions = {c: staged[RAW_CAPTION] if c == RAW_CAPTION else pa.nulls(take, pa.string())
                    for c in (RAW_CAPTION, *RECAPTION_COLUMNS)}
        for column, merge in runs.items():
            found = merge.below(hi)
            pos = found["row"].to_numpy() - lo
            if not pc.all(pc.equal(found["key"], staged["key"].take(pos)), min_count=0).as_py():
                raise ManifestError(f"{urls[index]}: key digest collision in the {column} join")
            where = np.full(take, -1, np.int64)
            where[pos] = np.arange(len(pos))
            captions[column] = found["caption"].take(pa.array(where, mask=where < 0))
        kept = _count_outcomes(staged, captions, dropped[lo:hi], list(runs), coverage)
        n = int(kept.sum())
        if n:
            table = _part_table(staged, captions, kept, shard_reference(urls[index], out_dir), split)
            name = f"{DATA_DIR}/part-{len(parts):05d}.parquet"
            # tar members: the image struct holds the shard path, not a file datasets could decode
            pq.write_table(to_stored(table, image_feature=False), stage / "parts" / Path(name).name,
                           compression="zstd")
            parts.append(name)
            rows_written += n
        bar.set_postfix(rows=rows_written)
    return parts


def _count_outcomes(staged: pa.Table, captions: dict[str, pa.Array], dup: np.ndarray, recaptioned: list[str],
                    coverage: dict[str, int]) -> np.ndarray:
    """Count the outcomes of one shard's samples; returns which become rows (``(take,)`` bool)."""
    has_skip = staged["skip"].is_valid().to_numpy(zero_copy_only=False)
    usable = ~dup & ~has_skip
    has_caption = np.zeros(staged.num_rows, bool)
    for values in captions.values():
        has_caption |= values.is_valid().to_numpy(zero_copy_only=False)
    kept = usable & has_caption
    count(coverage, "skipped_duplicate", dup.sum())
    for reason in pc.value_counts(staged["skip"].filter(~dup & has_skip)).to_pylist():
        count(coverage, f"skipped_{reason['values']}", reason["counts"])
    count(coverage, "skipped_no_caption", (usable & ~has_caption).sum())
    count(coverage, "json_without_caption", pc.sum(staged["json_without_caption"]).as_py() or 0)
    for note in pc.value_counts(pc.list_flatten(staged["notes"].filter(kept))).to_pylist():
        count(coverage, note["values"], note["counts"])
    for column in recaptioned:
        count(coverage, f"sample_without_{column}", (kept & ~captions[column].is_valid().to_numpy(
            zero_copy_only=False)).sum())
    return kept


def _part_table(staged: pa.Table, captions: dict[str, pa.Array], kept: np.ndarray, image_path: str,
                split: str) -> pa.Table:
    """The manifest rows (:data:`manifests.schema.SCHEMA`) of one shard's ``kept`` samples."""
    n = int(kept.sum())
    mask = pa.array(kept)
    columns = {
        "key": staged["key"].filter(mask),
        "image_path": pa.array([image_path] * n, pa.string()),
        "image_member": staged["image_member"].filter(mask),
        **{c: values.filter(mask) for c, values in captions.items()},
        "split": pa.array([split] * n, pa.string()),
    }
    return pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in SCHEMA}, schema=SCHEMA)


def publish(out_dir: Path, stage: Path, info: ManifestInfo) -> None:
    """Replace the manifest in ``out_dir`` by the staged parts; ``manifest.json`` is written last.

    The parts move from ``stage/parts`` (on the same file system) by rename; until ``manifest.json`` is
    written the folder holds no finished manifest, so a reader never pairs old and new parts.
    """
    data = out_dir / DATA_DIR
    data.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_JSON).unlink(missing_ok=True)
    for old in data.glob("part-*.parquet"):
        old.unlink()
    for name in info.parts:
        os.replace(stage / "parts" / Path(name).name, out_dir / name)
    atomic_write_bytes(out_dir / MANIFEST_JSON, info.to_json().encode("utf-8"))
