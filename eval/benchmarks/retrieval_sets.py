"""Adapters for image-text retrieval benchmarks in their published formats (SPEC §6).

=================  ========================================================================================
``coco``,          Karpathy-split JSON (``dataset_coco.json`` / ``dataset_flickr30k.json``):
``flickr30k``      ``{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}]}]}``; images at
                   ``ROOT/filepath/filename`` or ``ROOT/filename`` (ROOT: ``image_root`` or the JSON's folder,
                   also tried with ``images/``). 5 captions per image, each its own text.
``wds``            CLIP_benchmark's webdataset export: ``DIR/{split}/{0..n-1}.tar`` (``nshards.txt``), samples
                   ``{key}.webp|png|jpg|jpeg`` + ``{key}.txt`` (captions, one per line) for retrieval or
                   ``{key}.cls`` + ``DIR/classnames.txt`` (+ ``zeroshot_classification_templates.txt``) for
                   classification; with ``linear_probe``, a classification set with ``DIR/train/`` shards also
                   gets a linear probe fit on ``train`` and scored on the split (FLAME's linear-probe protocol).
``urban1k``        Urban-1k: ``DIR/image/NAME.jpg`` and ``DIR/caption/NAME.txt``; the text is the **first line**
                   of the caption file (FLAME's script).
``sharegpt4v-1k``  the share-captioner JSON list (``{"image": REL_PATH, "conversations": [.., {"from":
                   "gpt", "value": CAPTION}]}``), the **first 1000 entries** (Long-CLIP's protocol); images at
                   ``image_root/REL_PATH``.
``dci``            DCI: ``DIR/densely_captioned_images/{splits.json, annotations/*.json, photos/}``; every
                   annotation listed in ``splits.json`` (all splits concatenated, reported as split ``all``);
                   text = :func:`dci_text` of ``short_caption`` and ``extra_caption`` (FLAME's ``eval_dci.py``).
``docci``          ``docci_descriptions.jsonlines`` (``{"image_file", "split", "description"}``) filtered to
                   the split (``test``: 5000), newlines in a description read as spaces; images in
                   ``DIR/images/``.
=================  ========================================================================================

Every adapter returns a :class:`eval.benchmarks.base.Benchmark` with one :class:`RetrievalTask`; the
long-caption sets are tagged ``kind="long_caption"`` and default to the ``multi`` text mode (SPEC §6).
"""

from __future__ import annotations

import json
import re
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from eval.benchmarks.base import (
    Benchmark,
    BenchmarkError,
    ClassificationTask,
    ImageRef,
    LinearProbeTask,
    RetrievalTask,
    pairs_from_captions,
    read_list,
    resolve_file,
)
from eval.benchmarks.registry import BenchmarkRequest, register_benchmark
from stage1_embed_text.config import MULTI, SINGLE

IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")


def _retrieval(name: str, split: str, images: list[ImageRef], captions: list[list[str]], source: Path,
               kind: str = "retrieval", dedupe: bool = False) -> Benchmark:
    """The benchmark of one retrieval task over ``images`` and their ``captions``.

    Raises:
        BenchmarkError: no image has a caption (there would be no query).
    """
    texts, pairs = pairs_from_captions(captions, dedupe=dedupe)
    if not len(pairs):
        raise BenchmarkError(f"{source}: none of the {len(images)} images of split {split!r} has a caption")
    # SPEC §6: English and long-caption retrieval use the multi-facet text mode by default
    task = RetrievalTask(f"{kind}_en", np.arange(len(images)), texts, pairs, text_mode=MULTI, kind=kind)
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


def _wds_samples(data: Path, split: str) -> list[dict[str, object]]:
    """The samples of one split in shard and key order: ``{"image": ImageRef, "txt"?: str, "cls"?: str}``.

    The shards are read with webdataset's tar iteration (``url_opener`` + ``tar_file_expander``); a sample's key
    is the member name up to the first ``.`` of its base name, as webdataset groups them (``base_plus_ext``).
    Images are kept as references (shard, member), read again when the benchmark embeds them.
    """
    # webdataset imports torch: only here, so registering the benchmarks stays light
    from webdataset.tariterators import base_plus_ext, tar_file_expander, url_opener

    samples: dict[tuple[int, str], dict[str, object]] = defaultdict(dict)
    shards = _shards(data, split)
    index = {str(shard): si for si, shard in enumerate(shards)}
    wanted = set(IMAGE_EXTS) | {"txt", "cls"}

    def select(fname: str) -> bool:
        return (base_plus_ext(fname)[1] or "").lower() in wanted

    try:
        members = tar_file_expander(url_opener([{"url": str(s)} for s in shards]), select_files=select,
                                    eof_value=None)
        for member in members:
            key, ext = base_plus_ext(member["fname"])
            ext, si = ext.lower(), index[member["__url__"]]
            if ext in IMAGE_EXTS:
                samples[(si, key)]["image"] = ImageRef(path=str(shards[si]), member=member["fname"], name=member["fname"])
            else:
                samples[(si, key)][ext] = member["data"].decode("utf-8")
    except (tarfile.TarError, OSError, UnicodeDecodeError, ValueError) as exc:
        raise BenchmarkError(f"{data}/{split}: unreadable webdataset shard ({exc})") from None
    rows = [s for _, s in sorted(samples.items()) if "image" in s]
    if not rows:
        raise BenchmarkError(f"{data}: no image samples in split {split!r}")
    return rows


