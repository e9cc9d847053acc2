"""The pieces both training-data sources share (SPEC §5): which keys are trainable, one sample's facet draw and
augmentation, the batch format, image decoding and the split checks.

Every random choice of a sample comes from numpy generators seeded by :func:`sample_seed` of integers such as
``(seed, epoch, index)``, never from process-global state. The facet draw and the crop use two independent
streams spawned from that seed (:func:`sample_streams`), so a sample's crop is the same whatever the facets,
P or facet mask are (arms that draw different facets see the same crops).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torchvision.transforms.v2 import functional as TF

from manifests.images import UndecodableImageError, load_image
from manifests.schema import ManifestError, read_manifest, read_manifest_info
from pipeline.cache.store import CacheReader
from pipeline.errors import FlameError

IMAGE_COLUMNS = ["key", "image_path", "image_member", "image_bytes", "split"]
IMAGE_ERRORS = (UndecodableImageError, ManifestError, OSError)


class DataError(FlameError, ValueError):
    """The manifest split is empty, or the manifest and the cache share no keys."""


def sample_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (e.g. ``seed, epoch, index``), independent of call order."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def sample_streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """``(facet_rng, crop_rng)``: two independent generators spawned from ``seed``
    (``numpy.random.SeedSequence(seed).spawn(2)``); what one consumes never shifts the other."""
    facet_seq, crop_seq = np.random.SeedSequence(int(seed)).spawn(2)
    return np.random.default_rng(facet_seq), np.random.default_rng(crop_seq)


def draw_facets(mask: np.ndarray, positives: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Choose up to ``positives`` distinct present facets of one sample.

    Args:
        mask: ``bool [F]`` facet presence.
        positives: P.
        rng: the sample's generator.

    Returns:
        ``int64 [P]`` facet indices (padding slots repeat facet 0) and ``bool [P]`` validity.
    """
    present = np.flatnonzero(mask)
    k = min(positives, len(present))
    idx = np.zeros(positives, np.int64)
    idx[:k] = rng.choice(present, size=k, replace=False)
    valid = np.zeros(positives, bool)
    valid[:k] = True
    return idx, valid


@dataclass
class Sample:
    """One training example (before collation)."""

    key: str
    image: torch.Tensor  # float32 [3, S, S]
    texts: torch.Tensor  # float32 [P, D]
    text_valid: torch.Tensor  # bool [P]
    image_valid: bool = True
    skip_reason: str | None = None


def make_sample(
    key: str,
    image: torch.Tensor | None,
    vectors: np.ndarray,
    mask: np.ndarray,
    transform: Callable,
    positives: int,
    seed: int,
    size: int,
    skip_reason: str | None = None,
) -> Sample:
    """Draw P facets of ``vectors`` (``[F, D]``, ``mask [F]``) and augment ``image`` (``uint8 [3, H, W]``, or
    ``None`` for a failed decode) with ``transform(image, crop_rng)``; the two generators are the independent
    streams of :func:`sample_streams` ``(seed)``, so the crop does not depend on ``positives`` or ``mask``. A
    failed image gives a zero image marked invalid."""
    facet_rng, crop_rng = sample_streams(seed)
    idx, valid = draw_facets(mask, positives, facet_rng)
    texts = torch.from_numpy(np.asarray(vectors[idx], np.float32))
    if image is None:
        return Sample(key, torch.zeros(3, size, size), texts, torch.zeros(positives, dtype=torch.bool), False, skip_reason)
    return Sample(key, transform(image, crop_rng), texts, torch.from_numpy(valid))


def collate(samples: list[Sample]) -> dict[str, Any]:
    """Batch of samples: ``images float32 [B, 3, S, S]``, ``texts float32 [B, P, D]``, ``text_valid bool [B, P]``,
    ``image_valid bool [B]``, ``keys list[str]``, ``skipped dict[str, int]`` (reasons of invalid slots)."""
    return {
        "images": torch.stack([s.image for s in samples]),
        "texts": torch.stack([s.texts for s in samples]),
        "text_valid": torch.stack([s.text_valid for s in samples]),
        "image_valid": torch.tensor([s.image_valid for s in samples]),
        "keys": [s.key for s in samples],
        "skipped": dict(Counter(s.skip_reason for s in samples if s.skip_reason)),
    }


def decode(row: dict[str, Any], manifest_dir: str | Path) -> torch.Tensor:
    """A manifest row's image as ``uint8 [3, H, W]``. Raises one of :data:`IMAGE_ERRORS` if it fails."""
    return TF.pil_to_tensor(load_image(row, manifest_dir))


def split_keys(manifest_dir: str | Path, split: str) -> list[str]:
    """Keys of ``split`` in manifest order. Raises :class:`DataError` naming the splits there are if empty."""
    keys = read_manifest(manifest_dir, columns=["key"], split=split).column("key").to_pylist()
    if not keys:
        counts = read_manifest_info(manifest_dir).counts
        raise DataError(f"manifest {manifest_dir} has no rows in split {split!r} (rows per split: {counts})")
    return keys


def trainable_rows(
    reader: CacheReader, keys: Sequence[str] | pa.Array | pa.ChunkedArray
) -> tuple[np.ndarray, Counter]:
    """The cache row each key trains against, or why it does not: the one place both sources decide which keys
    they train on (the in-memory one when it loads the split, the streamed one when it counts and reads a part).

    A key is skipped as ``missing_vector`` when the cache has no row for it, as ``no_facet`` when its row has no
    present facet (nothing to draw a positive from). Presence comes from the reader's memory-mapped facet mask
    (``lookup/mask.npy``), read only at the rows of ``keys``, so memory grows with ``len(keys)``, not the cache.

    Args:
        reader: the open cache.
        keys: sample keys (``B`` of them).

    Returns:
        ``int64 [B]`` the cache row of each key, ``-1`` where it is skipped, and the skipped keys counted by
        reason (only reasons that occur).
    """
    rows = reader.rows(keys)
    found = np.flatnonzero(rows >= 0)
    no_facet = found[~reader.mask_rows(rows[found]).any(axis=1)] if len(found) else found
    skipped = Counter({"missing_vector": len(rows) - len(found), "no_facet": len(no_facet)})
    rows[no_facet] = -1
    return rows, +skipped


def check_overlap(n_keys: int, skipped: Counter, manifest_dir: Any, cache_dir: Any, split: str) -> None:
    """Raise :class:`DataError` if none of the split's ``n_keys`` keys is trainable: every one counted as
    ``missing_vector`` (no keys in common) or, failing that, as ``missing_vector`` or ``no_facet`` (no present
    facet to train against); ``skipped`` from :func:`trainable_rows`. Both data sources call it."""
    if skipped["missing_vector"] >= n_keys:
        raise DataError(
            f"manifest {manifest_dir} and cache {cache_dir} have no keys in common ({n_keys} keys in split "
            f"{split!r}); was the cache built from this manifest?"
        )
    if skipped["missing_vector"] + skipped["no_facet"] >= n_keys:
        raise DataError(
            f"no key of split {split!r} in manifest {manifest_dir} has a present facet in cache {cache_dir} "
            f"({skipped['missing_vector']} without a row, {skipped['no_facet']} with an all-absent row)"
        )
