"""Token-level packing for facet-decoupled attention (SPEC §2.4).

One text of one group becomes one packed sequence ``prefix + segment_1 + ... + segment_K`` whose facet ``i``
part, ``prefix + segment_i``, is token for token the tokenizer's ids of the rendered single-facet prompt text
(whole-string tokenization, with the tokenizer's own leading special tokens such as BOS). Tokenizing the
template words and the caption separately is *not* that: tokenizers merge across the caption's edges (Gemma-3
and SmolLM2 have one ``."`` token for the caption's final ``.`` and the closing quote).

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
  strings and the packed prefix is their longest common prefix: still exact, K times the tokenizer work.

Facet ``i`` is read at the last token of its segment, found from the segment lengths, never by searching for
a token. A sequence longer than ``max_tokens`` loses caption *text* from its end, cut where a caption token
starts (character offsets, ``return_offsets_mapping``), and the shortened prompt is tokenized again, so a
truncated sequence is still the whole-string tokenization of its (shorter) prompt text. Template words and
facets are never cut.

A batch is padded (right by default) and gets a 4-D additive mask ``[B, 1, T, T]`` in which facet tokens see
the prefix and their own earlier tokens, padding keys are hidden, and (for sliding-window layers) keys
further than the window back, measured in positions, are hidden too.

Why the mask is built this way (checked on transformers 5.24): ``masking_utils`` returns a 4-D mask as-is for
every layer kind, and the SDPA and eager kernels ignore ``sliding_window``, so a custom mask must carry the
window itself; Gemma-3 and Qwen2 take a dict ``{"full_attention": m, "sliding_attention": m_w}`` for their two
layer kinds. Eager attention *adds* the mask to the scores, so it must be an additive float mask, not bool.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import FlameError
from stage1_embed_text.prompts import GROUPS, PromptSet, clean_caption

POSITION_MODES = ("restart", "continuous")
PAD_SEGMENT = -1
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
            only :func:`pack` uses them.
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
        raise ValueError(
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
            raise ValueError(f"the {g.name!r} prompt words around the caption contain special-token text")
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
        out[g.name] = dataclasses.replace(t, fixed_len=len(_assemble(tokenizer, t, "", empty)[0]))
    return out


@dataclass(frozen=True)
class PackedSequence:
    """One packed text: ``prefix + facet segments`` as token ids.

    Attributes:
        ids: ``int64 [L]`` token ids.
        n_prefix: tokens of the prefix (shared by every facet).
        seg_lens: tokens of each facet segment.
        truncated: caption text was cut to fit ``max_tokens``.
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


