"""Model inputs for batches of packed sequences: token-budget batches, padding, the facet-decoupled mask (SPEC §2.4).

A batch is padded (right by default) and gets a 4-D additive mask ``[B, 1, T, T]`` in which facet tokens see
the prefix and their own earlier tokens, padding keys are hidden, and (for sliding-window layers) keys
further than the window back, measured in positions, are hidden too.

Why the mask is built this way (checked on transformers 5.24): ``masking_utils`` returns a 4-D mask as-is for
every layer kind, and the SDPA and eager kernels ignore ``sliding_window``, so a custom mask must carry the
window itself; Gemma-3 and Qwen2 take a dict ``{"full_attention": m, "sliding_attention": m_w}`` for their two
layer kinds. Eager attention *adds* the mask to the scores, so it must be an additive float mask, not bool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from stage1_embed_text.config import EmbedConfigError

if TYPE_CHECKING:
    from stage1_embed_text.encode.packing import PackedSequence

PAD_SEGMENT = -1
PADDING_SIDES = ("right", "left")
"""Where a batch's padding goes; the results do not depend on it."""


def check_padding_side(padding_side: str) -> None:
    """Raise :class:`~stage1_embed_text.config.EmbedConfigError` unless ``padding_side`` is one of
    :data:`PADDING_SIDES`."""
    if padding_side not in PADDING_SIDES:
        raise EmbedConfigError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")


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
    """Pad packed sequences to a batch (``padding_side`` ``"right"`` or ``"left"``).

    Raises:
        stage1_embed_text.config.EmbedConfigError: another ``padding_side``.
    """
    check_padding_side(padding_side)
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