def _wds_labels(rows: list[dict[str, object]], where: str) -> np.ndarray:
    try:
        return np.array([int(str(r["cls"]).strip()) for r in rows], np.int64)
    except ValueError as exc:
        raise BenchmarkError(f"{where}: a .cls member is not an integer class index ({exc})") from None


def clip_benchmark_wds(data: str | Path, split: str = "test", name: str = "wds",
                       linear_probe: bool = False) -> Benchmark:
    """A dataset exported by CLIP_benchmark to webdataset (retrieval with ``.txt`` or classification ``.cls``).

    Args:
        data: ``DIR`` (module docstring).
        split: the shard folder evaluated, ``DIR/<split>/``.
        name: benchmark name reported.
        linear_probe: for a classification set, also fit a linear probe on ``DIR/train/`` (when it has shards
            and ``split`` is not ``train``) and score it on ``split``.

    Returns:
        a :class:`Benchmark`: one retrieval task (counts ``images``, ``texts``), or a zero-shot classification
        task (counts ``images``, ``classes``) plus ``linear_probe`` (count ``train_images``).

    Raises:
        BenchmarkError: missing or unreadable shards, samples mixing ``.txt`` and ``.cls``, a class index that is
            not an integer in ``[0, len(classnames))``, or no ``classnames.txt``.
    """
    data = Path(data)
    rows = _wds_samples(data, split)
    images = [r["image"] for r in rows]
    if all("txt" in r for r in rows):
        captions = [[c.strip() for c in str(r["txt"]).splitlines() if c.strip()] for r in rows]
        return _retrieval(name, split, images, captions, data)
    if not all("cls" in r for r in rows):
        raise BenchmarkError(f"{data}: samples must all have .txt (retrieval) or all .cls (classification)")
    classnames = read_list(resolve_file(data, "classnames.txt"))
    tfile = data / "zeroshot_classification_templates.txt"
    templates = read_list(tfile) if tfile.exists() else ["a photo of a {c}."]
    labels = _wds_labels(rows, f"{data}/{split}")
    if labels.min() < 0 or labels.max() >= len(classnames):
        raise BenchmarkError(f"{data}/{split}: class index {labels.max()} outside the {len(classnames)} class names")
    tasks: list = [ClassificationTask("zeroshot_classification", np.arange(len(rows)), labels, classnames, templates,
                                      text_mode=SINGLE)]
    counts = {"images": len(rows), "classes": len(classnames)}
    if linear_probe and split != "train" and (data / "train").is_dir():
        train = _wds_samples(data, "train")
        if not all("cls" in r for r in train):
            raise BenchmarkError(f"{data}/train: every sample needs a .cls member for the linear probe")
        train_labels = _wds_labels(train, f"{data}/train")
        if train_labels.min() < 0 or train_labels.max() >= len(classnames):
            raise BenchmarkError(f"{data}/train: class index {train_labels.max()} outside the {len(classnames)} "
                                 "class names")
        n = len(images)
        images = images + [r["image"] for r in train]
        tasks.append(LinearProbeTask("linear_probe", np.arange(n, len(images)), train_labels, np.arange(n), labels,
                                     classnames))
        counts["train_images"] = len(train)
    return Benchmark(name, split, images, tasks, str(data), counts)


def _load_karpathy(request: BenchmarkRequest) -> Benchmark:
    """COCO / Flickr30k: CLIP_benchmark's webdataset layout when ``data/<split>/`` holds tar shards, else a
    Karpathy JSON (:func:`karpathy`)."""
    data, split = request.data, request.split
    if data.is_dir() and (data / split).is_dir() and any((data / split).glob("*.tar")):
        return clip_benchmark_wds(data, split, name=request.name)
    return karpathy(request.name, data, split, request.image_root)


# Published sizes of the Karpathy test split.
register_benchmark("coco", _load_karpathy, expected={"images": 5000, "texts": 25010})
register_benchmark("flickr30k", _load_karpathy, expected={"images": 1000, "texts": 5000})


@register_benchmark("wds")
def _load_wds(request: BenchmarkRequest) -> Benchmark:
    return clip_benchmark_wds(request.data, request.split, linear_probe=request.linear_probe)


