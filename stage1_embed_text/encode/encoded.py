"""What both stage-1 backends produce and record: per-sample facet vectors and the cache identity (SPEC §2.4, §3).

The ``hf`` backend (:class:`stage1_embed_text.encode.encoder.FacetEncoder`) and the ``vllm`` backend
(:class:`stage1_embed_text.backends.vllm_backend.VllmFacetEncoder`) pack with the same code
(:func:`stage1_embed_text.encode.packing.pack_samples`), return :class:`EncodedSamples` and name their vectors with
:func:`text_identity`, so the job writes one cache format and stage 2 / eval cannot tell the backends apart.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.cache.store import CacheIdentity
from stage1_embed_text.config import EmbedConfigError
from stage1_embed_text.encode.packing import PackedText
from stage1_embed_text.encode.prompts import GROUPS, PromptSet
from stage1_embed_text.encode.tokenization import TOKENIZATION, GroupTemplate

log = logging.getLogger(__name__)

@dataclass
class EncodedSamples:
    """Facet vectors of ``n`` samples, one row per sample in input order.

    Attributes:
        vectors: ``float32 [n, F, D]``; unit-norm for present facets, zeros for absent ones.
        mask: ``bool [n, F]`` facet presence (a group is absent when its caption is missing/None/blank).
        tokens: ``int32 [n, 3]`` packed-sequence length of the raw/short/long sequence (0 if absent).
        truncated: ``bool [n, 3]`` caption tokens of the raw/short/long sequence were cut to fit.
    """

    vectors: np.ndarray
    mask: np.ndarray
    tokens: np.ndarray
    truncated: np.ndarray

    @classmethod
    def for_texts(
        cls, n: int, n_facets: int, dim: int, items: Sequence[PackedText], context_tokens: int
    ) -> EncodedSamples:
        """All-absent results for ``n`` samples with ``tokens``/``truncated`` filled from the packed ``items``.

        Both backends start here and then write each facet's vector and presence. ``context_tokens`` (the
        longest packed sequence) only names the limit in the log line about cut captions.
        """
        out = cls(
            vectors=np.zeros((n, n_facets, dim), np.float32),
            mask=np.zeros((n, n_facets), bool),
            tokens=np.zeros((n, len(GROUPS)), np.int32),
            truncated=np.zeros((n, len(GROUPS)), bool),
        )
        for it in items:
            out.tokens[it.row, it.group] = len(it.seq)
            out.truncated[it.row, it.group] = it.seq.truncated
        cut = int(out.truncated.sum())
        if cut:
            log.info("%d of %d sequences had their caption cut to max_tokens=%d", cut, len(items), context_tokens)
        return out


def check_template_room(templates: Mapping[str, GroupTemplate], context_tokens: int) -> None:
    """Refuse a context length that leaves no token for a caption in some group.

    Raises:
        stage1_embed_text.config.EmbedConfigError: a group's template alone (empty caption) takes
            ``context_tokens`` tokens or more.
    """
    for name, t in templates.items():
        if t.fixed_len >= context_tokens:
            raise EmbedConfigError(
                f"max_tokens={context_tokens} leaves no room for a caption in group {name!r} "
                f"(template alone is {t.fixed_len} tokens)"
            )


def text_identity(
    *, name: str, fingerprint: str, layer: int, readout: str, dim: int, prompt_set: PromptSet,
    position_mode: str, context_tokens: int, dtype: str, backend: str,
) -> CacheIdentity:
    """The cache identity (SPEC §3) of vectors from either backend.

    The tokenizer always comes from the model's own source, so it is named by the model, and both backends pack
    with :func:`~stage1_embed_text.encode.packing.pack_samples` (``tokenization="whole-prompt"``). The context length
    ``context_tokens`` is stored under the identity's on-disk field name ``max_tokens``.
    """
    return CacheIdentity(
        llm=name,
        llm_fingerprint=fingerprint,
        tokenizer=name,
        layer=layer,
        readout=readout,
        dim=dim,
        prompt_set=prompt_set.name,
        prompt_set_hash=prompt_set.content_hash,
        facets=prompt_set.facets,
        position_mode=position_mode,
        bos_marker=prompt_set.bos_marker,
        max_tokens=context_tokens,
        dtype_compute=dtype,
        dtype_stored="float16",
        backend=backend,
        tokenization=TOKENIZATION,
    )
