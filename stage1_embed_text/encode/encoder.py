"""The stage-1 encoder: captions -> unit facet vectors with facet-decoupled attention (SPEC §2.3, §2.4).

Every present text of a sample becomes one packed sequence (raw: 1 facet, short: 3, long: 7 for FLAME).
Sequences of many samples are bucketed by length into token-budget batches, run through the truncated
base decoder in its dtype with an explicit 4-D mask and explicit position ids, and each facet's vector is
read at its closing quote, optionally passed through the final norm (``post_norm``), and L2-normalized in
float32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from pipeline.cache.store import CacheIdentity
from stage1_embed_text.backends.llm import LoadedLLM
from stage1_embed_text.config import (
    DEFAULT_CONTEXT_TOKENS,
    DEFAULT_MAX_BATCH_TOKENS,
    check_encoder_modes,
    default,
)
from stage1_embed_text.encode.batching import Batch, check_padding_side, collate, facet_mask, plan_batches
from stage1_embed_text.encode.encoded import EncodedSamples, check_template_room, text_identity
from stage1_embed_text.encode.packing import PackedSequence, pack_samples
from stage1_embed_text.encode.prompts import FLAME, PromptSet
from stage1_embed_text.encode.tokenization import group_templates

log = logging.getLogger(__name__)

class FacetEncoder:
    """Embed samples' captions with a frozen LLM and a prompt set (SPEC §2.4).

    Args:
        llm: a :class:`LoadedLLM` (already cut to its readout layer).
        prompt_set: prompt definition; its facets are the output columns (11 for FLAME).
        readout: ``"pre_norm"`` (the block output, official recipe) or ``"post_norm"`` (final norm applied).
        position_mode: ``"restart"`` (each facet continues from the prefix end; equals separate passes) or
            ``"continuous"`` (official numbering).
        context_tokens: longest packed sequence in tokens; longer captions are cut (SPEC §2.4). Recorded as
            the cache identity's ``max_tokens``.
        max_batch_tokens: padded tokens per forward batch (the batch budget, not a context length).
        padding_side: ``"right"`` (default) or ``"left"``; results do not depend on it.
        max_batch_sequences: at most this many sequences per batch (``flame embed --batch-size``).

    Raises:
        stage1_embed_text.config.EmbedConfigError: unknown readout/position mode/padding side, or
            ``context_tokens`` too small for a template.
    """

    def __init__(
        self,
        llm: LoadedLLM,
        prompt_set: PromptSet = FLAME,
        readout: str = "pre_norm",
        position_mode: str = default("position_mode"),
        context_tokens: int = DEFAULT_CONTEXT_TOKENS,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        padding_side: str = "right",
        max_batch_sequences: int | None = None,
    ):
        check_encoder_modes(readout, position_mode)
        check_padding_side(padding_side)
        self.llm = llm
        self.prompt_set = prompt_set
        self.readout = readout
        self.position_mode = position_mode
        self.context_tokens = int(context_tokens)
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_sequences = max_batch_sequences
        self.padding_side = padding_side
        self.facets: tuple[str, ...] = prompt_set.facets
        self.dim: int = llm.hidden_size
        self.templates = group_templates(llm.tokenizer, prompt_set)
        check_template_room(self.templates, self.context_tokens)
        tok = llm.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.device = next(llm.model.parameters()).device
        self.dtype = next(llm.model.parameters()).dtype

    def identity(self) -> CacheIdentity:
        """The cache identity of vectors this encoder produces (every field filled)."""
        return text_identity(
            name=self.llm.name, fingerprint=self.llm.fingerprint, layer=self.llm.layer, readout=self.readout,
            dim=self.dim, prompt_set=self.prompt_set, position_mode=self.position_mode,
            context_tokens=self.context_tokens, dtype=self.llm.dtype, backend="hf",
        )

    def encode(
        self,
        samples: Sequence[Mapping[str, str | None]],
        progress: Callable[[int, int], None] | None = None,
    ) -> EncodedSamples:
        """Embed every present text of ``samples``.

        Args:
            samples: mappings with keys ``"raw"``, ``"short"``, ``"long"``; a missing key, ``None`` or a blank
                caption makes that group absent (mask False, zero vectors, 0 tokens).
            progress: called as ``progress(n_sequences_done, n_tokens_done)`` (cumulative, unpadded tokens)
                after each forward batch.

        Returns:
            :class:`~stage1_embed_text.encode.encoded.EncodedSamples` with ``n = len(samples)`` rows in input order.
        """
        items = pack_samples(self.llm.tokenizer, self.templates, self.prompt_set, samples, self.context_tokens)
        out = EncodedSamples.for_texts(len(samples), len(self.facets), self.dim, items, self.context_tokens)
        done_seqs = done_tokens = 0
        for idx in plan_batches([len(it.seq) for it in items], self.max_batch_tokens, self.max_batch_sequences):
            batch_items = [items[i] for i in idx]
            vecs = self._forward([it.seq for it in batch_items])
            k = 0
            for it in batch_items:
                m = len(it.seq.seg_lens)
                cols = slice(it.facet_start, it.facet_start + m)
                out.vectors[it.row, cols] = vecs[k : k + m]
                out.mask[it.row, cols] = True
                k += m
            done_seqs += len(batch_items)
            done_tokens += sum(len(it.seq) for it in batch_items)
            if progress is not None:
                progress(done_seqs, done_tokens)
        return out

    @torch.inference_mode()
    def _forward(self, seqs: Sequence[PackedSequence]) -> np.ndarray:
        """``float32 [R, D]`` unit vectors of all facets of ``seqs`` (sequence order, then facet order)."""
        batch = collate(seqs, self.pad_id, self.position_mode, self.padding_side)
        hidden = self.llm.model(
            input_ids=batch.input_ids.to(self.device),
            position_ids=batch.position_ids.to(self.device),
            attention_mask=self._masks(batch),
            use_cache=False,
        ).last_hidden_state
        h = hidden[batch.readout_rows.to(self.device), batch.readout_cols.to(self.device)]
        if self.readout == "post_norm":
            h = self.llm.final_norm(h)
        h = h.float()
        h = h / h.norm(dim=-1, keepdim=True)
        return h.cpu().numpy()

    def _masks(self, batch: Batch) -> torch.Tensor | dict[str, torch.Tensor]:
        """One mask if every block attends alike, else ``{"full_attention": ..., "sliding_attention": ...}``."""
        kinds = sorted(set(self.llm.layer_types)) or ["full_attention"]
        longest = int(batch.position_ids.max()) + 1
        window = self.llm.sliding_window
        masks = {}
        full = None
        for kind in kinds:
            w = window if kind == "sliding_attention" and window is not None and window < longest else None
            if w is None:
                full = full if full is not None else facet_mask(batch.segments, batch.position_ids, self.dtype)
                masks[kind] = full
            else:
                masks[kind] = facet_mask(batch.segments, batch.position_ids, self.dtype, w)
        masks = {k: v.to(self.device) for k, v in masks.items()}
        if len(masks) == 1:
            return next(iter(masks.values()))
        return masks
