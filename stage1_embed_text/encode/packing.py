"""Packing captions into facet-decoupled sequences (SPEC §2.4).

One present text of one group becomes one packed sequence ``prefix + segment_1 + ... + segment_K`` whose facet
``i`` part, ``prefix + segment_i``, is the tokenizer's whole-string tokenization of that single-facet prompt
text (:mod:`stage1_embed_text.encode.tokenization`). Facet ``i`` is read at the last token of its segment, found from
the segment lengths, never by searching for a token.

A sequence longer than the context length (``context_tokens``) loses caption *text* from its end, cut where a
caption token starts (character offsets, ``return_offsets_mapping``), and the shortened prompt is tokenized
again, so a truncated sequence is still the whole-string tokenization of its (shorter) prompt text. Template
words and facets are never cut.

Batching packed sequences into model inputs and masks is :mod:`stage1_embed_text.encode.batching`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from stage1_embed_text.config import POSITION_MODES, EmbedConfigError
from stage1_embed_text.encode.prompts import GROUPS, PromptSet, prompt_captions
from stage1_embed_text.encode.tokenization import (
    GroupTemplate,
    assemble_ids,
    plain_encode,
)


@dataclass(frozen=True)
class PackedSequence:
    """One packed text: ``prefix + facet segments`` as token ids.

    Attributes:
        ids: ``int64 [L]`` token ids.
        n_prefix: tokens of the prefix (shared by every facet).
        seg_lens: tokens of each facet segment.
        truncated: caption text was cut to fit ``context_tokens``.
    """

    ids: np.ndarray
    n_prefix: int
    seg_lens: tuple[int, ...]
    truncated: bool

    def __len__(self) -> int:
        return len(self.ids)

    def segment_ids(self) -> np.ndarray:
        """``int64 [L]``: 0 for prefix tokens, ``i`` (1-based) for facet ``i``'s tokens."""
        return np.repeat(np.arange(len(self.seg_lens) + 1), (self.n_prefix,) + self.seg_lens)

    def positions(self, mode: str) -> np.ndarray:
        """``int64 [L]`` position ids: ``continuous`` = 0..L-1; ``restart`` = every facet continues from the
        end of the prefix, so facet ``i`` sees the positions it would have in ``prefix + segment_i`` alone."""
        if mode == "continuous":
            return np.arange(len(self.ids))
        if mode != "restart":
            raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {mode!r}")
        parts = [np.arange(self.n_prefix)] + [self.n_prefix + np.arange(n) for n in self.seg_lens]
        return np.concatenate(parts)

    def readout(self) -> np.ndarray:
        """``int64 [K]`` index of each facet's last token (its closing quote)."""
        return self.n_prefix + np.cumsum(self.seg_lens) - 1


def pack_caption(
    tokenizer, template: GroupTemplate, caption: str, context_tokens: int, encoded: tuple | None = None
) -> PackedSequence:
    """Pack one cleaned caption: facet ``i`` is the whole-string tokenization of ``prefix + segment_i``.

    A sequence longer than ``context_tokens`` keeps the longest start of the caption, cut where one of its tokens
    starts (character offsets of the first tokenization), whose re-tokenized prompt fits: found by galloping
    from the estimate "drop as many caption tokens as the sequence is over", then bisecting; a few tokenizer
    calls, each at most as long as the first.

    Args:
        tokenizer: the tokenizer ``template`` was built with.
        template: the group's template (:func:`group_templates`).
        caption: the cleaned caption (SPEC §2.1), ``""`` allowed.
        context_tokens: longest packed sequence; a longer one loses caption text from its end, never template
            words or facets.
        encoded: ``(ids, offsets)`` from :func:`plain_encode` of the prefix text with ``offsets=True``, if
            already computed (:func:`pack_samples` tokenizes a group's prefixes in one call).

    Returns:
        The packed sequence (``truncated`` set if caption text was cut).

    Raises:
        stage1_embed_text.config.EmbedConfigError: the template alone (empty caption) does not fit
            ``context_tokens`` (the encoders refuse such a context up front:
            :func:`~stage1_embed_text.encode.encoded.check_template_room`).
    """
    if encoded is None:
        enc = plain_encode(tokenizer, [template.prefix_text(caption)], offsets=True)
        encoded = enc["input_ids"][0], enc["offset_mapping"][0]
    ids, offsets = encoded
    whole = assemble_ids(tokenizer, template, caption, ids)
    if len(whole[0]) <= context_tokens:
        return PackedSequence(np.asarray(whole[0], dtype=np.int64), whole[1], whole[2], False)

    h = len(template.head_text)
    cuts = sorted({s - h for s, _ in offsets if h <= s < h + len(caption)} | {0})

    def fitting(j: int):
        c = caption[: cuts[j]]
        prefix_ids = plain_encode(tokenizer, [template.prefix_text(c)])["input_ids"][0]
        r = assemble_ids(tokenizer, template, c, prefix_ids)
        return r if len(r[0]) <= context_tokens else None

    # caption[:cuts[lo]] fits, caption[:cuts[hi]] does not (hi = len(cuts) stands for the whole caption)
    lo, hi, best = -1, len(cuts), None
    j = min(max(len(cuts) - (len(whole[0]) - context_tokens), 0), len(cuts) - 1)
    step = 1
    if (r := fitting(j)) is not None:
        lo, best = j, r
        while lo + step < hi:
            if (r := fitting(lo + step)) is None:
                hi = lo + step
                break
            lo, best, step = lo + step, r, step * 2
    else:
        hi = j
        while hi > 0:
            k = max(hi - step, 0)
            if (r := fitting(k)) is not None:
                lo, best = k, r
                break
            hi, step = k, step * 2
    while hi - lo > 1:
        m = (lo + hi) // 2
        if (r := fitting(m)) is not None:
            lo, best = m, r
        else:
            hi = m
    if best is None:
        raise EmbedConfigError(
            f"max_tokens={context_tokens} cannot hold the prompt template ({template.fixed_len} tokens)"
        )
    return PackedSequence(np.asarray(best[0], dtype=np.int64), best[1], best[2], True)


