"""Adapters for image-text retrieval benchmarks in their published formats (SPEC §6).

=================  ========================================================================================
``coco``,          Karpathy-split JSON (``dataset_coco.json`` / ``dataset_flickr30k.json``):
``flickr30k``      ``{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}]}]}``; images at
                   ``ROOT/filepath/filename`` or ``ROOT/filename`` (ROOT: ``image_root`` or the JSON's folder,
                   also tried with ``images/``). 5 captions per image, each its own text.
``wds``            CLIP_benchmark's webdataset export: ``DIR/{split}/{0..n-1}.tar`` (``nshards.txt``), samples
                   ``{key}.webp|png|jpg|jpeg`` + ``{key}.txt`` (captions, one per line) for retrieval or
                   ``{key}.cls`` + ``DIR/classnames.txt`` (+ ``zeroshot_classification_templates.txt``) for
                   classification.
``urban1k``        Urban-1k: ``DIR/image/NAME.jpg`` and ``DIR/caption/NAME.txt`` (one long caption each).
``sharegpt4v-1k``  the share-captioner JSON list (``{"image": REL_PATH, "conversations": [.., {"from":
                   "gpt", "value": CAPTION}]}``), the **first 1000 entries** (Long-CLIP's protocol); images at
                   ``image_root/REL_PATH``.
``dci``            DCI: ``DIR/densely_captioned_images/{splits.json, annotations/*.json, photos/}``; text =
                   ``short_caption + "\\n" + extra_caption`` of every annotation listed in ``splits.json``.
``docci``          ``docci_descriptions.jsonlines`` (``{"image_file", "split", "description"}``) filtered to
                   the split (``test``: 5000); images in ``DIR/images/``.
=================  ========================================================================================

Every adapter returns a :class:`eval.benchmarks.base.Benchmark` with one :class:`RetrievalTask`; the
long-caption sets are tagged ``kind="long_caption"`` and default to the ``multi`` text mode (SPEC §6).
"""

from __future__ import annotations

import json
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from eval.benchmarks.base import (
    Benchmark,
    BenchmarkError,
    ClassificationTask,
    ImageRef,
    RetrievalTask,
    pairs_from_captions,
    resolve_file,
)

IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")


def _retrieval(name: str, split: str, images: list[ImageRef], captions: list[list[str]], source: Path,
               kind: str = "retrieval", dedupe: bool = False) -> Benchmark:
    texts, pairs = pairs_from_captions(captions, dedupe=dedupe)
    mode = "multi"  # SPEC §6: English and long-caption retrieval use the multi-facet text mode by default
    task = RetrievalTask(f"{kind}_en", np.arange(len(images)), texts, pairs, text_mode=mode, kind=kind)
    return Benchmark(name, split, images, [task], str(source), {"images": len(images), "texts": len(texts)})


def karpathy(name: str, data: str | Path, split: str = "test", image_root: str | Path | None = None) -> Benchmark:
    """COCO / Flickr30k from a Karpathy-split JSON file (or a folder holding ``dataset_<name>.json``)."""
    path = resolve_file(data, f"dataset_{name}.json", "dataset.json")
    entries = [e for e in json.loads(path.read_text(encoding="utf-8"))["images"] if e.get("split") == split]
    if not entries:
        raise BenchmarkError(f"{path}: no images of split {split!r}")
    root = Path(image_root) if image_root else path.parent

    def rel(e: dict) -> str:
        return str(Path(e.get("filepath", "")) / e["filename"])

    bases = [b for b in (root, root / "images") if (b / rel(entries[0])).exists() or (b / entries[0]["filename"]).exists()]
    if not bases:
        raise BenchmarkError(f"image {rel(entries[0])} not found under {root} (set image_root)")
    base = bases[0]
    use_filepath = (base / rel(entries[0])).exists()
    images = [ImageRef(path=rel(e) if use_filepath else e["filename"], base_dir=str(base), name=e["filename"])
              for e in entries]
    captions = [[s["raw"].strip() for s in e["sentences"]] for e in entries]
    return _retrieval(name, split, images, captions, path)


def _shards(data: Path, split: str) -> list[Path]:
    d = data / split
    nfile = d / "nshards.txt"
    shards = [d / f"{i}.tar" for i in range(int(nfile.read_text().strip()))] if nfile.exists() else sorted(d.glob("*.tar"))
    if not shards or not all(s.exists() for s in shards):
        raise BenchmarkError(f"no webdataset shards for split {split!r} under {d}")
    return shards


