"""Emoji names and keywords from Unicode CLDR annotations (npm ``cldr-annotations-full`` + ``-derived-full``).

CLDR keeps one JSON per locale: ``annotations/<locale>/annotations.json`` (single emoji) and
``annotationsDerived/<locale>/annotations.json`` (sequences: skin tones, flags, keycaps, ZWJ sequences).
Each maps an emoji string to ``{"default": [keywords...], "tts": [name]}``. Keys are usually written
without U+FE0F (variation selector 16), so a lookup tries the exact string first, then without FE0F.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_VS16 = "\ufe0f"


@dataclass(frozen=True)
class CldrEntry:
    """One emoji in one locale: its short name (CLDR ``tts``) and keywords (CLDR ``default``)."""

    name: str
    keywords: tuple[str, ...]


def emoji_string(unified: str) -> str:
    """The emoji text for a dash-separated code point sequence, e.g. ``"1f44b-1f3fb"`` -> ``"👋🏻"``.

    Raises:
        ValueError: a part is not hexadecimal.
    """
    return "".join(chr(int(cp, 16)) for cp in unified.split("-"))


def _read_table(path: Path, top: str) -> dict[str, dict]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data.get(top, {}).get("annotations", {})


class CldrNames:
    """Per-locale lookup of CLDR names and keywords.

    Args:
        tables: ``{locale: [annotations table, derived table]}``, each ``{emoji string: {"tts", "default"}}``.
    """

    def __init__(self, tables: dict[str, list[dict[str, dict]]]):
        self._tables = tables

    @classmethod
    def load(
        cls, annotations_dir: str | Path, derived_dir: str | Path, locales: tuple[str, ...]
    ) -> CldrNames:
        """Read the JSON files of ``locales`` from the extracted CLDR package folders.

        Args:
            annotations_dir: the ``annotations/`` folder of ``cldr-annotations-full``.
            derived_dir: the ``annotationsDerived/`` folder of ``cldr-annotations-derived-full``.
            locales: CLDR locale ids, e.g. ``("en", "de")``. A locale with no files gets an empty table
                (logged), so its lookups return ``None``.
        """
        tables = {}
        for loc in locales:
            pair = [
                _read_table(Path(annotations_dir) / loc / "annotations.json", "annotations"),
                _read_table(Path(derived_dir) / loc / "annotations.json", "annotationsDerived"),
            ]
            if not any(pair):
                logger.warning("CLDR has no annotations for locale %r", loc)
            tables[loc] = pair
        return cls(tables)

    def lookup(self, locale: str, unified: str) -> CldrEntry | None:
        """Name and keywords of the emoji ``unified`` (e.g. ``"1f44b-1f3fb"``) in ``locale``, or ``None``.

        Raises:
            KeyError: ``locale`` was not loaded.
        """
        text = emoji_string(unified)
        for table in self._tables[locale]:
            for candidate in (text, text.replace(_VS16, "")):
                entry = table.get(candidate)
                if entry and entry.get("tts"):
                    return CldrEntry(entry["tts"][0], tuple(entry.get("default", ())))
        return None
