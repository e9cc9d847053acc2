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

An image that does not open at eval time is left out of every task by :meth:`Benchmark.without_images`
(each task type knows what goes with it: a retrieval image's pairs, a classification sample, a Winoground
example), so the remaining images keep their ground truth.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from manifests.images import decode_image, load_image
from pipeline.errors import FlameError

log = logging.getLogger(__name__)


class BenchmarkError(FlameError, ValueError):
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
        """Decode to a PIL RGB image (:func:`manifests.images.load_image`).

        Raises:
            UndecodableImageError, FileNotFoundError, OSError: as :func:`manifests.images.load_image`; eval
                counts and skips such an image (:func:`eval.embedding.embed_images`).
        """
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

    def without_images(self, dropped: np.ndarray) -> RetrievalTask | None:
        """The task without the pool images flagged in ``dropped`` (``bool [N_pool]``), or None if no pair is left.

        A dropped image takes its pairs along; a text left without any positive goes too (the task as if
        those images had never been in the benchmark), while a text that had no positive to begin with stays
        as a distractor. Positions in ``image_ids`` and text indices are renumbered, pairs kept aligned.
        """
        keep_img = ~dropped[self.image_ids]
        pairs = self.pairs[keep_img[self.pairs[:, 0]]]
        if not len(pairs):
            return None
        keep_txt = np.ones(len(self.texts), bool)
        keep_txt[self.pairs[:, 1]] = False
        keep_txt[pairs[:, 1]] = True
        img_pos, txt_pos = np.cumsum(keep_img) - 1, np.cumsum(keep_txt) - 1
        return replace(self, image_ids=self.image_ids[keep_img],
                       texts=[t for t, keep in zip(self.texts, keep_txt) if keep],
                       pairs=np.stack([img_pos[pairs[:, 0]], txt_pos[pairs[:, 1]]], axis=1).astype(np.int64))


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

    def without_images(self, dropped: np.ndarray) -> ClassificationTask | None:
        """The task without the samples whose pool image is flagged in ``dropped`` (``bool [N_pool]``), or None
        if none is left. Classes stay as they are (a class may end up without images)."""
        keep = ~dropped[self.image_ids]
        return replace(self, image_ids=self.image_ids[keep], labels=self.labels[keep]) if keep.any() else None


@dataclass
class WinogroundTask:
    """``image_ids[e] = (image 0, image 1)``, ``captions[e] = (caption 0, caption 1)``."""

    name: str
    image_ids: np.ndarray
    captions: list[tuple[str, str]]
    text_mode: str | None = None

    def without_images(self, dropped: np.ndarray) -> WinogroundTask | None:
        """The task without the examples that have an image flagged in ``dropped`` (``bool [N_pool]``), or
        None if none is left."""
        keep = ~dropped[self.image_ids].any(axis=1)
        if not keep.any():
            return None
        return replace(self, image_ids=self.image_ids[keep], captions=[c for c, k in zip(self.captions, keep) if k])


@dataclass
class SugarCrepeTask:
    """One SugarCrepe subset: image ``image_ids[n]``, positive ``positives[n]``, hard negative ``negatives[n]``."""

    name: str
    image_ids: np.ndarray
    positives: list[str]
    negatives: list[str]
    text_mode: str | None = None

    def without_images(self, dropped: np.ndarray) -> SugarCrepeTask | None:
        """The task without the examples whose image is flagged in ``dropped`` (``bool [N_pool]``), or None if
        none is left."""
        keep = ~dropped[self.image_ids]
        if not keep.any():
            return None
        return replace(self, image_ids=self.image_ids[keep], positives=[p for p, k in zip(self.positives, keep) if k],
                       negatives=[n for n, k in zip(self.negatives, keep) if k])


@dataclass
class LinearProbeTask:
    """Logistic regression on pre-projector features: fit on ``train_*``, score ``test_*``."""

    name: str
    train_ids: np.ndarray
    train_labels: np.ndarray
    test_ids: np.ndarray
    test_labels: np.ndarray
    classnames: list[str]

    def without_images(self, dropped: np.ndarray) -> LinearProbeTask | None:
        """The probe without the train and test samples whose image is flagged in ``dropped`` (``bool
        [N_pool]``), or None if no test sample or fewer than two training classes are left."""
        train, test = ~dropped[self.train_ids], ~dropped[self.test_ids]
        if not test.any() or len(np.unique(self.train_labels[train])) < 2:
            return None
        return replace(self, train_ids=self.train_ids[train], train_labels=self.train_labels[train],
                       test_ids=self.test_ids[test], test_labels=self.test_labels[test])


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

    def without_images(self, ids: Collection[int]) -> Benchmark:
        """The benchmark with pool images ``ids`` left out of every task (the pool itself, and so every index
        into it, stays as it is). A task with too little left (see each task's ``without_images``) is removed
        with a warning; ``counts`` stay the loaded sizes.

        Raises:
            BenchmarkError: no task has anything left.
        """
        if not len(ids):
            return self
        dropped = np.zeros(len(self.images), bool)
        dropped[np.fromiter(ids, np.int64)] = True
        tasks = []
        for task in self.tasks:
            kept = task.without_images(dropped)
            if kept is None:
                log.warning("%s: task %s has too few images left after skipping %d; it is not evaluated",
                            self.name, task.name, len(ids))
            else:
                tasks.append(kept)
        if not tasks:
            raise BenchmarkError(f"{self.name}: no task has images left after skipping {len(ids)} of "
                                 f"{len(self.images)} images")
        return replace(self, tasks=tasks)


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


def read_list(path: Path | str, comments: bool = False) -> list[str]:
    """Non-empty stripped lines of a UTF-8 text file (``comments``: also drop lines starting with ``#``).

    Raises:
        BenchmarkError: the file does not exist or is not UTF-8.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchmarkError(f"cannot read {path}: {exc}") from None
    lines = (line.strip() for line in text.splitlines())
    return [s for s in lines if s and not (comments and s.startswith("#"))]
