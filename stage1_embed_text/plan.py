"""The embedding plan of a stage-1 job (SPEC §2.6): which rows exist, which keys point at them, who computes what.

From the manifest rows (in manifest order) the plan builds each sample's caption set, the three cleaned texts
``(raw, short, long)`` (SPEC §2.1; ``None`` where absent), and

* drops samples whose three captions are all absent (counted, listed in :attr:`Plan.empty_keys`);
* dedupes identical caption sets: one cache **row** per distinct set, rows in first-occurrence order, many
  keys -> one row;
* dedupes identical **texts** across rows: the packed sequence of group ``g`` with text ``t`` is computed
  once, by the first row that has it (its *owner*, :attr:`Plan.owner`); other rows copy the owner's stored
  float16 vectors, token count and truncation flag. Because a row only copies from rows before it, a shard
  only depends on itself and earlier shards, and every stored byte is a function of the plan alone (the same
  whatever process computes a shard, and whether the job was resumed).

The :attr:`Plan.plan_hash` digests the prompt set hash, every key with its row and every row's text hashes;
a resumed job must arrive at the same hash (and layout) as the cache on disk.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from pipeline.cache import CacheLayout
from stage1_embed_text.prompts import GROUPS, PromptSet, clean_caption

log = logging.getLogger(__name__)

CAPTION_COLUMNS = {"raw": "raw_caption", "short": "short_caption", "long": "long_caption"}  # group -> manifest column


def text_sha1(text: str | None) -> str | None:
    """Hex SHA-1 of a cleaned text's UTF-8 bytes (``None`` for an absent text)."""
    return None if text is None else hashlib.sha1(text.encode("utf-8")).hexdigest()


@dataclass
class Plan:
    """The deduplicated work of a job.

    Attributes:
        groups: group names in the prompt set's storage order (e.g. ``("raw", "short", "long")``).
        keys: kept sample keys, manifest order, ``n_keys`` of them.
        key_rows: ``int64 [n_keys]``, cache row of each kept key.
        texts: ``n_rows`` tuples of cleaned texts, one per group (``None`` = absent).
        owner: ``int64 [n_rows, G]``, the row that computes group ``g``'s text of row ``r`` (``<= r``;
            ``-1`` where absent).
        empty_keys: keys of samples with no caption at all (no row, not in the cache index).
        n_samples: manifest rows considered (after ``split`` and ``limit``).
        layout: rows per shard / chunk and the plan hash.
    """

    groups: tuple[str, ...]
    keys: list[str]
    key_rows: np.ndarray
    texts: list[tuple[str | None, ...]]
    owner: np.ndarray
    empty_keys: list[str]
    n_samples: int
    layout: CacheLayout

    @property
    def n_rows(self) -> int:
        return len(self.texts)

    @property
    def plan_hash(self) -> str:
        return self.layout.plan_hash

    @property
    def n_unique_texts(self) -> int:
        """Packed sequences the job embeds: one per distinct (group, text)."""
        return int((self.owner == np.arange(self.n_rows)[:, None]).sum())

    def absent_counts(self) -> dict[str, int]:
        """Rows whose text of each group is absent, e.g. ``{"raw": 0, "short": 2, "long": 5}``."""
        return {g: int((self.owner[:, i] < 0).sum()) for i, g in enumerate(self.groups)}

    def shard_keys(self, shard: int) -> tuple[list[str], np.ndarray]:
        """Keys (manifest order) whose rows lie in cache shard ``shard``, and those rows (``int64``)."""
        rows = self.layout.shard_range(shard)
        sel = np.flatnonzero((self.key_rows >= rows.start) & (self.key_rows < rows.stop))
        return [self.keys[i] for i in sel], self.key_rows[sel]

    def owned(self, shard: int) -> np.ndarray:
        """``bool [n, G]``: which texts of shard ``shard``'s ``n`` rows those rows embed themselves."""
        rows = self.layout.shard_range(shard)
        return self.owner[rows.start : rows.stop] == np.arange(rows.start, rows.stop)[:, None]


def build_plan(
    samples: Iterable[tuple[str, str | None, str | None, str | None]],
    prompt_set: PromptSet,
    shard_rows: int = 4096,
    chunk_rows: int = 64,
) -> Plan:
    """Dedupe samples into cache rows and owned texts.

    Args:
        samples: ``(key, raw_caption, short_caption, long_caption)`` in manifest order; captions as stored in
            the manifest (cleaned here; ``None``/empty/whitespace = absent).
        prompt_set: the prompt set; only its groups are used (a group the set lacks is ignored), and its
            content hash enters the plan hash.
        shard_rows: rows per cache shard (the unit of work, resumption and multi-process split).
        chunk_rows: rows per Zarr chunk inside a shard; must divide ``shard_rows``.

    Returns:
        :class:`Plan`.

    Raises:
        ValueError: ``shard_rows``/``chunk_rows`` not positive or ``chunk_rows`` not dividing ``shard_rows``.
    """
    if shard_rows <= 0 or chunk_rows <= 0 or shard_rows % chunk_rows:
        raise ValueError(f"need shard_rows > 0 and chunk_rows > 0 dividing it, got {shard_rows}, {chunk_rows}")
    groups = prompt_set.group_names
    row_of: dict[tuple[str | None, ...], int] = {}
    text_owner: list[dict[str, int]] = [{} for _ in groups]
    keys: list[str] = []
    key_rows: list[int] = []
    texts: list[tuple[str | None, ...]] = []
    owner: list[list[int]] = []
    empty: list[str] = []
    n = 0
    for sample in samples:
        n += 1
        key = sample[0]
        cleaned = tuple(clean_caption(sample[1 + GROUPS.index(g)]) for g in groups)
        if all(t is None for t in cleaned):
            empty.append(key)
            continue
        row = row_of.get(cleaned)
        if row is None:
            row = row_of[cleaned] = len(texts)
            texts.append(cleaned)
            owner.append([-1 if t is None else text_owner[i].setdefault(t, row) for i, t in enumerate(cleaned)])
        keys.append(key)
        key_rows.append(row)
    key_rows_arr = np.asarray(key_rows, dtype=np.int64)
    owner_arr = np.asarray(owner, dtype=np.int64).reshape(len(texts), len(groups))
    digest = _plan_hash(prompt_set.content_hash, groups, keys, key_rows, texts)
    layout = CacheLayout(n_rows=len(texts), shard_rows=shard_rows, chunk_rows=chunk_rows, plan_hash=digest)
    if empty:
        log.info("%d of %d samples have no caption at all (no row), e.g. %s", len(empty), n, empty[:3])
    plan = Plan(groups, keys, key_rows_arr, texts, owner_arr, empty, n, layout)
    log.info(
        "plan: %d samples -> %d keys -> %d rows (%d shards of %d); %d unique texts to embed",
        n, len(keys), len(texts), layout.n_shards, shard_rows, plan.n_unique_texts,
    )
    return plan


def _plan_hash(
    prompt_hash: str, groups: tuple[str, ...], keys: list[str], key_rows: list[int], texts: list[tuple]
) -> str:
    h = hashlib.sha256()
    h.update(f"{prompt_hash}\n{','.join(groups)}\n".encode())
    for t in texts:
        h.update(("|".join(text_sha1(x) or "-" for x in t) + "\n").encode())
    for k, r in zip(keys, key_rows):
        h.update(f"{len(k)}:{k}\t{r}\n".encode())
    return "sha256:" + h.hexdigest()
