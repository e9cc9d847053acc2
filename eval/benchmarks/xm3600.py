"""Crossmodal-3600 (Thapliyal et al., EMNLP 2022): multilingual retrieval, one task per language (SPEC §6).

Formats read (``DIR`` = ``--data``):

- the published ``DIR/captions.jsonl``: one line per image, ``{"image/key": K, "<lang>": {"caption": [..],
  "caption/tokenized": [..], ...}, ...}`` for 36 languages;
- or one file per language, ``DIR/captions/<lang>.jsonl``, lines ``{"image/key": K, "caption": [..] | ".."}``.

Images are ``DIR/images/<K>.jpg``, or ``DIR/<K>.jpg`` (what a plain ``tar xzf images.tgz`` in ``DIR`` gives);
every image is checked to exist when the benchmark is loaded.

Protocol (FLAME, through CLIP_benchmark's ``crossmodal3600``): per language, the **first** caption of each
image is its one text, so the published set has 3,600 images and 3,600 texts in each of 36 languages (checked:
a language with fewer texts than images on the full set is refused). Every language uses the same image
gallery. Tasks default to the ``single`` text mode (SPEC §6: multilingual).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from eval.benchmarks.base import Benchmark, BenchmarkError, ImageRef, RetrievalTask, pairs_from_captions
from eval.benchmarks.registry import BenchmarkRequest, register_benchmark
from stage1_embed_text.config import SINGLE

#: Images in the published set; on it every language must have one text per image.
XM3600_IMAGES = 3600


def _first(v: object) -> str | None:
    """The first caption of a ``caption`` field (a list or one string), stripped; None when there is none."""
    if isinstance(v, str):
        return v.strip() or None
    if isinstance(v, list) and v and isinstance(v[0], str):
        return v[0].strip() or None
    return None


def _read(data: Path) -> dict[str, dict[str, str]]:
    """``{image key: {lang: first caption}}`` in file order (an image without captions maps to ``{}``)."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    if (data / "captions.jsonl").exists():
        files, per_language = [data / "captions.jsonl"], False
    else:
        files, per_language = sorted((data / "captions").glob("*.jsonl")), True
    if not files:
        raise BenchmarkError(f"{data}: neither captions.jsonl nor captions/<lang>.jsonl")
    for src in files:
        try:
            for line in src.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                row = json.loads(line)
                if per_language:
                    key = row.get("image/key") or row["key"]
                    found = {src.stem: _first(row.get("caption", row.get("captions")))}
                else:
                    key = row.pop("image/key")
                    found = {lang: _first(v.get("caption")) for lang, v in row.items() if isinstance(v, dict)}
                out[key].update({lang: cap for lang, cap in found.items() if cap})
        except (ValueError, KeyError, AttributeError, UnicodeDecodeError) as exc:
            raise BenchmarkError(f"{src}: malformed Crossmodal-3600 captions ({exc!r})") from None
    return out


def _image_dir(data: Path, keys: list[str]) -> Path:
    """``DIR/images`` or ``DIR``, whichever holds the images; every ``<key>.jpg`` must be there."""
    candidates = [d for d in (data / "images", data) if d.is_dir()]
    best = max(candidates, key=lambda d: sum((d / f"{k}.jpg").is_file() for k in keys[:50]))
    missing = [k for k in keys if not (best / f"{k}.jpg").is_file()]
    if missing:
        raise BenchmarkError(f"{data}: {len(missing)} of {len(keys)} images missing (first: {missing[0]}.jpg; looked "
                             f"in {data / 'images'} and {data}); extract images.tgz there")
    return best


def xm3600(data: str | Path, split: str = "test", languages: list[str] | None = None) -> Benchmark:
    """Load Crossmodal-3600 (module docstring).

    Args:
        data: ``DIR``.
        split: reported split (the benchmark has one).
        languages: language codes to evaluate (default or ``["all"]``: every language present).

    Returns:
        a :class:`Benchmark` with one ``multilingual_<lang>`` :class:`RetrievalTask` per language (``kind``
        ``multilingual``, ``single`` text mode; one text per image that has a caption in that language);
        counts ``images``, ``languages`` and ``texts_per_language`` (the smallest over the languages).

    Raises:
        BenchmarkError: no captions file, malformed lines, missing images, a requested language absent,
            or on the full 3,600-image set a language without a caption for every image.
    """
    data = Path(data)
    caps = _read(data)
    keys = list(caps)
    if not keys:
        raise BenchmarkError(f"{data}: no images in the captions file")
    present = sorted({lang for v in caps.values() for lang in v})
    langs = present if languages in (None, ["all"]) else list(languages)
    absent = [lang for lang in langs if lang not in present]
    if absent:
        raise BenchmarkError(f"{data}: no captions in {absent} (present: {', '.join(present)})")
    img_dir = _image_dir(data, keys)
    images = [ImageRef(path=str(img_dir / f"{k}.jpg"), name=f"{k}.jpg") for k in keys]
    tasks = []
    for lang in langs:
        texts, pairs = pairs_from_captions([[caps[k][lang]] if lang in caps[k] else [] for k in keys])
        if len(keys) == XM3600_IMAGES and len(texts) != XM3600_IMAGES:
            raise BenchmarkError(f"{data}: language {lang} has {len(texts)} first captions for {len(keys)} images; "
                                 f"the protocol needs one per image ({XM3600_IMAGES})")
        tasks.append(RetrievalTask(f"multilingual_{lang}", np.arange(len(keys)), texts, pairs,
                                   text_mode=SINGLE, kind="multilingual", lang=lang))
    counts = {"images": len(images), "languages": len(tasks),
              "texts_per_language": min(len(t.texts) for t in tasks)}
    return Benchmark("xm3600", split, images, tasks, str(data), counts)


# Published sizes: one (the first) caption per image and language.
@register_benchmark("xm3600",
                    expected={"images": XM3600_IMAGES, "languages": 36, "texts_per_language": XM3600_IMAGES})
def _load_xm3600(request: BenchmarkRequest) -> Benchmark:
    return xm3600(request.data, request.split, request.languages)
