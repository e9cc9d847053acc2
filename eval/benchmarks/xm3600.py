"""Crossmodal-3600 (Thapliyal et al., EMNLP 2022): multilingual retrieval, one task per language (SPEC §6).

Formats read (``DIR`` = ``--data``):

- the published ``DIR/captions.jsonl``: one line per image, ``{"image/key": K, "<lang>": {"caption": [..]},
  ...}`` for 36 languages;
- or one file per language, ``DIR/captions/<lang>.jsonl``, lines ``{"image/key": K, "caption": [..] | ".."}``.

Images are ``DIR/images/<K>.jpg``. Every language uses the same 3600-image gallery; a language's captions of
an image are all positives of it. Tasks default to the ``single`` text mode (SPEC §6: multilingual).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from eval.benchmarks.base import Benchmark, BenchmarkError, ImageRef, RetrievalTask, pairs_from_captions


def _as_list(v: object) -> list[str]:
    return [v] if isinstance(v, str) else list(v or [])


def _read(data: Path) -> dict[str, dict[str, list[str]]]:
    """``{image key: {lang: [captions]}}`` in file order."""
    out: dict[str, dict[str, list[str]]] = defaultdict(dict)
    if (data / "captions.jsonl").exists():
        for line in (data / "captions.jsonl").read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            key = row.pop("image/key")
            for lang, v in row.items():
                if isinstance(v, dict) and "caption" in v:
                    out[key][lang] = _as_list(v["caption"])
        return out
    files = sorted((data / "captions").glob("*.jsonl"))
    if not files:
        raise BenchmarkError(f"{data}: neither captions.jsonl nor captions/<lang>.jsonl")
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                out[row.get("image/key") or row["key"]][f.stem] = _as_list(row.get("caption") or row.get("captions"))
    return out


def xm3600(data: str | Path, split: str = "test", languages: list[str] | None = None) -> Benchmark:
    """Load Crossmodal-3600; ``languages`` limits the tasks (default or ``["all"]``: every language present)."""
    data = Path(data)
    caps = _read(data)
    keys = list(caps)
    present = sorted({lang for v in caps.values() for lang in v})
    langs = present if languages in (None, ["all"]) else languages
    images = [ImageRef(path=str(data / "images" / f"{k}.jpg"), name=f"{k}.jpg") for k in keys]
    tasks = []
    for lang in langs:
        texts, pairs = pairs_from_captions([caps[k].get(lang, []) for k in keys])
        if len(pairs):
            tasks.append(RetrievalTask(f"multilingual_{lang}", np.arange(len(keys)), texts, pairs,
                                       text_mode="single", kind="multilingual", lang=lang))
    if not tasks:
        raise BenchmarkError(f"{data}: no captions for languages {langs}")
    return Benchmark("xm3600", split, images, tasks, str(data), {"images": len(images), "languages": len(tasks)})
