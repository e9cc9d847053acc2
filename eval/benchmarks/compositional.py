"""Winoground and SugarCrepe in their published JSON formats (SPEC §6, compositionality).

- Winoground (``facebook/winoground``): ``DIR/examples.jsonl`` (or ``.json``), lines ``{"id", "image_0",
  "image_1", "caption_0", "caption_1", ...}``; images ``DIR/images/<image_N>.png`` (or ``.jpg``). 400 examples.
- SugarCrepe: ``DIR/<subset>.json`` = ``{id: {"filename", "caption", "negative_caption"}}`` for the subsets
  ``add_att add_obj replace_att replace_obj replace_rel swap_att swap_obj``; images are COCO val2017 files
  ``image_root/<filename>`` (default ``DIR/images``).

Both default to the ``multi`` text mode (SPEC §6).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from eval.benchmarks.base import Benchmark, BenchmarkError, ImageRef, SugarCrepeTask, WinogroundTask

SUGARCREPE_SUBSETS = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")


def winoground(data: str | Path, split: str = "test") -> Benchmark:
    """Load Winoground examples; images shared between examples are pooled once."""
    data = Path(data)
    path = data / "examples.jsonl" if (data / "examples.jsonl").exists() else data / "examples.json"
    if not path.exists():
        raise BenchmarkError(f"{data}: no examples.jsonl")
    text = path.read_text(encoding="utf-8").strip()
    rows = json.loads(text) if text.startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    pool: dict[str, int] = {}
    images: list[ImageRef] = []

    def ref(name: str) -> int:
        if name not in pool:
            p = next((data / "images" / f"{name}{ext}" for ext in (".png", ".jpg", "") if (data / "images" / f"{name}{ext}").exists()), None)
            if p is None:
                raise BenchmarkError(f"Winoground image {name} not found in {data / 'images'}")
            pool[name] = len(images)
            images.append(ImageRef(path=str(p), name=name))
        return pool[name]

    ids = np.array([(ref(r["image_0"]), ref(r["image_1"])) for r in rows], np.int64)
    caps = [(r["caption_0"], r["caption_1"]) for r in rows]
    task = WinogroundTask("winoground", ids, caps, text_mode="multi")
    return Benchmark("winoground", split, images, [task], str(path), {"examples": len(rows), "images": len(images)})


def sugarcrepe(data: str | Path, split: str = "test", image_root: str | Path | None = None) -> Benchmark:
    """Load every SugarCrepe subset file present in ``data``."""
    data = Path(data)
    root = Path(image_root) if image_root else data / "images"
    pool: dict[str, int] = {}
    images: list[ImageRef] = []
    tasks, counts = [], {}
    for subset in SUGARCREPE_SUBSETS:
        f = data / f"{subset}.json"
        if not f.exists():
            continue
        items = list(json.loads(f.read_text(encoding="utf-8")).values())
        ids = []
        for it in items:
            if it["filename"] not in pool:
                pool[it["filename"]] = len(images)
                images.append(ImageRef(path=str(root / it["filename"]), name=it["filename"]))
            ids.append(pool[it["filename"]])
        tasks.append(SugarCrepeTask(subset, np.array(ids, np.int64), [it["caption"] for it in items],
                                    [it["negative_caption"] for it in items], text_mode="multi"))
        counts[subset] = len(items)
    if not tasks:
        raise BenchmarkError(f"{data}: none of {[s + '.json' for s in SUGARCREPE_SUBSETS]}")
    counts["images"] = len(images)
    return Benchmark("sugarcrepe", split, images, tasks, str(data), counts)
