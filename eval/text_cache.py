"""On-disk cache of eval text vectors, keyed by (text-side identity, text mode, text).

Layout (default root ``$FLAME_HOME/eval-text-cache``, or ``--text-cache DIR``)::

    ROOT/<identity hash>/identity.json          the identity fields hashed (for people)
    ROOT/<identity hash>/<mode>/chunk-<h>.npz    hashes: S64 [n] sha256 hex of each text (UTF-8)
                                                 vectors: float32 [n, D], unit norm

The identity hash is the sha256 of the canonical JSON of the identity fields that must match
(:data:`pipeline.cache.store.IDENTITY_KEYS`, those present), so a vector is reused only for the same LLM weights,
layer, readout, D, prompt set and position mode. Each :meth:`TextVectorCache.put` writes one new chunk
atomically (temp file + rename); concurrent writers therefore never corrupt each other, at worst they store
a text twice, and readers take the first copy.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import atomic_write_bytes
from pipeline.cache.store import IDENTITY_KEYS
from pipeline.paths import flame_home

log = logging.getLogger(__name__)


def default_root() -> Path:
    """``$FLAME_HOME/eval-text-cache``."""
    return flame_home() / "eval-text-cache"


def identity_hash(identity: dict[str, Any]) -> str:
    """First 16 hex digits of sha256 over the essential identity fields (canonical JSON)."""
    essential = {k: identity[k] for k in IDENTITY_KEYS if k in identity}
    blob = json.dumps(essential, sort_keys=True, ensure_ascii=False, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def text_hash(text: str) -> str:
    """sha256 hex of the UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class TextVectorCache:
    """Get and put text vectors of one identity and one mode.

    Args:
        root: cache root directory (created).
        identity: the text side's identity dict (stage-1 cache identity).
        mode: ``"single"`` or ``"multi"``.
    """

    def __init__(self, root: str | Path, identity: dict[str, Any], mode: str):
        self.base = Path(root) / identity_hash(identity)
        self.dir = self.base / mode
        self.dir.mkdir(parents=True, exist_ok=True)
        info = self.base / "identity.json"
        if not info.exists():
            atomic_write_bytes(info, json.dumps({k: identity.get(k) for k in IDENTITY_KEYS}, indent=2,
                                           default=list).encode())
        self._vectors: dict[str, np.ndarray] = {}
        for chunk in sorted(self.dir.glob("chunk-*.npz")):
            with np.load(chunk) as z:
                for h, v in zip(z["hashes"].astype(str), z["vectors"]):
                    self._vectors.setdefault(h, v)
        log.debug("text cache %s: %d vectors", self.dir, len(self._vectors))

    def __len__(self) -> int:
        return len(self._vectors)

    def get(self, texts: Sequence[str]) -> tuple[np.ndarray | None, list[int]]:
        """Cached vectors for ``texts`` and the positions that are missing.

        Returns:
            ``float32 [n, D]`` with zero rows at missing positions (``None`` when nothing is cached yet), and
            the list of missing positions.
        """
        hashes = [text_hash(t) for t in texts]
        missing = [i for i, h in enumerate(hashes) if h not in self._vectors]
        if not self._vectors:
            return None, missing
        dim = len(next(iter(self._vectors.values())))
        out = np.zeros((len(texts), dim), np.float32)
        for i, h in enumerate(hashes):
            if h in self._vectors:
                out[i] = self._vectors[h]
        return out, missing

    def put(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Store ``vectors`` (``float [n, D]``) for ``texts`` in one new chunk."""
        if not texts:
            return
        hashes = np.array([text_hash(t) for t in texts], dtype="S64")
        vectors = np.asarray(vectors, np.float32)
        name = f"chunk-{hashlib.sha256(hashes.tobytes()).hexdigest()[:16]}.npz"
        buf = io.BytesIO()
        np.savez(buf, hashes=hashes, vectors=vectors)
        atomic_write_bytes(self.dir / name, buf.getvalue())
        for h, v in zip(hashes.astype(str), vectors):
            self._vectors.setdefault(h, v)
