"""Deduplication on fixed-size digests (SPEC §11): rows of equal caption sets, owners of equal texts.

Nothing here holds strings: a caption set is a 128-bit digest given as two ``uint64`` halves, a text a 20-byte
SHA-1; equal digests are grouped by sorting (equal 128-bit prefixes are taken as equal texts: a false match
among 10^9 texts has probability ~10^-21).
"""

from __future__ import annotations

import numpy as np


class Growing:
    """A 1-D array filled batch by batch: one allocation of the expected size, doubled if it runs short."""

    def __init__(self, dtype, capacity: int):
        self.data = np.empty(max(capacity, 1), dtype)
        self.n = 0

    def extend(self, values: np.ndarray) -> None:
        if self.n + len(values) > len(self.data):
            grown = np.empty(max(2 * len(self.data), self.n + len(values)), self.data.dtype)
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        self.data[self.n : self.n + len(values)] = values
        self.n += len(values)

    def values(self) -> np.ndarray:
        """The filled part (a view)."""
        return self.data[: self.n]



def sorted_runs(hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group equal 128-bit digests ``(hi, lo)`` (``uint64 [n]`` each): the stable sort order (``int64 [n]``) and
    ``bool [n]`` marking the first element of each run of equal digests in that order.

    Sorts the 64-bit ``hi`` only (a stable radix sort, ~16 bytes per element of temporaries); in the rare case that
    two different digests share ``hi`` it sorts the pairs (``lexsort``) instead."""
    order = np.argsort(hi, kind="stable")
    hs = hi[order]
    starts = np.empty(len(hi), bool)
    starts[:1] = True
    np.not_equal(hs[1:], hs[:-1], out=starts[1:])
    del hs
    ls = lo[order]
    if ((ls[1:] != ls[:-1]) & ~starts[1:]).any():  # two digests with the same 64-bit prefix: sort on both halves
        del ls
        order = np.lexsort((lo, hi))
        hs, ls = hi[order], lo[order]
        starts = np.r_[True, (hs[1:] != hs[:-1]) | (ls[1:] != ls[:-1])]
    return order, starts


def first_occurrence_rows(hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``n`` samples from their 128-bit caption-set digests ``(hi, lo)`` (``uint64 [n]`` each).

    Returns ``int64 [n]`` the row of each sample (rows numbered by first occurrence) and ``int64 [N]`` the sample
    index of each row's first occurrence (ascending)."""
    n = len(hi)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order, starts = sorted_runs(hi, lo)  # stable: equal digests stay in sample order
    first = order[starts]
    row_of_run = np.empty(len(first), np.int64)
    row_of_run[np.argsort(first, kind="stable")] = np.arange(len(first))
    key_row = np.empty(n, np.int64)
    key_row[order] = row_of_run[np.cumsum(starts) - 1]
    return key_row, np.sort(first).astype(np.int64)


def owners(dig: np.ndarray, present: np.ndarray) -> np.ndarray:
    """``int64 [N]``: for each row the first row with the same text digest (``dig uint8 [N, 20]``), -1 if absent."""
    n = len(dig)
    owner = np.full(n, -1, np.int64)
    idx = np.flatnonzero(present)
    if len(idx) == 0:
        return owner
    hi = dig[idx, :8].copy().view(np.uint64).ravel()  # any fixed reading of the bytes groups equal digests
    lo = dig[idx, 8:16].copy().view(np.uint64).ravel()
    order, starts = sorted_runs(hi, lo)
    del hi, lo
    first_of_run = idx[order[starts]]
    owner[idx[order]] = first_of_run[np.cumsum(starts) - 1]
    return owner
