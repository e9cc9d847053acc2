"""ImageNet-style class folders for zero-shot classification and the linear probe (SPEC §6).

Layout (``DIR`` = ``--data``)::

    DIR/<split>/<class_dir>/*.jpg|JPEG|png|...  images (``DIR/<class_dir>/`` when there is no split folder)
    DIR/classnames.txt                          optional: one readable name per class, in sorted class_dir order
    DIR/templates.txt                           optional: one template per line with ``{}`` or ``{c}``

Class names without ``classnames.txt``: folder names that look like WordNet ids (``n01440764``) are never
used as class names (a text encoder scores them at chance, silently). Exactly 1000 of them are ImageNet-1k
in its standard class order (sorted ids), and get the 1000 standard readable names of open_clip
(``open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES``); any other number of WordNet-id folders is refused. Other folder
names are used as they are, ``_`` read as a space.

Templates without ``templates.txt``: the 80 CLIP ImageNet templates of open_clip
(``OPENAI_IMAGENET_TEMPLATES``, what CLIP_benchmark uses too) for ``imagenet`` and for
ImageNet's class names; :data:`DEFAULT_TEMPLATES` otherwise.

With ``linear_probe`` and a ``DIR/train/`` folder beside the evaluated split, a linear probe is added
(fit on train, scored on the split).
"""

from __future__ import annotations

import logging
import re
from functools import cache
from pathlib import Path

import numpy as np

from eval.benchmarks.base import (
    Benchmark,
    BenchmarkError,
    ClassificationTask,
    ImageRef,
    LinearProbeTask,
    read_list,
)
from eval.benchmarks.registry import BenchmarkRequest, register_benchmark
from stage1_embed_text.config import SINGLE

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
#: A few of the CLIP ImageNet prompts (Radford et al. 2021), for class folders that are not ImageNet.
DEFAULT_TEMPLATES = ["a photo of a {}.", "a bad photo of a {}.", "a photo of the large {}.",
                     "a photo of the small {}.", "a rendering of a {}.", "itap of a {}."]
#: A WordNet noun synset id, the folder names of ImageNet's train/val trees.
WNID = re.compile(r"n\d{8}")
IMAGENET_CLASSES = 1000


@cache
def _imagenet_classnames() -> tuple[str, ...]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return tuple(IMAGENET_CLASSNAMES)


@cache
def _openai_templates() -> tuple[str, ...]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


def imagenet_classnames() -> list[str]:
    """The 1000 standard ImageNet-1k class names, index ``i`` = the ``i``-th WordNet id in sorted order
    (``0`` = ``tench``, ``999`` = ``toilet paper``): open_clip's ``IMAGENET_CLASSNAMES``, the list OpenAI
    released with CLIP (CLIP_benchmark ships the same)."""
    return list(_imagenet_classnames())


def openai_imagenet_templates() -> list[str]:
    """The 80 CLIP ImageNet prompt templates, each with one ``{}``: open_clip's ``OPENAI_IMAGENET_TEMPLATES``
    (functions there) rendered with ``"{}"``."""
    return list(_openai_templates())


def _scan(root: Path, class_dirs: list[str]) -> tuple[list[ImageRef], list[int]]:
    images, labels = [], []
    for ci, c in enumerate(class_dirs):
        for p in sorted((root / c).iterdir()) if (root / c).is_dir() else []:
            if p.suffix.lower() in IMAGE_SUFFIXES:
                images.append(ImageRef(path=str(p), name=f"{c}/{p.name}"))
                labels.append(ci)
    return images, labels


def _classnames(data: Path, class_dirs: list[str]) -> tuple[list[str], bool]:
    """Class names for ``class_dirs`` and whether they are ImageNet's standard names (module docstring)."""
    names_file = data / "classnames.txt"
    if names_file.exists():
        names = read_list(names_file)
        if len(names) != len(class_dirs):
            raise BenchmarkError(f"{names_file}: {len(names)} names for {len(class_dirs)} class folders")
        return names, False
    wnids = [c for c in class_dirs if WNID.fullmatch(c)]
    if not wnids:
        return [c.replace("_", " ") for c in class_dirs], False
    if len(wnids) == len(class_dirs) == IMAGENET_CLASSES:
        log.warning("%s: 1000 WordNet-id class folders and no classnames.txt: using the standard ImageNet-1k class "
                    "names in sorted-id order (%s = %r ... %s = %r)", data, class_dirs[0],
                    imagenet_classnames()[0], class_dirs[-1], imagenet_classnames()[-1])
        return imagenet_classnames(), True
    raise BenchmarkError(f"{data}: {len(wnids)} of {len(class_dirs)} class folders are WordNet ids (e.g. {wnids[0]}) "
                         f"and there is no classnames.txt; a text encoder cannot read ids: write one readable name "
                         f"per class folder, in sorted folder order, to {names_file}")


def class_folder(data: str | Path, split: str = "test", name: str = "classfolder",
                 linear_probe: bool = False) -> Benchmark:
    """Load a class-folder dataset (module docstring).

    Args:
        data: ``DIR``.
        split: the folder ``DIR/<split>`` to evaluate (``DIR`` itself when it does not exist).
        name: ``imagenet`` or ``classfolder`` (``imagenet`` defaults to the 80 CLIP templates).
        linear_probe: add a linear probe trained on ``DIR/train`` when it exists beside the split.

    Returns:
        a :class:`Benchmark` with a ``zeroshot_classification`` task (``single`` text mode), and
        ``linear_probe`` when asked and possible; counts ``images``, ``classes`` (+ ``train_images``).

    Raises:
        BenchmarkError: no class folders, no image in them, a ``classnames.txt`` of the wrong length, or
            WordNet-id folder names that are not all 1000 ImageNet classes and no ``classnames.txt``.
    """
    data = Path(data)
    root = data / split if (data / split).is_dir() else data
    class_dirs = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "train")
    if not class_dirs:
        raise BenchmarkError(f"{root}: no class folders")
    classnames, is_imagenet = _classnames(data, class_dirs)
    tmpl_file = data / "templates.txt"
    if tmpl_file.exists():
        templates = read_list(tmpl_file)
    elif name == "imagenet" or is_imagenet:
        templates = openai_imagenet_templates()
    else:
        templates = list(DEFAULT_TEMPLATES)
    images, labels = _scan(root, class_dirs)
    if not images:
        raise BenchmarkError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class folders")
    tasks: list = [ClassificationTask("zeroshot_classification", np.arange(len(images)), np.array(labels),
                                      classnames, templates, text_mode=SINGLE)]
    counts = {"images": len(images), "classes": len(class_dirs)}
    if linear_probe and root != data and (data / "train").is_dir():
        train_images, train_labels = _scan(data / "train", class_dirs)
        n = len(images)
        images = images + train_images
        tasks.append(LinearProbeTask("linear_probe", np.arange(n, len(images)), np.array(train_labels),
                                     np.arange(n), np.array(labels), classnames))
        counts["train_images"] = len(train_images)
    return Benchmark(name, split, images, tasks, str(data), counts)


def _load_class_folder(request: BenchmarkRequest) -> Benchmark:
    return class_folder(request.data, request.split, name=request.name, linear_probe=request.linear_probe)


# ImageNet's published size is its validation set.
register_benchmark("imagenet", _load_class_folder, expected={"images": 50000, "classes": IMAGENET_CLASSES},
                   published_split="val")
register_benchmark("classfolder", _load_class_folder)
