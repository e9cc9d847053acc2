"""The embedded default benchmark: the emoji manifest's test split (SPEC §6, §9; issue 5).

Tasks built from a manifest directory (``--data``, written by ``flame manifest emoji``):

- ``retrieval_en_raw``: English retrieval with ``raw_caption`` as the text (default mode ``single``, the raw
  prompt that the raw caption was trained with);
- ``retrieval_en_long``: English retrieval with ``long_caption`` (default mode ``multi``, its 7 facets);
- ``classification_category`` / ``classification_subcategory``: zero-shot into the label values of the
  **whole** manifest (every split, so classes absent from test still compete), templates
  :data:`TEMPLATES`, subcategory names with ``-`` read as spaces (``face-smiling`` -> ``face smiling``);
- ``multilingual_<lang>``: retrieval with ``names[lang]`` as the text (default mode ``single``), for
  :data:`LANGUAGES` by default (each text costs an LLM pass; ``languages=["all"]`` takes every non-English
  language of the names maps);
- ``linear_probe_category`` (optional): logistic regression on pre-projector features, train split -> split.

Positives: both vendors' images of one emoji carry the same captions and names. Identical text strings are
therefore merged into **one** text whose positives are all images carrying it: an image query hits when its
(shared) text is in the top k, a text query hits when **either** image is (see
:func:`eval.benchmarks.base.pairs_from_captions` with ``dedupe=True``). Without merging, two identical texts
would tie and one of them would be scored as a false miss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from eval.benchmarks.base import (
    Benchmark,
    BenchmarkError,
    ClassificationTask,
    ImageRef,
    LinearProbeTask,
    RetrievalTask,
    pairs_from_captions,
)
from eval.benchmarks.registry import BenchmarkRequest, register_benchmark
from manifests.schema import LONG_CAPTION, RAW_CAPTION, pairs_to_dict, read_manifest
from stage1_embed_text.config import MULTI, SINGLE

LANGUAGES = ("de", "fr", "es", "ja", "zh", "ar", "hi")
TEMPLATES = ["an emoji of {}.", "an emoji of a {}.", "a {} emoji.", "an icon of {}."]
LABEL_FIELDS = ("category", "subcategory")
_COLUMNS = ["image_path", "image_member", "image_bytes", RAW_CAPTION, LONG_CAPTION, "split", "labels", "names"]


def _rows(manifest_dir: Path, split: str | None, columns: list[str]) -> list[dict[str, Any]]:
    rows = read_manifest(manifest_dir, columns=columns, split=split).to_pylist()
    for r in rows:
        for m in ("labels", "names"):
            if m in r:
                r[m] = pairs_to_dict(r[m])
    return rows


def _ref(row: dict[str, Any], base: Path) -> ImageRef:
    return ImageRef(path=row.get("image_path"), member=row.get("image_member"), data=row.get("image_bytes"),
                    base_dir=str(base), name=row["key"])


def classname(field: str, value: str) -> str:
    """Readable class name for a label value (subcategories use ``-`` between words)."""
    return value.replace("-", " ") if field == "subcategory" else value


def emoji(data: str | Path, split: str = "test", linear_probe: bool = False,
          languages: list[str] | None = None) -> Benchmark:
    """Build the emoji benchmark from a manifest directory.

    Args:
        data: manifest directory.
        split: split evaluated.
        linear_probe: add ``linear_probe_category`` (train split -> ``split``).
        languages: multilingual languages (default :data:`LANGUAGES`; ``["all"]``: every non-English language
            of the names maps). Languages absent from the names maps are skipped.

    Raises:
        BenchmarkError: the split is empty.
    """
    base = Path(data)
    rows = _rows(base, split, _COLUMNS)
    if not rows:
        raise BenchmarkError(f"{base}: no rows of split {split!r}")
    images = [_ref(r, base) for r in rows]
    ids = np.arange(len(rows))
    tasks: list = []
    for field, mode in ((RAW_CAPTION, SINGLE), (LONG_CAPTION, MULTI)):
        texts, pairs = pairs_from_captions([[r.get(field)] for r in rows], dedupe=True)
        if len(pairs):
            tasks.append(RetrievalTask(f"retrieval_en_{field.split('_')[0]}", ids, texts, pairs, text_mode=mode))
    all_labels = _rows(base, None, ["labels"])
    for field in LABEL_FIELDS:
        values = sorted({(r.get("labels") or {}).get(field) for r in all_labels} - {None})
        if len(values) < 2:
            continue
        index = {v: i for i, v in enumerate(values)}
        have = [i for i, r in enumerate(rows) if (r.get("labels") or {}).get(field) in index]
        labels = np.array([index[rows[i]["labels"][field]] for i in have], np.int64)
        tasks.append(ClassificationTask(f"classification_{field}", np.array(have, np.int64), labels,
                                        [classname(field, v) for v in values], TEMPLATES, text_mode=SINGLE))
        if linear_probe and field == "category":
            train = [r for r in _rows(base, "train", _COLUMNS[:3] + ["labels"])
                     if (r.get("labels") or {}).get(field) in index]
            start = len(images)
            images += [_ref(r, base) for r in train]
            tasks.append(LinearProbeTask(f"linear_probe_{field}", np.arange(start, len(images)),
                                         np.array([index[r["labels"][field]] for r in train], np.int64),
                                         np.array(have, np.int64), labels, [classname(field, v) for v in values]))
    present = {lang for r in rows for lang in (r.get("names") or {})} - {"en"}
    langs = sorted(present) if languages == ["all"] else [lang for lang in languages or LANGUAGES if lang in present]
    for lang in langs:
        texts, pairs = pairs_from_captions([[(r.get("names") or {}).get(lang)] for r in rows], dedupe=True)
        if len(pairs):
            tasks.append(RetrievalTask(f"multilingual_{lang}", ids, texts, pairs, text_mode=SINGLE,
                                       kind="multilingual", lang=lang))
    counts = {"images": len(rows)}
    if linear_probe:
        counts["train_images"] = len(images) - len(rows)
    return Benchmark("emoji", split, images, tasks, str(base), counts)


@register_benchmark("emoji")
def _load_emoji(request: BenchmarkRequest) -> Benchmark:
    """``emoji`` (no published sizes: the embedded default is this project's own set)."""
    return emoji(request.data, request.split, linear_probe=request.linear_probe, languages=request.languages)