def clip_benchmark_wds(data: str | Path, split: str = "test", name: str = "wds") -> Benchmark:
    """A dataset exported by CLIP_benchmark to webdataset (retrieval with ``.txt`` or classification ``.cls``)."""
    data = Path(data)
    samples: dict[tuple[int, str], dict[str, object]] = defaultdict(dict)
    for si, shard in enumerate(_shards(data, split)):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                ext = ext.lower()
                if ext in IMAGE_EXTS:
                    samples[(si, key)]["image"] = ImageRef(path=str(shard), member=m.name, name=m.name)
                elif ext in ("txt", "cls"):
                    samples[(si, key)][ext] = tar.extractfile(m).read().decode("utf-8")
    rows = [s for _, s in sorted(samples.items()) if "image" in s]
    if not rows:
        raise BenchmarkError(f"{data}: no image samples in split {split!r}")
    images = [r["image"] for r in rows]
    if all("txt" in r for r in rows):
        captions = [[c.strip() for c in str(r["txt"]).splitlines() if c.strip()] for r in rows]
        return _retrieval(name, split, images, captions, data)
    if all("cls" in r for r in rows):
        classnames = [c.strip() for c in resolve_file(data, "classnames.txt").read_text(encoding="utf-8").splitlines() if c.strip()]
        tfile = data / "zeroshot_classification_templates.txt"
        templates = ([t.strip() for t in tfile.read_text(encoding="utf-8").splitlines() if t.strip()]
                     if tfile.exists() else ["a photo of a {c}."])
        labels = np.array([int(str(r["cls"]).strip()) for r in rows], np.int64)
        task = ClassificationTask("zeroshot_classification", np.arange(len(rows)), labels, classnames, templates,
                                  text_mode="single")
        return Benchmark(name, split, images, [task], str(data), {"images": len(rows), "classes": len(classnames)})
    raise BenchmarkError(f"{data}: samples must all have .txt (retrieval) or all .cls (classification)")


def urban1k(data: str | Path, split: str = "test") -> Benchmark:
    """Urban-1k: ``image/NAME.jpg`` paired with ``caption/NAME.txt``."""
    data = Path(data)
    caps = {p.stem: p for p in (data / "caption").glob("*.txt")}
    imgs = sorted(p for p in (data / "image").iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTS) \
        if (data / "image").is_dir() else []
    imgs = [p for p in imgs if p.stem in caps]
    if not imgs:
        raise BenchmarkError(f"{data}: expected image/ and caption/ folders with matching names")
    images = [ImageRef(path=str(p), name=p.name) for p in imgs]
    captions = [[caps[p.stem].read_text(encoding="utf-8").strip()] for p in imgs]
    return _retrieval("urban1k", split, images, captions, data, kind="long_caption")


def sharegpt4v(data: str | Path, split: str = "test", image_root: str | Path | None = None, n: int = 1000) -> Benchmark:
    """ShareGPT4V-1k: the first ``n`` entries of the share-captioner JSON."""
    path = resolve_file(data, "share-captioner_coco_lcs_sam_1246k_1107.json")
    entries = json.loads(path.read_text(encoding="utf-8"))[:n]
    root = Path(image_root) if image_root else path.parent
    images, captions = [], []
    for e in entries:
        gpt = [c["value"] for c in e["conversations"] if c.get("from") == "gpt"]
        if not gpt:
            raise BenchmarkError(f"{path}: entry {e.get('id')!r} has no gpt caption")
        images.append(ImageRef(path=e["image"], base_dir=str(root), name=e["image"]))
        captions.append([gpt[0].replace("\n", " ").strip()])
    return _retrieval("sharegpt4v-1k", split, images, captions, path, kind="long_caption")


def dci(data: str | Path, split: str = "test") -> Benchmark:
    """DCI long-caption retrieval over every annotation listed in ``splits.json``."""
    data = Path(data)
    root = data / "densely_captioned_images" if (data / "densely_captioned_images").is_dir() else data
    files = [f for v in json.loads((root / "splits.json").read_text(encoding="utf-8")).values() for f in v]
    images, captions = [], []
    for f in files:
        a = json.loads((root / "annotations" / f).read_text(encoding="utf-8"))
        images.append(ImageRef(path=str(root / "photos" / a["image"]), name=a["image"]))
        captions.append([f"{a['short_caption']}\n{a['extra_caption']}".strip()])
    return _retrieval("dci", split, images, captions, root, kind="long_caption")


def docci(data: str | Path, split: str = "test") -> Benchmark:
    """DOCCI: descriptions of the given split from ``docci_descriptions.jsonlines``."""
    path = resolve_file(data, "docci_descriptions.jsonlines")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r.get("split") == split]
    if not rows:
        raise BenchmarkError(f"{path}: no rows of split {split!r}")
    img_dir = path.parent / "images"
    images = [ImageRef(path=str(img_dir / r["image_file"]), name=r["image_file"]) for r in rows]
    return _retrieval("docci", split, images, [[r["description"].strip()] for r in rows], path, kind="long_caption")
