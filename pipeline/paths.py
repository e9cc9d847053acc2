"""Where flame-pipeline keeps downloaded assets, converted models and run outputs."""

from __future__ import annotations

import os
from pathlib import Path


def flame_home() -> Path:
    """The cache root for everything downloaded or converted (SPEC §8).

    Returns ``$FLAME_HOME`` if set, else ``~/.cache/flame-pipeline``. The directory is created if missing.
    """
    root = Path(os.environ.get("FLAME_HOME") or Path.home() / ".cache" / "flame-pipeline").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
