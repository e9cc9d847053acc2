"""What a benchmark adapter produces: an image pool plus evaluation tasks over it (SPEC §6).

An adapter reads a benchmark in its published format and returns a :class:`Benchmark`: every image once in
``images`` (:class:`ImageRef`, opened lazily through the project's one decoder), and tasks that point into
that pool by index, so an image used by several tasks (the emoji test split: English and multilingual
retrieval, two classifications) is embedded once.

Positives of a retrieval task are explicit ``(image, text)`` pairs; :func:`pairs_from_captions` builds them
from "captions per image", either keeping every caption as its own text (the published protocols: COCO's
25,010 test captions stay 25,010 texts) or merging identical caption strings into one text whose positives
are all images carrying it (``dedupe=True``; the emoji set, where both vendors' images of one emoji have the
same captions, so either image is a correct answer).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from manifests.images import decode_image, load_image

log = logging.getLogger(__name__)


class BenchmarkError(ValueError):
    """A benchmark's files are missing or malformed, or (with ``strict``) its size is not the published one."""


@dataclass(frozen=True)
class ImageRef:
    """One image: encoded bytes, a file, or a member of a tar file.

    Attributes:
        path: file path, or the tar file when ``member`` is set (relative to ``base_dir``).
        member: tar member name.
        data: encoded bytes (wins over ``path``).
        base_dir: directory relative paths resolve against.
        name: how plots and errors name the image.
    """

    path: str | None = None
    member: str | None = None
    data: bytes | None = field(default=None, repr=False)
    base_dir: str = "."
    name: str = ""

    def open(self) -> Image.Image:
        """Decode to a PIL RGB image (:func:`manifests.images.load_image`)."""
        if self.data is not None:
            return decode_image(self.data, name=self.name or "<bytes>")
        row = {"key": self.name or self.path, "image_path": self.path, "image_member": self.member}
        return load_image(row, self.base_dir)


@dataclass
class RetrievalTask:
    """Image <-> text retrieval over ``image_ids`` (indices into :attr:`Benchmark.images`).

    Attributes:
        name: result key, e.g. ``"retrieval_en_single"``, ``"multilingual_de"``.
        image_ids: ``int64 [N_img]`` pool indices of the gallery images.
        texts: ``N_txt`` query/gallery texts.
        pairs: ``int64 [P, 2]`` positives as (position in ``image_ids``, text index).
        text_mode: the mode to embed texts in (``None``: the run's default).
        kind: ``"retrieval"``, ``"long_caption"`` or ``"multilingual"`` (how the report groups it).
        lang: language of the texts (BCP-47).
    """

    name: str
    image_ids: np.ndarray
    texts: list[str]
    pairs: np.ndarray
    text_mode: str | None = None
    kind: str = "retrieval"
    lang: str = "en"


@dataclass
class ClassificationTask:
    """Zero-shot classification: ``labels[n]`` is the class of image ``image_ids[n]``.

    ``templates`` contain ``{}`` (or ``{c}``) where the class name goes.
    """

    name: str
    image_ids: np.ndarray
    labels: np.ndarray
    classnames: list[str]
    templates: list[str]
    text_mode: str | None = None


@dataclass
class WinogroundTask:
    """``image_ids[e] = (image 0, image 1)``, ``captions[e] = (caption 0, caption 1)``."""

    name: str
    image_ids: np.ndarray
    captions: list[tuple[str, str]]
    text_mode: str | None = None


@dataclass
class SugarCrepeTask:
    """One SugarCrepe subset: image ``image_ids[n]``, positive ``positives[n]``, hard negative ``negatives[n]``."""

    name: str
    image_ids: np.ndarray
    positives: list[str]
    negatives: list[str]
    text_mode: str | None = None


@dataclass
class LinearProbeTask:
    """Logistic regression on pre-projector features: fit on ``train_*``, score ``test_*``."""

    name: str
    train_ids: np.ndarray
    train_labels: np.ndarray
    test_ids: np.ndarray
    test_labels: np.ndarray
    classnames: list[str]


Task = RetrievalTask | ClassificationTask | WinogroundTask | SugarCrepeTask | LinearProbeTask


@dataclass
class Benchmark:
    """An image pool and the tasks evaluated on it.

    Attributes:
        name: benchmark name (``"emoji"``, ``"coco"``, ...).
        split: split evaluated (``"test"``, ...).
        images: the pool.
        tasks: what to evaluate.
        source: where the data was read from.
        counts: sizes reported with the results (images, texts, examples ...).
    """

    name: str
    split: str
    images: list[ImageRef]
    tasks: list[Task]
    source: str = ""
    counts: dict[str, int] = field(default_factory=dict)


def pairs_from_captions(captions: Sequence[Sequence[str]], dedupe: bool = False) -> tuple[list[str], np.ndarray]:
    """Texts and (image, text) positive pairs from the captions of each image.

    Args:
        captions: ``captions[i]`` = the captions of image ``i`` (empty strings and None are skipped).
        dedupe: merge identical caption strings into one text positive for every image that has it.

    Returns:
        ``texts`` and ``int64 [P, 2]`` pairs.
    """
    texts: list[str] = []
    index: dict[str, int] = {}
    pairs = []
    for i, caps in enumerate(captions):
        for cap in caps:
            if not cap:
                continue
            if dedupe and cap in index:
                j = index[cap]
            else:
                j = len(texts)
                texts.append(cap)
                index.setdefault(cap, j)
            pairs.append((i, j))
    arr = np.unique(np.array(pairs, dtype=np.int64).reshape(-1, 2), axis=0)
    return texts, arr


def check_size(what: str, got: int, expected: int | None, strict: bool) -> None:
    """Warn (or raise :class:`BenchmarkError` when ``strict``) if ``got`` is not the published ``expected``."""
    if expected is None or got == expected:
        return
    msg = f"{what}: found {got}, the published benchmark has {expected}"
    if strict:
        raise BenchmarkError(msg + " (--strict)")
    log.warning("%s; results are not comparable to published numbers", msg)


def resolve_file(path: str | Path, *names: str) -> Path:
    """``path`` itself if it is a file, else the first of ``names`` inside it.

    Raises:
        BenchmarkError: nothing found.
    """
    p = Path(path)
    if p.is_file():
        return p
    for n in names:
        if (p / n).is_file():
            return p / n
    raise BenchmarkError(f"none of {list(names)} found in {p}")
