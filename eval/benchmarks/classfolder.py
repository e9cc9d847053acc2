"""ImageNet-style class folders for zero-shot classification and the linear probe (SPEC §6).

Layout (``DIR`` = ``--data``)::

    DIR/<split>/<class_dir>/*.jpg|png|...   images (``DIR/<class_dir>/`` when there is no split folder)
    DIR/classnames.txt                      optional: one readable name per class, in sorted class_dir order
                                            (default: the folder names with ``_`` as spaces)
    DIR/templates.txt                       optional: one template per line with ``{}`` or ``{c}``
                                            (default: :data:`DEFAULT_TEMPLATES`)

When ``DIR/train/`` exists as well, a linear probe (fit on train, scored on the split) is added.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eval.benchmarks.base import Benchmark, BenchmarkError, ClassificationTask, ImageRef, LinearProbeTask

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
#: A few of the CLIP ImageNet prompts (Radford et al. 2021).
DEFAULT_TEMPLATES = ["a photo of a {}.", "a bad photo of a {}.", "a photo of the large {}.",
                     "a photo of the small {}.", "a rendering of a {}.", "itap of a {}."]


def _scan(root: Path, class_dirs: list[str]) -> tuple[list[ImageRef], list[int]]:
    images, labels = [], []
    for ci, c in enumerate(class_dirs):
        for p in sorted((root / c).iterdir()) if (root / c).is_dir() else []:
            if p.suffix.lower() in IMAGE_SUFFIXES:
                images.append(ImageRef(path=str(p), name=f"{c}/{p.name}"))
                labels.append(ci)
    return images, labels


def class_folder(data: str | Path, split: str = "test", name: str = "classfolder") -> Benchmark:
    """Load a class-folder dataset; raises :class:`BenchmarkError` when there are no class folders."""
    data = Path(data)
    root = data / split if (data / split).is_dir() else data
    class_dirs = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "train")
    if not class_dirs:
        raise BenchmarkError(f"{root}: no class folders")
    names_file, tmpl_file = data / "classnames.txt", data / "templates.txt"
    classnames = ([line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
                  if names_file.exists() else [c.replace("_", " ") for c in class_dirs])
    if len(classnames) != len(class_dirs):
        raise BenchmarkError(f"{names_file}: {len(classnames)} names for {len(class_dirs)} class folders")
    templates = ([line.strip() for line in tmpl_file.read_text(encoding="utf-8").splitlines() if line.strip()]
                 if tmpl_file.exists() else DEFAULT_TEMPLATES)
    images, labels = _scan(root, class_dirs)
    tasks: list = [ClassificationTask("zeroshot_classification", np.arange(len(images)), np.array(labels),
                                      classnames, templates, text_mode="single")]
    counts = {"images": len(images), "classes": len(class_dirs)}
    if root != data and (data / "train").is_dir():
        train_images, train_labels = _scan(data / "train", class_dirs)
        n = len(images)
        images = images + train_images
        tasks.append(LinearProbeTask("linear_probe", np.arange(n, len(images)), np.array(train_labels),
                                     np.arange(n), np.array(labels), classnames))
        counts["train_images"] = len(train_images)
    return Benchmark(name, split, images, tasks, str(data), counts)
