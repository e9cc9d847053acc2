"""Sample keys as 128-bit BLAKE2b digests, and the groups of rows that share a digest (duplicate keys)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def key_digests(keys: Sequence[str]) -> np.ndarray:
    """128-bit BLAKE2b digests of sample keys: a ``(len(keys), 2)`` uint64 array (first half, second half)."""
    raw = b"".join(hashlib.blake2b(k.encode("utf-8"), digest_size=16).digest() for k in keys)
    return np.frombuffer(raw, dtype="<u8").reshape(-1, 2)


def duplicate_groups(digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose digest occurs more than once, grouped.

    Args:
        digests: ``(n, 2)`` uint64 key digests in source order.

    Returns:
        ``(rows, starts)``: the rows (int64) of every repeated digest, each group's rows consecutive and in
        ascending order; ``starts`` (bool, same length) marks the first row of each group.
    """
    order = np.lexsort((digests[:, 1], digests[:, 0]))  # stable: equal digests keep ascending rows
    hi, lo = digests[order, 0], digests[order, 1]
    same = (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])
    del hi, lo
    if not same.any():
        return np.zeros(0, np.int64), np.zeros(0, bool)
    repeated = np.zeros(len(order), bool)
    repeated[1:] |= same
    repeated[:-1] |= same
    starts = repeated & ~np.concatenate([[False], same])
    return order[repeated], starts[repeated]
