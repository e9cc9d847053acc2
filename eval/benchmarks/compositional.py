"""Winoground and SugarCrepe in their published formats (SPEC §6, compositionality).

- Winoground (``facebook/winoground`` on Hugging Face), either layout, in ``DIR`` or ``DIR/data``:

  - today's: ``data/test-*.parquet`` with columns ``id``, ``image_0``, ``image_1`` (image structs
    ``{"bytes", "path"}``), ``caption_0``, ``caption_1`` (+ tags, not used);
  - the earlier one: ``examples.jsonl`` (or ``.json``), lines ``{"id", "image_0", "image_1", "caption_0",
    "caption_1", ...}`` naming images ``images/<image_N>.png`` (or ``.jpg``) beside it.

  400 examples, 800 images.
- SugarCrepe: ``<subset>.json`` in ``DIR`` (or ``DIR/data``, the repository's layout) = ``{id: {"filename",
  "caption", "negative_caption"}}`` for the subsets ``add_att add_obj replace_att replace_obj replace_rel
  swap_att swap_obj``; images are COCO val2017 files ``image_root/<filename>`` (default ``DIR/images``, else
  ``DIR/val2017``).

Both default to the ``multi`` text mode (SPEC §6).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from eval.benchmarks.base import Benchmark, BenchmarkError, ImageRef, SugarCrepeTask, WinogroundTask
from eval.benchmarks.registry import BenchmarkRequest, register_benchmark
from stage1_embed_text.config import MULTI

SUGARCREPE_SUBSETS = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")


def _winoground_parquet(files: list[Path]) -> tuple[list[ImageRef], np.ndarray, list[tuple[str, str]]]:
    """Images (encoded bytes), ``int64 [E, 2]`` pool ids and caption pairs from the Hugging Face parquet files."""
    images: list[ImageRef] = []
    ids, caps = [], []
    for f in files:
        try:
            table = pq.read_table(f, columns=["id", "image_0", "image_1", "caption_0", "caption_1"])
        except Exception as exc:  # pyarrow raises several types for a bad file or a missing column
            raise BenchmarkError(f"{f}: not a Winoground parquet file ({exc})") from None
        for row in table.to_pylist():
            pair = []
            for j in (0, 1):
                img = row[f"image_{j}"] or {}
                name = img.get("path") or f"ex_{row['id']}_img_{j}"
                if img.get("bytes"):
                    ref = ImageRef(data=img["bytes"], name=name)
                elif img.get("path") and (f.parent / img["path"]).is_file():
                    ref = ImageRef(path=str(f.parent / img["path"]), name=name)
                else:
                    raise BenchmarkError(f"{f}: example {row['id']} image_{j} has neither bytes nor a file")
                pair.append(len(images))
                images.append(ref)
            ids.append(pair)
            caps.append((row["caption_0"], row["caption_1"]))
    return images, np.array(ids, np.int64).reshape(-1, 2), caps


def _winoground_jsonl(path: Path) -> tuple[list[ImageRef], np.ndarray, list[tuple[str, str]]]:
    """The earlier layout: ``examples.jsonl`` naming images in ``images/`` beside it (shared images pooled once)."""
    text = path.read_text(encoding="utf-8").strip()
    try:
        rows = json.loads(text) if text.startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    except ValueError as exc:
        raise BenchmarkError(f"{path}: malformed JSON ({exc})") from None
    pool: dict[str, int] = {}
    images: list[ImageRef] = []
    img_dir = path.parent / "images"

    def ref(name: str) -> int:
        if name not in pool:
            p = next((img_dir / f"{name}{ext}" for ext in (".png", ".jpg", "") if (img_dir / f"{name}{ext}").is_file()),
                     None)
            if p is None:
                raise BenchmarkError(f"Winoground image {name} not found in {img_dir}")
            pool[name] = len(images)
            images.append(ImageRef(path=str(p), name=name))
        return pool[name]

    try:
        ids = np.array([(ref(r["image_0"]), ref(r["image_1"])) for r in rows], np.int64).reshape(-1, 2)
        caps = [(r["caption_0"], r["caption_1"]) for r in rows]
    except KeyError as exc:
        raise BenchmarkError(f"{path}: an example lacks {exc}") from None
    return images, ids, caps


def winoground(data: str | Path, split: str = "test") -> Benchmark:
    """Load Winoground from ``DIR`` or ``DIR/data`` (module docstring): ``<split>-*.parquet`` when present,
    else ``examples.jsonl``/``examples.json`` with ``images/``.

    Returns:
        a :class:`Benchmark` with one :class:`WinogroundTask` (``multi`` text mode); counts ``examples``,
        ``images``.

    Raises:
        BenchmarkError: neither layout found, a malformed file, or an image that is missing.
    """
    data = Path(data)
    dirs = [d for d in (data, data / "data") if d.is_dir()]
    parquet = next((sorted(d.glob(f"{split}-*.parquet")) for d in dirs if any(d.glob(f"{split}-*.parquet"))), [])
    legacy = next((d / n for d in dirs for n in ("examples.jsonl", "examples.json") if (d / n).is_file()), None)
    if parquet:
        images, ids, caps = _winoground_parquet(parquet)
        source = parquet[0].parent
    elif legacy is not None:
        images, ids, caps = _winoground_jsonl(legacy)
        source = legacy
    else:
        raise BenchmarkError(f"{data}: no Winoground data ({split}-*.parquet or examples.jsonl, here or in data/)")
    if not caps:
        raise BenchmarkError(f"{source}: no Winoground examples")
    task = WinogroundTask("winoground", ids, caps, text_mode=MULTI)
    return Benchmark("winoground", split, images, [task], str(source), {"examples": len(caps), "images": len(images)})


@register_benchmark("winoground", expected={"examples": 400, "images": 800})
def _load_winoground(request: BenchmarkRequest) -> Benchmark:
    return winoground(request.data, request.split)


def sugarcrepe(data: str | Path, split: str = "test", image_root: str | Path | None = None) -> Benchmark:
    """Load every SugarCrepe subset file present in ``data`` (or ``data/data``).

    Args:
        data: ``DIR`` (module docstring).
        split: reported split.
        image_root: the COCO val2017 images (default ``DIR/images``, else ``DIR/val2017``).

    Returns:
        a :class:`Benchmark` with one :class:`SugarCrepeTask` per subset file (``multi`` text mode); counts
        per subset and ``images`` (distinct files).

    Raises:
        BenchmarkError: no subset file, a malformed one, or no image folder.
    """
    data = Path(data)
    ann = next((d for d in (data, data / "data") if any((d / f"{s}.json").is_file() for s in SUGARCREPE_SUBSETS)),
               None)
    if ann is None:
        raise BenchmarkError(f"{data}: none of {[s + '.json' for s in SUGARCREPE_SUBSETS]} (here or in data/)")
    if image_root:
        root = Path(image_root)
    else:
        root = next((d for d in (data / "images", data / "val2017") if d.is_dir()), data / "images")
    if not root.is_dir():
        raise BenchmarkError(f"SugarCrepe images: no folder {root}" + ("" if image_root else
                             f" or {data / 'val2017'}; pass the COCO val2017 folder as image_root"))
    pool: dict[str, int] = {}
    images: list[ImageRef] = []
    tasks, counts = [], {}
    for subset in SUGARCREPE_SUBSETS:
        f = ann / f"{subset}.json"
        if not f.exists():
            continue
        try:
            items = list(json.loads(f.read_text(encoding="utf-8")).values())
            names = [it["filename"] for it in items]
            pos, neg = [it["caption"] for it in items], [it["negative_caption"] for it in items]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BenchmarkError(f"{f}: malformed SugarCrepe file ({exc!r})") from None
        ids = []
        for name in names:
            if name not in pool:
                pool[name] = len(images)
                images.append(ImageRef(path=str(root / name), name=name))
            ids.append(pool[name])
        tasks.append(SugarCrepeTask(subset, np.array(ids, np.int64), pos, neg, text_mode=MULTI))
        counts[subset] = len(items)
    counts["images"] = len(images)
    return Benchmark("sugarcrepe", split, images, tasks, str(ann), counts)


# Published sizes: Hsieh et al. 2023, table 1, except swap_obj, whose released file has 245 since one wrong
# case was removed upstream. Only the subset files present are checked.
@register_benchmark("sugarcrepe", present_only=True, expected={
    "add_att": 692, "add_obj": 2062, "replace_att": 788, "replace_obj": 1652, "replace_rel": 1406, "swap_att": 666,
    "swap_obj": 245})
def _load_sugarcrepe(request: BenchmarkRequest) -> Benchmark:
    return sugarcrepe(request.data, request.split, request.image_root)
