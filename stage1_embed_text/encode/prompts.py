"""Prompt sets as data: the FLAME multi-facet PromptEOL templates and the caption clean-up (SPEC §2.1, §2.2).

A :class:`PromptSet` is a named, versioned definition with a content hash. Each of its groups turns one
cleaned caption into a *prefix* (the template words around the caption) and one *segment* per facet; the
encoder packs ``prefix + segment_1 + ... + segment_K`` and reads facet ``i`` at the last token of segment
``i`` (the closing quote). The concatenation ``prefix + segment_i`` is exactly the single-facet prompt text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from stage1_embed_text.config import EmbedConfigError

GROUPS = ("raw", "short", "long")
BOS_MARKERS = ("drop", "keep")
CLEANUP_RULE = "spec-2.1-v1"  # bump if clean_for_prompt or prompt_captions changes; part of every prompt-set hash

_ENDING = " means in just one word:\""
_OFFICIAL_MARKER = "<s>"

# SPEC §2.2, the seven facet questions in order, with the short names used in facet keys.
QUESTIONS: tuple[tuple[str, str], ...] = (
    ("description", "this image description"),
    ("main_category", "the category of the main object in this image"),
    ("main_attribute", "the prominent characteristic or pattern of the main object in this image"),
    ("minor_category", "the category of the minor object in this image"),
    ("minor_attribute", "the prominent characteristic or pattern of the minor object in this image"),
    ("action", "the primary action or event taking place in this image"),
    ("atmosphere", "the overall atmosphere or emotion of this image"),
)

SHORT_PREFIX = 'Image description : "{caption}" . After thinking step by step ,'
LONG_PREFIX = 'Detailed Image description : "{caption}" . After thinking step by step ,'


def is_absent(text: str | None) -> bool:
    """True if a caption is absent: ``None``, empty or whitespace only (SPEC §2.1). Such a caption's whole facet
    group is masked in the cache, never filled with a vector of the bare template."""
    return text is None or not text.strip()


def clean_for_prompt(text: str | None) -> str | None:
    """The caption as it goes between the prompt's quotes: SPEC §2.1's clean-up, exactly.

    1. strip surrounding whitespace; 2. append ``.`` unless it ends in ``.``, ``?``, ``"`` or ``'``;
    3. replace every ``"`` with ``'`` (the closing-quote token cannot occur inside the caption);
    4. a final ``?`` becomes ``.``.

    Idempotent (a cleaned caption ends in ``.`` or ``'`` and holds no ``"``), so cleaning a cleaned text again
    changes nothing. Stage 1 applies it to whatever a manifest holds (a manifest written by another tool may
    keep surrounding whitespace or quotes); the manifest writers only turn blank captions into ``None``
    (``manifests.common.caption_or_none``) and store the text otherwise unchanged. Stage 1 calls it through
    :func:`prompt_captions` only, which both of its phases use: the planner digests the cleaned texts
    (:mod:`stage1_embed_text.plan.planner`), and packing embeds them
    (:func:`stage1_embed_text.encode.packing.pack_samples`, both backends and free texts).

    Args:
        text: the caption, or ``None``.

    Returns:
        The cleaned caption, or ``None`` when ``text`` is ``None``, empty or whitespace only: such a caption
        is *absent*, so its whole facet group is absent (masked) in the cache, never filled with a vector of
        the bare template.
    """
    if is_absent(text):
        return None
    s = text.strip()
    if s[-1] not in ".?\"'":
        s += "."
    s = s.replace('"', "'")
    if s.endswith("?"):
        s = s[:-1] + "."
    return s


def prompt_captions(
    prompt_set: PromptSet, samples: Sequence[Mapping[str, str | None]]
) -> dict[str, list[str | None]]:
    """What text of each sample goes to the LLM, and which of its groups are absent: the one place stage 1
    decides it (the planner's digests and the packed prompts both come from here, so they cannot disagree).

    Args:
        prompt_set: the groups to read, in its order (a sample's other captions are ignored).
        samples: dicts ``{"raw"|"short"|"long": caption}``; a missing key or ``None`` is an absent caption.

    Returns:
        ``{group: [text or None per sample]}`` for every group of ``prompt_set``: the caption cleaned by
        :func:`clean_for_prompt` (SPEC §2.1), ``None`` where it is absent (missing, ``None``, empty or whitespace
        only), in which case the sample's whole facet group is masked in the cache.
    """
    return {g: [clean_for_prompt(s.get(g)) for s in samples] for g in prompt_set.group_names}


@dataclass(frozen=True)
class PromptGroup:
    """One text kind of a sample (``raw``, ``short`` or ``long``) and its facet prompts.

    Attributes:
        name: group name, the key of the caption in a sample (``"raw"``, ``"short"``, ``"long"``).
        prefix: template words around the caption, with a ``{caption}`` placeholder.
        facet_names: storage names of the facets, e.g. ``("long.description", ...)``.
        segments: one text per facet, appended after the prefix; each ends in the closing quote.
    """

    name: str
    prefix: str
    facet_names: tuple[str, ...]
    segments: tuple[str, ...]

    def prefix_parts(self) -> tuple[str, str]:
        """The template words before and after ``{caption}`` (used to cut caption tokens, SPEC §2.4)."""
        head, tail = self.prefix.split("{caption}")
        return head, tail


@dataclass(frozen=True)
class PromptSet:
    """A named, versioned prompt definition (SPEC §2.2).

    Attributes:
        name: set name recorded in a cache identity (``"flame"``, ``"single"``).
        version: bumped whenever a text changes.
        groups: the groups in storage order; their facets, concatenated, are :attr:`facets`.
        bos_marker: what became of the official ``<s>`` marker after the prefix: ``"drop"`` (default,
            SPEC §2.2) or ``"keep"`` (the literal text ``<s>`` starts the first facet segment of each group).

    Raises:
        stage1_embed_text.config.EmbedConfigError: an unknown ``bos_marker``, or a group not named in
            :data:`GROUPS`.
    """

    name: str
    version: int
    groups: tuple[PromptGroup, ...]
    bos_marker: str = "drop"

    def __post_init__(self) -> None:
        if self.bos_marker not in BOS_MARKERS:
            raise EmbedConfigError(f"bos_marker must be one of {BOS_MARKERS}, got {self.bos_marker!r}")
        unknown = [g.name for g in self.groups if g.name not in GROUPS]
        if unknown:
            raise EmbedConfigError(f"unknown prompt groups {unknown}; expected names from {GROUPS}")

    @property
    def facets(self) -> tuple[str, ...]:
        """All facet names in storage order (F of them; 11 for FLAME)."""
        return tuple(n for g in self.groups for n in g.facet_names)

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    def group(self, name: str) -> PromptGroup:
        """The group called ``name``; raises ``KeyError`` naming the known groups."""
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"prompt set {self.name!r} has no group {name!r} (groups: {self.group_names})")

    def facet_slice(self, name: str) -> slice:
        """Positions of group ``name``'s facets in :attr:`facets`."""
        start = 0
        for g in self.groups:
            if g.name == name:
                return slice(start, start + len(g.facet_names))
            start += len(g.facet_names)
        raise KeyError(f"prompt set {self.name!r} has no group {name!r} (groups: {self.group_names})")

    def segments(self, group: str) -> tuple[str, ...]:
        """Facet segments of ``group`` with the ``<s>`` marker applied."""
        segs = self.group(group).segments
        if self.bos_marker == "keep":
            segs = (_OFFICIAL_MARKER + segs[0],) + segs[1:]
        return segs

    def definition(self) -> dict:
        """Canonical, JSON-serialisable form of the whole definition (what :attr:`content_hash` digests)."""
        return {
            "name": self.name,
            "version": self.version,
            "bos_marker": self.bos_marker,
            "cleanup": CLEANUP_RULE,
            "groups": [
                {"name": g.name, "prefix": g.prefix, "facets": [list(p) for p in zip(g.facet_names, g.segments)]}
                for g in self.groups
            ],
        }

    @property
    def content_hash(self) -> str:
        """``sha256:<hex>`` of the canonical JSON of :meth:`definition` (sorted keys, no spaces, UTF-8)."""
        blob = json.dumps(self.definition(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _segment(question: str) -> str:
    return " " + question + _ENDING


def _group(name: str, prefix: str, n_questions: int) -> PromptGroup:
    qs = QUESTIONS[:n_questions]
    return PromptGroup(
        name=name,
        prefix=prefix,
        facet_names=tuple(f"{name}.{key}" for key, _ in qs),
        segments=tuple(_segment(q) for _, q in qs),
    )


# The raw text uses the single PromptEOL prompt of SPEC §2.2: the short prefix plus question 1.
RAW_GROUP = PromptGroup(name="raw", prefix=SHORT_PREFIX, facet_names=("raw",), segments=(_segment(QUESTIONS[0][1]),))

FLAME = PromptSet(
    name="flame",
    version=1,
    groups=(RAW_GROUP, _group("short", SHORT_PREFIX, 3), _group("long", LONG_PREFIX, 7)),
)
"""The FLAME set: 11 facets ``[raw, short x3, long x7]`` (SPEC §2.2)."""

SINGLE = PromptSet(name="single", version=1, groups=(RAW_GROUP,))
"""Only the raw single prompt (eval ``single`` mode, SPEC §6)."""

_REGISTRY = {p.name: p for p in (FLAME, SINGLE)}


def get_prompt_set(name: str, bos_marker: str = "drop") -> PromptSet:
    """The registered prompt set ``name`` (``"flame"`` or ``"single"``), with the given ``<s>`` marker choice.

    Raises:
        stage1_embed_text.config.EmbedConfigError: unknown name (the message lists the known ones) or
            ``bos_marker``.
    """
    if name not in _REGISTRY:
        raise EmbedConfigError(f"unknown prompt set {name!r}; known: {sorted(_REGISTRY)}")
    base = _REGISTRY[name]
    if bos_marker == base.bos_marker:
        return base
    return PromptSet(name=base.name, version=base.version, groups=base.groups, bos_marker=bos_marker)
