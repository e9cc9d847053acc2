"""Token-level packing for facet-decoupled attention (SPEC §2.4).

One text of one group becomes one packed sequence ``prefix + segment_1 + ... + segment_K``, built from token
ids: the template's fixed parts (``head`` = BOS if the tokenizer uses one + the words before the caption,
``tail`` = the words after it, and each facet segment) are tokenized once, the caption on its own. Facet
``i`` is read at the last token of its segment, found from the segment lengths, never by searching for a
separator token. A sequence longer than ``max_tokens`` loses caption tokens from the end, never template
words or facets.

A batch is padded (right by default) and gets a 4-D additive mask ``[B, 1, T, T]`` in which facet tokens see
the prefix and their own earlier tokens, padding keys are hidden, and (for sliding-window layers) keys
further than the window back, measured in positions, are hidden too.

Why the mask is built this way (checked on transformers 5.24): ``masking_utils`` returns a 4-D mask as-is for
every layer kind, and the SDPA and eager kernels ignore ``sliding_window``, so a custom mask must carry the
window itself; Gemma-3 and Qwen2 take a dict ``{"full_attention": m, "sliding_attention": m_w}`` for their two
layer kinds. Eager attention *adds* the mask to the scores, so it must be an additive float mask, not bool.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from stage1_embed_text.prompts import GROUPS, PromptSet, clean_caption

POSITION_MODES = ("restart", "continuous")
PAD_SEGMENT = -1


@dataclass(frozen=True)
class GroupTemplate:
    """Token ids of the fixed parts of one group's prompt.

    Attributes:
        head: BOS (if the tokenizer prepends one) + tokens of the template words before the caption.
        tail: tokens of the template words after the caption (the prefix ends here).
        segments: tokens of each facet segment, each ending in the closing quote.
    """

    head: tuple[int, ...]
    tail: tuple[int, ...]
    segments: tuple[tuple[int, ...], ...]

    @property
    def fixed_len(self) -> int:
        """Tokens of a packed sequence that are not caption tokens."""
        return len(self.head) + len(self.tail) + sum(len(s) for s in self.segments)


def bos_ids(tokenizer) -> tuple[int, ...]:
    """``(bos_id,)`` if the tokenizer prepends a BOS token to ordinary text, else ``()``."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and len(special) > len(plain) and special[0] == bos:
        return (int(bos),)
    return ()


def group_templates(tokenizer, prompt_set: PromptSet) -> dict[str, GroupTemplate]:
    """Tokenize the fixed parts of every group of ``prompt_set`` (once per tokenizer)."""

    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    out = {}
    for g in prompt_set.groups:
        head, tail = g.prefix_parts()
        out[g.name] = GroupTemplate(
            head=bos_ids(tokenizer) + ids(head),
            tail=ids(tail),
            segments=tuple(ids(s) for s in prompt_set.segments(g.name)),
        )
    return out


@dataclass(frozen=True)
class PackedSequence:
    """One packed text: ``prefix + facet segments`` as token ids.

    Attributes:
        ids: ``int64 [L]`` token ids.
        n_prefix: tokens of the prefix (head + caption + tail).
        seg_lens: tokens of each facet segment.
        truncated: caption tokens were cut to fit ``max_tokens``.
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


def pack(template: GroupTemplate, caption_ids: Sequence[int], max_tokens: int) -> PackedSequence:
    """Pack one caption into ``head + caption + tail + segments``, cutting caption tokens if too long.

    Raises:
        ValueError: the template alone (without any caption token) exceeds ``max_tokens``.
    """
    room = max_tokens - template.fixed_len
    if room < 0:
        raise ValueError(f"max_tokens={max_tokens} cannot hold the prompt template ({template.fixed_len} tokens)")
    truncated = len(caption_ids) > room
    caption = list(caption_ids[:room])
    ids = list(template.head) + caption + list(template.tail)
    n_prefix = len(ids)
    for seg in template.segments:
        ids.extend(seg)
    return PackedSequence(
        ids=np.asarray(ids, dtype=np.int64),
        n_prefix=n_prefix,
        seg_lens=tuple(len(s) for s in template.segments),
        truncated=truncated,
    )


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

    Each caption is cleaned (SPEC §2.1; an absent or blank caption yields no text), tokenized without special
    tokens and pre-cut to ``max_tokens`` (the template needs room too), then packed with its group's template
    by :func:`pack`, which cuts caption tokens, never facets.

    Args:
        tokenizer: the LLM's tokenizer.
        templates: ``{group: template}`` from :func:`group_templates`.
        prompt_set: the prompt set the templates were built from.
        samples: dicts with ``"raw"``, ``"short"``, ``"long"`` captions (missing or ``None`` = absent).
        max_tokens: longest packed sequence.

    Returns:
        The packed texts, group by group, in sample order within a group.
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
        ids = tokenizer(captions, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
        start = prompt_set.facet_slice(g.name).start
        for r, cap_ids in zip(rows, ids):
            items.append(PackedText(r, GROUPS.index(g.name), start, pack(templates[g.name], cap_ids, max_tokens)))
    return items