def urban1k(data: str | Path, split: str = "test") -> Benchmark:
    """Urban-1k: ``image/NAME.jpg`` paired with the first line of ``caption/NAME.txt`` (FLAME's protocol).

    Raises:
        BenchmarkError: no image with a matching caption file, or a caption file whose first line is empty.
    """
    data = Path(data)
    caps = {p.stem: p for p in (data / "caption").glob("*.txt")}
    imgs = sorted(p for p in (data / "image").iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTS) \
        if (data / "image").is_dir() else []
    imgs = [p for p in imgs if p.stem in caps]
    if not imgs:
        raise BenchmarkError(f"{data}: expected image/ and caption/ folders with matching names")
    images = [ImageRef(path=str(p), name=p.name) for p in imgs]
    captions = []
    for p in imgs:
        first = (caps[p.stem].read_text(encoding="utf-8").splitlines() or [""])[0].strip()
        if not first:
            raise BenchmarkError(f"{caps[p.stem]}: the first line (the caption) is empty")
        captions.append([first])
    return _retrieval("urban1k", split, images, captions, data, kind="long_caption")


@register_benchmark("urban1k", expected={"images": 1000, "texts": 1000})
def _load_urban1k(request: BenchmarkRequest) -> Benchmark:
    return urban1k(request.data, request.split)


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


@register_benchmark("sharegpt4v-1k", expected={"images": 1000, "texts": 1000})
def _load_sharegpt4v(request: BenchmarkRequest) -> Benchmark:
    return sharegpt4v(request.data, request.split, request.image_root)


#: What FLAME's DCI evaluation splits a caption at before re-joining the pieces with ". ".
_DCI_SPLIT = re.compile(r"\n|</s>|\.")


def dci_text(short_caption: str, extra_caption: str) -> str:
    """One DCI retrieval text: ``short_caption + "\\n" + extra_caption`` split at newlines, ``</s>`` and ``.``,
    pieces stripped, empty pieces dropped, the rest joined with ``". "`` (FLAME's ``eval_dci.py``).

    >>> dci_text("A cat.", "It sleeps.</s>On a mat.\\n")
    'A cat. It sleeps. On a mat'
    """
    pieces = (p.strip() for p in _DCI_SPLIT.split(f"{short_caption}\n{extra_caption}"))
    return ". ".join(p for p in pieces if p)


def dci(data: str | Path, split: str = "test") -> Benchmark:
    """DCI long-caption retrieval.

    Args:
        data: ``DIR`` or ``DIR/densely_captioned_images``.
        split: ``test`` or ``all`` (FLAME's protocol: every annotation of every split in ``splits.json``,
            reported as split ``all``), or one split name of ``splits.json`` (only its annotations).

    Raises:
        BenchmarkError: no ``splits.json``, an unknown split, a missing or malformed annotation file.
    """
    data = Path(data)
    root = data / "densely_captioned_images" if (data / "densely_captioned_images").is_dir() else data
    try:
        splits = json.loads((root / "splits.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BenchmarkError(f"{root}: no readable splits.json ({exc})") from None
    if split in ("test", "all"):
        split, files = "all", [f for v in splits.values() for f in v]
    elif split in splits:
        files = list(splits[split])
    else:
        raise BenchmarkError(f"{root}/splits.json: no split {split!r} (has {sorted(splits)}; 'all' = every split)")
    images, captions = [], []
    for f in files:
        try:
            a = json.loads((root / "annotations" / f).read_text(encoding="utf-8"))
            text = dci_text(a["short_caption"], a["extra_caption"])
            image = a["image"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BenchmarkError(f"{root / 'annotations' / f}: unreadable DCI annotation ({exc!r})") from None
        images.append(ImageRef(path=str(root / "photos" / image), name=image))
        captions.append([text])
    return _retrieval("dci", split, images, captions, root, kind="long_caption")


# Published size: every split together (FLAME's protocol), which the adapter reports as split ``all``.
@register_benchmark("dci", expected={"images": 7805, "texts": 7805}, published_split="all")
def _load_dci(request: BenchmarkRequest) -> Benchmark:
    return dci(request.data, request.split)


def docci(data: str | Path, split: str = "test") -> Benchmark:
    """DOCCI: descriptions of the given split from ``docci_descriptions.jsonlines``, newlines as spaces.

    Raises:
        BenchmarkError: no such file, or no row of ``split``.
    """
    path = resolve_file(data, "docci_descriptions.jsonlines")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r.get("split") == split]
    if not rows:
        raise BenchmarkError(f"{path}: no rows of split {split!r}")
    img_dir = path.parent / "images"
    images = [ImageRef(path=str(img_dir / r["image_file"]), name=r["image_file"]) for r in rows]
    captions = [[r["description"].replace("\n", " ").strip()] for r in rows]
    return _retrieval("docci", split, images, captions, path, kind="long_caption")


@register_benchmark("docci", expected={"images": 5000, "texts": 5000})
def _load_docci(request: BenchmarkRequest) -> Benchmark:
    return docci(request.data, request.split)
