"""Image and text embedding for evaluation, with progress bars and the on-disk text-vector cache.

- Images: the exported stage-2 encoder (``model(images) -> [B, D]`` L2-normalized; ``model.features(images)
  -> [B, width]`` before the projector, for the linear probe), fed by ``eval_transform(config["image"])``.
- Texts: the stage-1 :class:`stage1_embed_text.api.TextEmbedder` built from the cache identity in the model's
  ``config.json`` (SPEC §3: the text side must be the one the model was trained against; a mismatch is
  refused with :class:`pipeline.cache.store.CacheIdentityError`). Vectors are cached by
  :class:`eval.text_cache.TextVectorCache` and reused across runs. A model that carries its own text tower
  (``config["text_side"]``) embeds texts with it instead (:func:`load_model_text_encoder`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from eval.text_cache import TextVectorCache
from manifests.images import UndecodableImageError
from manifests.schema import ManifestError
from pipeline.cache.meta import identity_differences
from pipeline.cache.store import NORM_TOLERANCE, CacheIdentityError
from pipeline.errors import FlameError
from stage1_embed_text.api import TextEmbedder
from stage1_embed_text.config import check_text_mode
from stage2_train_vision.text_tower import TEXT_SIDE_KIND, TextTowerConfig, TowerTextEncoder

log = logging.getLogger(__name__)


class EmbedderError(FlameError, ValueError):
    """A text embedder that returned vectors of the wrong shape, or not finite and unit-norm."""


class ModelConfigError(FlameError, ValueError):
    """An exported model directory whose ``config.json`` lacks what eval needs (the cache identity or a known
    text side)."""


#: What opening a benchmark image may raise; each is a counted, logged skip (:func:`image_skip_reason`).
IMAGE_ERRORS = (UndecodableImageError, ManifestError, OSError)
#: Skipped images logged one by one; later ones are only counted.
LOGGED_SKIPS = 10


def image_skip_reason(exc: BaseException) -> str:
    """The reason an image that failed to open is counted under.

    ``undecodable_image`` (not an image, truncated, HTML saved as .jpg), ``image_too_large`` (over Pillow's
    decompression-bomb limit), ``no_image`` (missing file or tar member, no reference) or ``unreadable_image``
    (any other read error: permissions, a broken tar).
    """
    if isinstance(exc, UndecodableImageError):
        return exc.reason
    if isinstance(exc, (FileNotFoundError, ManifestError)):
        return "no_image"
    return "unreadable_image"


class _ImageDataset(Dataset):
    """Item ``i``: ``(i, float [3, H, W] tensor, None)``, or ``(i, None, (reason, message))`` if image ``i``
    fails to open (decoding runs in DataLoader workers, so failures travel back as data, not exceptions)."""

    def __init__(self, images: Sequence[Any], transform: Callable):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, tuple[str, str] | None]:
        try:
            image = self.images[i].open()
        except IMAGE_ERRORS as exc:
            return i, None, (image_skip_reason(exc), str(exc))
        return i, self.transform(image), None


def _collate(items: list[tuple[int, torch.Tensor | None, tuple[str, str] | None]]):
    """``(indices of the decoded images, float [b, 3, H, W] or None, [(index, (reason, message))])``."""
    decoded = [(i, x) for i, x, _ in items if x is not None]
    failed = [(i, f) for i, _, f in items if f is not None]
    return [i for i, _ in decoded], (torch.stack([x for _, x in decoded]) if decoded else None), failed


class ImageEmbeddings(NamedTuple):
    """What :func:`embed_images` returns.

    Attributes:
        embeddings: ``float32 [N, D]``, one row per input image in input order; rows of failed images are NaN.
        features: ``float32 [N, W]`` pre-projector features (NaN rows likewise), or ``None``.
        failed: ``{input index: (reason, message)}`` of the images that did not open (reasons of
            :func:`image_skip_reason`).
    """

    embeddings: np.ndarray
    features: np.ndarray | None
    failed: dict[int, tuple[str, str]]


@torch.no_grad()
def embed_images(model: torch.nn.Module, images: Sequence[Any], transform: Callable, batch_size: int = 64,
                 device: str | torch.device = "cpu", features: bool = False, workers: int = 0,
                 desc: str = "images") -> ImageEmbeddings:
    """Embed images with the exported encoder; an image that does not open is skipped, logged and reported.

    Args:
        model: ``model(x) -> [B, D]`` (L2-normalized) and, if ``features``, ``model.features(x) -> [B, W]``.
        images: objects with ``.open() -> PIL.Image`` (e.g. :class:`eval.benchmarks.base.ImageRef`) that raise
            one of :data:`IMAGE_ERRORS` for a bad image.
        transform: PIL image -> ``float [3, H, W]`` tensor (``eval_transform(config["image"])``).
        batch_size: images per forward pass (fewer when some of a batch fail).
        device: where the model runs.
        features: also return the pre-projector features.
        workers: DataLoader worker processes decoding images.
        desc: progress-bar and log label.

    Returns:
        :class:`ImageEmbeddings`; the first :data:`LOGGED_SKIPS` failures are logged as warnings.
    """
    model.eval().to(device)
    loader = DataLoader(_ImageDataset(images, transform), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate)
    kept: list[int] = []
    embs: list[np.ndarray] = []
    feats: list[np.ndarray] = []
    failed: dict[int, tuple[str, str]] = {}
    for ids, x, bad in tqdm(loader, desc=f"embed {desc}", unit="batch", leave=False):
        for i, (reason, message) in bad:
            if len(failed) < LOGGED_SKIPS:
                log.warning("%s: skipping image %d (%s): %s", desc, i, reason, message)
            failed[i] = (reason, message)
        if x is None:
            continue
        x = x.to(device)
        kept.extend(ids)
        embs.append(model(x).float().cpu().numpy())
        if features:
            feats.append(model.features(x).float().cpu().numpy())
    if len(failed) > LOGGED_SKIPS:
        log.warning("%s: %d more images skipped, not logged one by one", desc, len(failed) - LOGGED_SKIPS)

    def by_input_index(parts: list[np.ndarray]) -> np.ndarray:
        out = np.full((len(images), parts[0].shape[1] if parts else 0), np.nan, np.float32)
        if parts:
            out[kept] = np.concatenate(parts)
        return out

    return ImageEmbeddings(by_input_index(embs), by_input_index(feats) if features else None, failed)


def check_identity(expected: dict[str, Any], loaded: dict[str, Any]) -> None:
    """Refuse a text side whose identity differs from the one the model was trained against.

    Compares the fields of :data:`pipeline.cache.store.IDENTITY_KEYS` present in both dicts; ``llm`` (a name or a
    path, which may legitimately differ) is skipped when both carry an ``llm_fingerprint`` of the weights
    (:func:`pipeline.cache.meta.identity_differences`).

    Raises:
        CacheIdentityError: naming each differing field with both values.
    """
    diffs = [f"{k}: model was trained against {want!r}, text embedder has {got!r}"
             for k, want, got in identity_differences(expected, loaded, llm_by_fingerprint=True)]
    if diffs:
        raise CacheIdentityError("text side does not match the model's cache identity: " + "; ".join(diffs))


def embedder_identity(embedder: Any) -> dict[str, Any] | None:
    """The identity an embedder produces vectors of, as a dict, or None when it reports none.

    Looked up as ``embedder.identity`` (dict, :class:`pipeline.cache.store.CacheIdentity` or a method returning
    one), else ``embedder.encoder.identity()`` (the stage-1 :class:`TextEmbedder`).
    """
    ident = getattr(embedder, "identity", None)
    if ident is None and hasattr(getattr(embedder, "encoder", None), "identity"):
        ident = embedder.encoder.identity
    if callable(ident):
        ident = ident()
    if ident is None:
        return None
    return ident.to_dict() if hasattr(ident, "to_dict") else dict(ident)


class TextEncoder:
    """Embeds eval texts through a stage-1 embedder, deduplicated and cached on disk.

    Args:
        embedder: has ``embed(texts, mode) -> float32 [n, D]`` unit-norm rows.
        identity: the model's cache identity (``config["cache_identity"]``); keys the cache.
        cache_root: directory of the :class:`eval.text_cache.TextVectorCache`.
        batch_size: texts per ``embed`` call.

    Raises:
        CacheIdentityError: the embedder reports an identity that differs from ``identity``.
    """

    def __init__(self, embedder: Any, identity: dict[str, Any], cache_root: str | Path, batch_size: int = 32):
        loaded = embedder_identity(embedder)
        if loaded is None:
            log.warning("text embedder reports no identity; only its output dimension is checked")
        else:
            check_identity(identity, loaded)
        self.embedder, self.identity = embedder, identity
        self.cache_root, self.batch_size = Path(cache_root), batch_size
        self._caches: dict[str, TextVectorCache] = {}

    def _cache(self, mode: str) -> TextVectorCache:
        if mode not in self._caches:
            self._caches[mode] = TextVectorCache(self.cache_root, self.identity, mode)
        return self._caches[mode]

    def encode(self, texts: Sequence[str], mode: str, desc: str = "texts") -> np.ndarray:
        """Vectors for ``texts`` in text mode ``mode`` (SPEC §6), ``float32 [n, D]``, unit norm.

        Identical texts are embedded once; texts already in the on-disk cache are not embedded again.

        Raises:
            stage1_embed_text.config.EmbedConfigError: unknown mode.
            EmbedderError: the embedder returned vectors of the wrong shape, not finite or not unit norm
                (``|‖v‖ - 1|`` over :data:`pipeline.cache.store.NORM_TOLERANCE`); nothing of the batch is cached.
        """
        check_text_mode(mode)
        uniq = list(dict.fromkeys(texts))
        cache = self._cache(mode)
        cached, missing = cache.get(uniq)
        log.info("%s (%s): %d texts, %d unique, %d cached, %d to embed", desc, mode, len(texts), len(uniq),
                 len(uniq) - len(missing), len(missing))
        new = [uniq[i] for i in missing]
        parts = []
        bar = tqdm(total=len(new), desc=f"embed {desc} ({mode})", unit="text", leave=False)
        for start in range(0, len(new), self.batch_size):
            batch = new[start : start + self.batch_size]
            vec = np.asarray(self.embedder.embed(batch, mode=mode), dtype=np.float32)
            self._check(vec, len(batch))
            cache.put(batch, vec)
            parts.append(vec)
            bar.update(len(batch))
        bar.close()
        if cached is None:
            vectors = np.concatenate(parts) if parts else np.zeros((0, self.identity.get("dim", 0)), np.float32)
        else:
            vectors = cached
            if parts:
                vectors[missing] = np.concatenate(parts)
        row = {t: i for i, t in enumerate(uniq)}
        return vectors[[row[t] for t in texts]] if len(texts) else vectors[:0]

    def _check(self, vec: np.ndarray, n: int) -> None:
        dim = self.identity.get("dim")
        if vec.ndim != 2 or vec.shape[0] != n or (dim is not None and vec.shape[1] != dim):
            raise EmbedderError(f"text embedder returned {vec.shape}, expected [{n}, {dim}]")
        if (not np.isfinite(vec).all()
                or np.abs(np.linalg.norm(vec, axis=1) - 1).max(initial=0) > NORM_TOLERANCE):
            raise EmbedderError("text embedder returned vectors that are not finite and unit-norm")


def load_model_text_encoder(model: torch.nn.Module, config: dict[str, Any], device: str | None = None):
    """The text side of a model that carries its own text tower (``config["text_side"]``, exported by
    :mod:`stage2_train_vision.text_tower`): ``encode(texts, mode, desc) -> float32 [n, D]`` unit rows.

    Raises:
        ModelConfigError: ``config["text_side"]`` names an unknown kind.
    """
    side = config["text_side"]
    if side.get("kind") != TEXT_SIDE_KIND:
        raise ModelConfigError(f"unknown text_side kind {side.get('kind')!r} (known: {TEXT_SIDE_KIND})")
    return TowerTextEncoder(model.text_tower, TextTowerConfig.from_dict(side),
                            device=device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_text_encoder(identity: dict[str, Any], cache_root: str | Path, batch_size: int = 32) -> TextEncoder:
    """Build the stage-1 text embedder named by ``identity`` and wrap it in a cached :class:`TextEncoder`."""
    return TextEncoder(TextEmbedder.from_identity(identity), identity, cache_root, batch_size)
