"""Reusable pipeline stages: an artifact directory per (stage, inputs) with a finished marker written last.

A stage's output lives in ``ROOT/<stage>-<hash of its inputs>``; the stage is *finished* when
``stage.json`` there holds the same inputs. A rerun with the same inputs reuses the directory; different
inputs get a different directory, so nothing finished is ever overwritten.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_bytes

MARKER = "stage.json"


def inputs_hash(inputs: dict[str, Any]) -> str:
    """12 hex digits of the sha256 of the canonical JSON of ``inputs``."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class StageResult:
    """Where a stage's artifact is, whether it was reused, and how long the stage took (seconds)."""

    name: str
    path: Path
    reused: bool
    seconds: float
    info: dict[str, Any]


def run_stage(
    root: Path, name: str, inputs: dict[str, Any], build: Callable[[Path], dict[str, Any] | None]
) -> StageResult:
    """Run ``build(out_dir)`` unless a finished artifact with the same inputs exists.

    Args:
        root: directory holding the artifacts.
        name: stage name (``"manifest"``, ``"cache"``, ...).
        inputs: everything the output depends on (paths of upstream artifacts, configs, versions).
        build: writes the artifact into the directory it is given; returns a small JSON-able summary.

    Returns:
        A :class:`StageResult`; ``info`` is ``build``'s summary (stored in the marker, returned on reuse).

    A failure inside ``build`` leaves no marker, so the next run resumes or redoes the stage (stage 1's own
    resumability picks up its finished shards).
    """
    out = root / f"{name}-{inputs_hash(inputs)}"
    marker = out / MARKER
    if marker.exists():
        saved = json.loads(marker.read_text())
        if saved.get("inputs") == json.loads(json.dumps(inputs, default=str)):
            return StageResult(name, out, True, 0.0, saved.get("info") or {})
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    info = build(out) or {}
    seconds = time.perf_counter() - start
    payload = {"stage": name, "inputs": inputs, "info": info, "seconds": round(seconds, 1)}
    atomic_write_bytes(marker, json.dumps(payload, indent=2, default=str).encode("utf-8"))  # published last
    return StageResult(name, out, False, seconds, info)