@dataclass(frozen=True)
class PackedText:
    """One present text of a sample, packed (SPEC §2.4).

    Attributes:
        row: index of the sample in the batch given to :func:`pack_samples`.
        group: index into :data:`~stage1_embed_text.encode.prompts.GROUPS` (raw, short, long).
        facet_start: first facet column of the group in the ``[n, F, D]`` output.
        seq: the packed ``prefix + segment_1 + ... + segment_K`` sequence.
    """

    row: int
    group: int
    facet_start: int
    seq: PackedSequence

    def request(self, facet: int) -> list[int]:
        """Token ids of ``prefix + segment_facet``: the single-facet prompt the packed pass equals in ``restart`` mode."""
        ends = self.seq.n_prefix + np.cumsum((0,) + tuple(self.seq.seg_lens))
        ids = self.seq.ids
        return ids[: self.seq.n_prefix].tolist() + ids[ends[facet] : ends[facet + 1]].tolist()


def pack_samples(
    tokenizer, templates, prompt_set: PromptSet, samples: Sequence[Mapping[str, str | None]], context_tokens: int
) -> list[PackedText]:
    """Pack every present text of ``samples`` (one place, used by the ``hf`` and ``vllm`` backends alike).

    Each caption is cleaned by :func:`~stage1_embed_text.encode.prompts.prompt_captions` (SPEC §2.1; the texts
    the planner digested; an absent or blank caption yields no text), its group's prefix text
    is tokenized (one batched call per group, caption special-token text kept plain), and
    :func:`pack_caption` builds the sequence, cutting caption text, never template words or facets, to fit
    ``context_tokens``. Facet ``k`` of every item, ``item.request(k)``, equals the tokenizer's ids of the prompt
    text ``prefix + segment_k``.

    Args:
        tokenizer: the LLM's tokenizer (the one ``templates`` were built with).
        templates: ``{group: template}`` from :func:`group_templates`.
        prompt_set: the prompt set the templates were built from.
        samples: dicts with ``"raw"``, ``"short"``, ``"long"`` captions (missing or ``None`` = absent).
        context_tokens: longest packed sequence.

    Returns:
        The packed texts, group by group, in sample order within a group.

    Raises:
        ValueError: ``context_tokens`` cannot hold a group's template.
    """
    items: list[PackedText] = []
    cleaned = prompt_captions(prompt_set, samples)
    for g in prompt_set.groups:
        rows = [r for r, c in enumerate(cleaned[g.name]) if c is not None]
        captions = [cleaned[g.name][r] for r in rows]
        if not captions:
            continue
        t = templates[g.name]
        enc = plain_encode(tokenizer, [t.prefix_text(c) for c in captions], offsets=True)
        start = prompt_set.facet_slice(g.name).start
        for r, c, ids, offs in zip(rows, captions, enc["input_ids"], enc["offset_mapping"]):
            seq = pack_caption(tokenizer, t, c, context_tokens, encoded=(ids, offs))
            items.append(PackedText(r, GROUPS.index(g.name), start, seq))
    return items