def _assemble(tokenizer, t: GroupTemplate, caption: str, prefix_ids: Sequence[int]):
    """``(ids, n_prefix, seg_lens)`` of one caption whose prefix text tokenized plainly to ``prefix_ids``.

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


def pack_caption(
    tokenizer, template: GroupTemplate, caption: str, max_tokens: int, encoded: tuple | None = None
) -> PackedSequence:
    """Pack one cleaned caption: facet ``i`` is the whole-string tokenization of ``prefix + segment_i``.

    A sequence longer than ``max_tokens`` keeps the longest start of the caption, cut where one of its tokens
    starts (character offsets of the first tokenization), whose re-tokenized prompt fits: found by galloping
    from the estimate "drop as many caption tokens as the sequence is over", then bisecting; a few tokenizer
    calls, each at most as long as the first.

    Args:
        tokenizer: the tokenizer ``template`` was built with.
        template: the group's template (:func:`group_templates`).
        caption: the cleaned caption (SPEC §2.1), ``""`` allowed.
        max_tokens: longest packed sequence; a longer one loses caption text from its end, never template
            words or facets.
        encoded: ``(ids, offsets)`` from :func:`plain_encode` of the prefix text with ``offsets=True``, if
            already computed (:func:`pack_samples` tokenizes a group's prefixes in one call).

    Returns:
        The packed sequence (``truncated`` set if caption text was cut).

    Raises:
        ValueError: the template alone (empty caption) does not fit ``max_tokens``.
    """
    if encoded is None:
        enc = plain_encode(tokenizer, [template.prefix_text(caption)], offsets=True)
        encoded = enc["input_ids"][0], enc["offset_mapping"][0]
    ids, offsets = encoded
    whole = _assemble(tokenizer, template, caption, ids)
    if len(whole[0]) <= max_tokens:
        return PackedSequence(np.asarray(whole[0], dtype=np.int64), whole[1], whole[2], False)

    h = len(template.head_text)
    cuts = sorted({s - h for s, _ in offsets if h <= s < h + len(caption)} | {0})

    def fitting(j: int):
        c = caption[: cuts[j]]
        prefix_ids = plain_encode(tokenizer, [template.prefix_text(c)])["input_ids"][0]
        r = _assemble(tokenizer, template, c, prefix_ids)
        return r if len(r[0]) <= max_tokens else None

    # caption[:cuts[lo]] fits, caption[:cuts[hi]] does not (hi = len(cuts) stands for the whole caption)
    lo, hi, best = -1, len(cuts), None
    j = min(max(len(cuts) - (len(whole[0]) - max_tokens), 0), len(cuts) - 1)
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
        raise ValueError(
            f"max_tokens={max_tokens} cannot hold the prompt template ({template.fixed_len} tokens)"
        )
    return PackedSequence(np.asarray(best[0], dtype=np.int64), best[1], best[2], True)


def pack(template: GroupTemplate, caption_ids: Sequence[int], max_tokens: int) -> PackedSequence:
    """Pack caption ids tokenized *on their own* between the template words: not whole-string exact.

    For benchmarks that only need realistic sequence lengths (within a token or two per caption edge);
    stage 1 packs with :func:`pack_caption` (via :func:`pack_samples`), whose ids equal the tokenizer's ids
    of the prompt text. Caption ids beyond the room the template leaves are dropped.

    Raises:
        ValueError: the template alone exceeds ``max_tokens``.
    """
    head = template.bos + template.head
    room = max_tokens - (len(head) + len(template.tail) + sum(len(s) for s in template.segments))
    if room < 0:
        raise ValueError(f"max_tokens={max_tokens} cannot hold the prompt template")
    ids = list(head) + list(caption_ids[:room]) + list(template.tail)
    n_prefix = len(ids)
    for seg in template.segments:
        ids.extend(seg)
    return PackedSequence(np.asarray(ids, dtype=np.int64), n_prefix, tuple(len(s) for s in template.segments),
                          len(caption_ids) > room)


def plan_batches(
    lengths: Sequence[int], max_batch_tokens: int, max_batch_sequences: int | None = None
) -> list[list[int]]:
    """Group sequence indices into token-budget batches bucketed by length.

    Sequences are sorted by length (longest first, ties by index) and each batch is filled while
    ``batch_size * longest_in_batch <= max_batch_tokens`` (padded tokens) and, if given,
    ``batch_size <= max_batch_sequences``; a sequence longer than the budget gets a batch of its own.

    Returns:
        Lists of indices into ``lengths``; every index appears exactly once.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        full = max_batch_sequences is not None and len(current) >= max_batch_sequences
        if current and (full or (len(current) + 1) * longest > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@dataclass
class Batch:
    """Model inputs for a batch of packed sequences.

    Attributes:
        input_ids: ``int64 [B, T]``.
        position_ids: ``int64 [B, T]``.
        segments: ``int64 [B, T]`` segment ids (0 prefix, ``i`` facet ``i``, -1 padding).
        readout_rows, readout_cols: ``int64 [R]`` (batch row, token index) of every facet readout, in order of
            the sequences then their facets.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    readout_rows: torch.Tensor
    readout_cols: torch.Tensor


def collate(
    seqs: Sequence[PackedSequence], pad_id: int, position_mode: str = "restart", padding_side: str = "right"
) -> Batch:
    """Pad packed sequences to a batch (``padding_side`` ``"right"`` or ``"left"``)."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    t = max(len(s) for s in seqs)
    b = len(seqs)
    ids = np.full((b, t), pad_id, dtype=np.int64)
    pos = np.zeros((b, t), dtype=np.int64)
    seg = np.full((b, t), PAD_SEGMENT, dtype=np.int64)
    rows, cols = [], []
    for r, s in enumerate(seqs):
        off = 0 if padding_side == "right" else t - len(s)
        ids[r, off : off + len(s)] = s.ids
        pos[r, off : off + len(s)] = s.positions(position_mode)
        seg[r, off : off + len(s)] = s.segment_ids()
        ro = s.readout()
        rows.extend([r] * len(ro))
        cols.extend((ro + off).tolist())
    return Batch(
        input_ids=torch.from_numpy(ids),
        position_ids=torch.from_numpy(pos),
        segments=torch.from_numpy(seg),
        readout_rows=torch.tensor(rows, dtype=torch.int64),
        readout_cols=torch.tensor(cols, dtype=torch.int64),
    )


def facet_mask(
    segments: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, window: int | None = None
) -> torch.Tensor:
    """Additive 4-D attention mask ``[B, 1, T, T]`` (0 = attend, dtype's min = hidden) for packed sequences.

    Query ``q`` may attend key ``k`` iff ``k`` is at or before ``q``, ``k`` is a prefix token or in ``q``'s own
    facet, ``k`` is not padding, and (when ``window`` is given) ``pos[q] - pos[k] < window`` (the
    transformers sliding-window rule, applied to positions so ``restart`` packing equals separate passes).
    A padding query attends only itself, which keeps its (unused) state finite.

    Args:
        segments: ``int64 [B, T]`` segment ids (0 prefix, ``i`` facet ``i``, -1 padding).
        positions: ``int64 [B, T]`` position ids.
        dtype: float dtype of the model (masks are added to attention scores in eager attention).
        window: sliding window of the layers this mask is for, or ``None``.
    """
    t = segments.shape[1]
    idx = torch.arange(t)
    causal = idx[None, :, None] >= idx[None, None, :]
    q, k = segments[:, :, None], segments[:, None, :]
    allowed = causal & ((k == 0) | (k == q)) & (k != PAD_SEGMENT) & (q != PAD_SEGMENT)
    if window is not None:
        allowed &= (positions[:, :, None] - positions[:, None, :]) < window
    allowed |= (q == PAD_SEGMENT) & torch.eye(t, dtype=torch.bool)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


@dataclass(frozen=True)
class PackedText:
    """One present text of a sample, packed (SPEC §2.4).

    Attributes:
        row: index of the sample in the batch given to :func:`pack_samples`.
        group: index into :data:`~stage1_embed_text.prompts.GROUPS` (raw, short, long).
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
    tokenizer, templates, prompt_set: PromptSet, samples: Sequence[Mapping[str, str | None]], max_tokens: int
) -> list[PackedText]:
    """Pack every present text of ``samples`` (one place, used by the ``hf`` and ``vllm`` backends alike).

    Each caption is cleaned (SPEC §2.1; an absent or blank caption yields no text), its group's prefix text
    is tokenized (one batched call per group, caption special-token text kept plain), and
    :func:`pack_caption` builds the sequence, cutting caption text, never template words or facets, to fit
    ``max_tokens``. Facet ``k`` of every item, ``item.request(k)``, equals the tokenizer's ids of the prompt
    text ``prefix + segment_k``.

    Args:
        tokenizer: the LLM's tokenizer (the one ``templates`` were built with).
        templates: ``{group: template}`` from :func:`group_templates`.
        prompt_set: the prompt set the templates were built from.
        samples: dicts with ``"raw"``, ``"short"``, ``"long"`` captions (missing or ``None`` = absent).
        max_tokens: longest packed sequence.

    Returns:
        The packed texts, group by group, in sample order within a group.

    Raises:
        ValueError: ``max_tokens`` cannot hold a group's template.
    """
    items: list[PackedText] = []
    for g in prompt_set.groups:
        rows, captions = [], []
        for r, s in enumerate(samples):
            c = clean_caption(s.get(g.name))
            if c is not None:
                rows.append(r)
                captions.append(c)
        if not captions:
            continue
        t = templates[g.name]
        enc = plain_encode(tokenizer, [t.prefix_text(c) for c in captions], offsets=True)
        start = prompt_set.facet_slice(g.name).start
        for r, c, ids, offs in zip(rows, captions, enc["input_ids"], enc["offset_mapping"]):
            seq = pack_caption(tokenizer, t, c, max_tokens, encoded=(ids, offs))
            items.append(PackedText(r, GROUPS.index(g.name), start, seq))
    return items
