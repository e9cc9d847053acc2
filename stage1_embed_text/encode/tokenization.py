"""Whole-prompt tokenization (SPEC §2.4): how a group's prompt text becomes token ids, for one tokenizer.

One text of one group becomes ``prefix + segment_1 + ... + segment_K`` whose facet ``i`` part, ``prefix +
segment_i``, is token for token the tokenizer's ids of the rendered single-facet prompt text (whole-string
tokenization, with the tokenizer's own leading special tokens such as BOS). Tokenizing the template words and
the caption separately is *not* that: tokenizers merge across the caption's edges (Gemma-3 and SmolLM2 have
one ``."`` token for the caption's final ``.`` and the closing quote).

How the ids are made:

* the prefix (template words + caption) is tokenized as one string, the caption's special-token strings as
  plain text (``split_special_tokens=True``: ``a cat <eos> on a mat`` never yields the EOS id);
* each facet segment is tokenized once per tokenizer *in context*, as the tokens that follow a prefix in the
  whole string (tokenizing it alone can differ: SentencePiece marks the start of a string with a word
  boundary);
* :func:`group_templates` checks, on probe captions, that ``prefix ids + segment ids`` equals the
  whole-string tokenization. That holds when no token spans the prefix/segment boundary; the text on both
  sides of it is fixed template text (``... step by step ,`` | `` this image ...``), so the probe result holds
  for every caption. Byte-level BPE (Llama-3, Qwen, Mistral-Nemo, SmolLM2) splits there by its pre-tokenizer
  regex; SentencePiece BPE (Gemma-3, Llama-2) has no token with a word-start marker after other characters.
  Where the check fails (a merge across the boundary), every text is tokenized as K whole single-facet
  strings and the packed prefix is their longest common prefix: still exact, K times the tokenizer work
  (:func:`assemble_ids`).

Packing a caption into such a sequence, and cutting a long one, is :mod:`stage1_embed_text.encode.packing`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipeline.errors import FlameError
from stage1_embed_text.encode.prompts import PromptSet

TOKENIZATION = "whole-prompt"
"""How prompt text becomes token ids (recorded in the cache identity): each ``prefix + segment_i`` is the
tokenizer's whole-string tokenization, caption special-token strings as plain text."""

# Cleaned captions (SPEC §2.1) used to check that prefix + segment tokenization equals whole-string
# tokenization: edge punctuation and quotes, digits, non-Latin scripts, emoji, runs of spaces, empty.
PROBE_CAPTIONS = (
    "a red apple on a wooden table.",
    "'Quoted' at the start and at the 'end'",
    "why?.",
    "3 dogs, 12 cats and 2024 birds: 7.5 m",
    "猫がソファに座っている。",
    "قطة تجلس على الأريكة.",
    "🍎🚀 emoji  and   spaces.",
    "",
)


class TokenizerError(FlameError, ValueError):
    """The tokenizer cannot give the guarantees of this module (fast tokenizer, caption text kept plain)."""


