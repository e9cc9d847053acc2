"""Embed free texts the way a cache was built (for evaluation, SPEC §6).

:class:`TextEmbedder` loads the LLM, layer, readout, position mode and prompt set named in a cache identity,
so eval's text vectors live in the same space as the vectors stage 2 trained against.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.cache.store import CacheIdentity, CacheIdentityError
from stage1_embed_text.backends import EncoderSpec, TextEncoder, build_encoder
from stage1_embed_text.config import EmbedConfigError, check_text_mode
from stage1_embed_text.encode.prompts import is_absent

log = logging.getLogger(__name__)

class TextEmbedder:
    """Texts -> unit vectors in a cache's space: ``single`` (raw prompt) or ``multi`` (mean of long facets).

    Args:
        encoder: a stage-1 encoder (:class:`~stage1_embed_text.backends.registry.TextEncoder`) whose prompt set
            has a ``raw`` group (for ``single``) and/or a ``long`` group (for ``multi``).
    """

    def __init__(self, encoder: TextEncoder):
        self.encoder = encoder

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @classmethod
    def from_identity(cls, identity: dict[str, Any] | CacheIdentity, dtype: str | None = None,
                      device: str | None = None) -> TextEmbedder:
        """Load what ``identity`` names (LLM, layer, readout, position mode, prompt set, ``<s>`` marker).

        Args:
            identity: a :class:`CacheIdentity` or its dict (e.g. ``CacheReader(...).identity``).
            dtype: compute dtype; default the identity's ``dtype_compute``.
            device: where the LLM runs (``"cpu"``, ``"cuda"``, ...); default CPU.

        Raises:
            CacheIdentityError: the identity's prompt-set hash is not this code's hash of that set (the prompt
                text changed), or the weights loaded have another fingerprint, or another D; the message names
                both values.
        """
        ident = identity if isinstance(identity, CacheIdentity) else CacheIdentity.from_dict(identity)
        spec = EncoderSpec.of_identity(ident, dtype)
        prompt_set = spec.prompt_set
        if prompt_set.content_hash != ident.prompt_set_hash:
            raise CacheIdentityError(
                f"prompt set {ident.prompt_set!r}: cache has hash {ident.prompt_set_hash}, this code's "
                f"definition hashes to {prompt_set.content_hash} (the prompts changed; re-embed or use the "
                f"package version that built the cache)"
            )
        encoder = build_encoder(spec, device)
        encoder.identity().check(
            {"llm_fingerprint": ident.llm_fingerprint, "dim": ident.dim}, what=f"LLM loaded from {ident.llm!r}"
        )
        return cls(encoder)

    def embed(self, texts: Sequence[str], mode: str = "single") -> np.ndarray:
        """Embed ``texts``.

        Args:
            texts: captions or class prompts (cleaned and templated like training captions, SPEC §2.1).
            mode: ``"single"``: the raw single-prompt vector; ``"multi"``: the long group's facets (7 for FLAME),
                each L2-normalized, averaged, renormalized (SPEC §6).

        Returns:
            ``float32 [n, D]``, unit-norm rows.

        Raises:
            stage1_embed_text.config.EmbedConfigError: unknown mode, the prompt set lacks the group the mode needs,
                or a blank text.
        """
        check_text_mode(mode)
        group = "raw" if mode == "single" else "long"
        ps = self.encoder.prompt_set
        if group not in ps.group_names:
            raise EmbedConfigError(f"mode {mode!r} needs a {group!r} group; prompt set {ps.name!r} has {ps.group_names}")
        blank = [i for i, t in enumerate(texts) if is_absent(t)]
        if blank:
            raise EmbedConfigError(f"cannot embed blank texts (positions {blank[:5]})")
        out = self.encoder.encode([{group: t} for t in texts])
        vecs = out.vectors[:, ps.facet_slice(group)]
        if mode == "single":
            return np.ascontiguousarray(vecs[:, 0])
        mean = vecs.mean(axis=1)
        return mean / np.linalg.norm(mean, axis=-1, keepdims=True)
