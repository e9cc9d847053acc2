"""The text modes eval embeds texts in (SPEC §6); the one place they are spelled out in ``eval``.

- ``single``: the text through the raw single prompt (one vector per text);
- ``multi``: the mean of the long group's facet vectors (FLAME's multi-facet prompts).

Each task carries its default mode (set by its adapter, SPEC §6: ``multi`` for English and long-caption
retrieval and compositionality, ``single`` for classification and multilingual retrieval); ``flame eval
--text-mode`` overrides it for every task. This module imports nothing heavy, so ``flame --help`` can use it.
"""

from __future__ import annotations

SINGLE = "single"
MULTI = "multi"
#: Every text mode, in the order ``flame eval --text-mode`` lists them; the stage-1 embedder's
#: ``stage1_embed_text.api.MODES`` (checked by the tests).
TEXT_MODES = (SINGLE, MULTI)


def check_text_mode(mode: str) -> str:
    """``mode`` itself if it is one of :data:`TEXT_MODES`.

    Raises:
        ValueError: any other value, naming the known modes.
    """
    if mode not in TEXT_MODES:
        raise ValueError(f"unknown text mode {mode!r} ({', '.join(TEXT_MODES)})")
    return mode