@dataclass(frozen=True)
class GroupTemplate:
    """How one group's prompt becomes token ids, for one tokenizer (built by :func:`group_templates`).

    Attributes:
        head_text: template words before the caption (``'Image description : "'``).
        tail_text: template words after the caption, up to the end of the prefix.
        segment_texts: the facet segments as text (``<s>`` marker applied), each ending in the closing quote.
        bos: ids the tokenizer puts before any text (its BOS), ``()`` if none.
        segments: ids of each facet segment as they follow a prefix in the whole-string tokenization.
        lead_special: per segment, whether it starts with a special token of the template itself (the
            official ``<s>`` marker where the tokenizer treats it as special); such a segment is always split
            off the prefix by the tokenizer.
        separable: ``bos + plain(prefix) + segments[i]`` equals the whole-string tokenization (checked on
            :data:`PROBE_CAPTIONS`); if ``False`` every text is tokenized as K whole single-facet strings.
        head, tail: ids of the template words before/after the caption tokenized on their own (no BOS);
            only :func:`stage1_embed_text.encode.packing.pack` uses them.
        fixed_len: tokens of the packed sequence of an empty caption (template words + every facet).
    """

    head_text: str
    tail_text: str
    segment_texts: tuple[str, ...]
    bos: tuple[int, ...]
    segments: tuple[tuple[int, ...], ...]
    lead_special: tuple[bool, ...]
    separable: bool
    head: tuple[int, ...] = ()
    tail: tuple[int, ...] = ()
    fixed_len: int = 0

    def prefix_text(self, caption: str) -> str:
        """The prefix with ``caption`` (already cleaned) filled in."""
        return self.head_text + caption + self.tail_text


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerError(
            f"stage 1 needs a fast (Rust) tokenizer for character offsets and plain caption text; got "
            f"{type(tokenizer).__name__}. Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )


def plain_encode(tokenizer, texts: Sequence[str], offsets: bool = False) -> dict:
    """Tokenize ``texts`` with no added special tokens and special-token strings kept as plain text.

    Args:
        tokenizer: a fast Hugging Face tokenizer.
        texts: strings to tokenize.
        offsets: also return ``offset_mapping``: per token ``(start, end)`` character offsets into its text.

    Returns:
        The tokenizer's output dict: ``input_ids`` (list of ``list[int]``, one per text) and, if asked,
        ``offset_mapping`` (list of ``list[tuple[int, int]]``).
    """
    return tokenizer(
        list(texts), add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=offsets
    )


def bos_ids(tokenizer) -> tuple[int, ...]:
    """Ids the tokenizer adds before ordinary text (``(bos_id,)`` for Llama/Mistral/Gemma, ``()`` for Qwen).

    Special tokens a tokenizer adds *after* the text (an EOS) are not part of a prompt: a facet is read at
    its closing quote.

    Raises:
        TokenizerError: adding special tokens changes the text's own ids (no contiguous match).
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(special) - len(plain) + 1):
        if special[i : i + len(plain)] == plain:
            return tuple(int(x) for x in special[:i])
    raise TokenizerError(f"the tokenizer's special tokens change the ids of 'a': {plain} vs {special}")


def _special_strings(tokenizer) -> dict[str, int]:
    """``{text: id}`` of the tokenizer's special added tokens (BOS, EOS, PAD, chat markers, ...)."""
    return {t.content: int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def _check_plain_text(tokenizer, specials: Mapping[str, int]) -> None:
    """Raise :class:`TokenizerError` if special-token strings inside text still become their ids."""
    named = [getattr(tokenizer, a, None) for a in ("bos_token", "eos_token", "pad_token", "unk_token")]
    probe = [s for s in dict.fromkeys(named) if isinstance(s, str) and len(s) > 1 and s in specials]
    if not probe:
        return
    ids = plain_encode(tokenizer, ["x " + s + " y" for s in probe])["input_ids"]
    leaked = [s for s, row in zip(probe, ids) if specials[s] in row]
    if leaked:
        raise TokenizerError(
            f"the tokenizer parses {leaked} inside text even with split_special_tokens=True; caption text "
            f"would become control tokens (upgrade transformers/tokenizers)"
        )


def _parses_specials(tokenizer, text: str) -> bool:
    """Whether ``text`` holds special-token text that the tokenizer turns into special ids by default."""
    parsed = tokenizer(text, add_special_tokens=False)["input_ids"]
    return parsed != plain_encode(tokenizer, [text])["input_ids"][0]


def _lead_special(tokenizer, segment: str, specials: Mapping[str, int]) -> bool:
    """Whether ``segment`` starts with a special token's text; raise if one occurs anywhere else."""
    if not _parses_specials(tokenizer, segment):
        return False
    lead = max((s for s in specials if segment.startswith(s)), key=len, default="")
    if not lead or _parses_specials(tokenizer, segment[len(lead) :]):
        raise TokenizerError(
            f"facet segment {segment!r} holds special-token text other than at its start; only a leading "
            f"marker (the official <s>) is supported"
        )
    return True


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of ``rows``."""
    n = min(len(r) for r in rows)
    first = rows[0]
    for r in rows[1:]:
        k = 0
        while k < n and r[k] == first[k]:
            k += 1
        n = k
    return n


def group_templates(tokenizer, prompt_set: PromptSet) -> dict[str, GroupTemplate]:
    """Build every group's :class:`GroupTemplate` for ``tokenizer`` (once per encoder).

    Args:
        tokenizer: the LLM's fast Hugging Face tokenizer.
        prompt_set: the prompt definition.

    Returns:
        ``{group name: template}``.

    Raises:
        TokenizerError: not a fast tokenizer, or it parses special-token text although asked not to.
        ValueError: template words before/after the caption contain special-token text, or a segment holds
            one other than at its start.
    """
    _require_fast(tokenizer)
    specials = _special_strings(tokenizer)
    _check_plain_text(tokenizer, specials)
    bos = bos_ids(tokenizer)
    out = {}
    for g in prompt_set.groups:
        head, tail = g.prefix_parts()
        if _parses_specials(tokenizer, head + tail):
            raise TokenizerError(f"the {g.name!r} prompt words around the caption contain special-token text")
        texts = prompt_set.segments(g.name)
        lead = tuple(_lead_special(tokenizer, s, specials) for s in texts)
        prefixes = [head + c + tail for c in PROBE_CAPTIONS]
        p_ids = plain_encode(tokenizer, prefixes)["input_ids"]
        segments, separable = [], True
        for s in texts:
            # probe captions hold no special-token text, so parsing the template's own specials is exact here
            full = tokenizer([p + s for p in prefixes], add_special_tokens=False)["input_ids"]
            n = _common_prefix([full[0], p_ids[0]])
            segments.append(tuple(full[0][n:]))
            separable &= all(f == list(p) + list(segments[-1]) for f, p in zip(full, p_ids))
        words = plain_encode(tokenizer, [head, tail])["input_ids"]
        t = GroupTemplate(
            head_text=head, tail_text=tail, segment_texts=texts, bos=bos, segments=tuple(segments),
            lead_special=lead, separable=separable, head=tuple(words[0]), tail=tuple(words[1]),
        )
        empty = p_ids[PROBE_CAPTIONS.index("")]
        out[g.name] = dataclasses.replace(t, fixed_len=len(assemble_ids(tokenizer, t, "", empty)[0]))
    return out


def assemble_ids(tokenizer, t: GroupTemplate, caption: str, prefix_ids: Sequence[int]):
    """``(ids, n_prefix, seg_lens)`` of one cleaned caption whose prefix text tokenized plainly to ``prefix_ids``.

    ``ids`` is a ``list[int]`` of ``n_prefix + sum(seg_lens)`` token ids, ``n_prefix`` the tokens shared by every
    facet, ``seg_lens`` a tuple of each facet segment's token count.

    Separable template: ``bos + prefix_ids``, then each segment's ids. Otherwise each single-facet prompt is
    tokenized as one string (a segment led by a special token is split off by the tokenizer anyway) and the
    shared prefix is the rows' longest common prefix, short of each row's last token (a facet's closing quote
    is its own); in ``restart`` mode that is still exactly K separate passes.
    """
    prefix = list(t.bos) + list(prefix_ids)
    if t.separable:
        return prefix + [x for s in t.segments for x in s], len(prefix), tuple(len(s) for s in t.segments)
    whole = [t.prefix_text(caption) + s for s, sp in zip(t.segment_texts, t.lead_special) if not sp]
    rows = iter(plain_encode(tokenizer, whole)["input_ids"] if whole else [])
    singles = [
        prefix + list(s) if sp else list(t.bos) + list(next(rows))
        for s, sp in zip(t.segments, t.lead_special)
    ]
    n = min(_common_prefix(singles), min(len(r) for r in singles) - 1)
    return singles[0][:n] + [x for r in singles for x in r[n:]], n, tuple(len(r) - n for r in singles)
