"""Benchmark adapters by name, and the published sizes they are checked against (SPEC §6)."""

from __future__ import annotations

import logging
from pathlib import Path

from eval.benchmarks.base import Benchmark, BenchmarkError, check_size
from eval.benchmarks.classfolder import class_folder
from eval.benchmarks.compositional import sugarcrepe, winoground
from eval.benchmarks.emoji import emoji
from eval.benchmarks.retrieval_sets import clip_benchmark_wds, dci, docci, karpathy, sharegpt4v, urban1k
from eval.benchmarks.xm3600 import xm3600

log = logging.getLogger(__name__)

#: Published sizes of the evaluation split (counts keys of :attr:`Benchmark.counts`); a mismatch warns, or raises
#: with ``strict``. COCO/Flickr30k: Karpathy test split; DCI: every split together; Crossmodal-3600: one (the
#: first) caption per image and language; SugarCrepe: Hsieh et al. 2023, table 1, except swap_obj, whose
#: released file has 245 since one wrong case was removed upstream.
EXPECTED = {
    "coco": {"images": 5000, "texts": 25010},
    "flickr30k": {"images": 1000, "texts": 5000},
    "urban1k": {"images": 1000, "texts": 1000},
    "sharegpt4v-1k": {"images": 1000, "texts": 1000},
    "docci": {"images": 5000, "texts": 5000},
    "dci": {"images": 7805, "texts": 7805},
    "xm3600": {"images": 3600, "languages": 36, "texts_per_language": 3600},
    "winoground": {"examples": 400, "images": 800},
    "sugarcrepe": {"add_att": 692, "add_obj": 2062, "replace_att": 788, "replace_obj": 1652,
                   "replace_rel": 1406, "swap_att": 666, "swap_obj": 245},
    "imagenet": {"images": 50000, "classes": 1000},
}

#: The split (as the adapter reports it) the published sizes refer to (default ``test``).
PUBLISHED_SPLIT = {"imagenet": "val", "dci": "all"}

BENCHMARKS = ("emoji", "coco", "flickr30k", "wds", "urban1k", "sharegpt4v-1k", "dci", "docci", "xm3600",
              "imagenet", "classfolder", "winoground", "sugarcrepe")


def load_benchmark(name: str, data: str | Path, split: str = "test", strict: bool = False,
                   image_root: str | Path | None = None, languages: list[str] | None = None,
                   linear_probe: bool = False) -> Benchmark:
    """Read benchmark ``name`` from ``data`` and check its size against :data:`EXPECTED` (test split only).

    Args:
        name: one of :data:`BENCHMARKS`. ``coco``/``flickr30k`` read a Karpathy JSON, or CLIP_benchmark's
            webdataset layout when ``data/<split>/`` holds tar shards.
        data: file or folder of the benchmark (see each adapter).
        split: split to evaluate.
        strict: raise instead of warning on a size mismatch.
        image_root: images folder for the JSON formats (COCO/Flickr30k, ShareGPT4V, SugarCrepe).
        languages: multilingual languages (default: all for XM3600, de fr es ja zh ar hi for emoji;
            ``["all"]``: every language present).
        linear_probe: add a linear probe where the benchmark has a train split (emoji, class folders, a
            CLIP_benchmark webdataset classification set with ``train/`` shards).

    Returns:
        the :class:`Benchmark`; its ``split`` is the one evaluated (DCI reports ``all``).

    Raises:
        BenchmarkError: unknown name, unreadable data, or a size mismatch with ``strict``.
    """
    data = Path(data)
    if not data.exists():
        raise BenchmarkError(f"benchmark data {data} does not exist")
    if name == "emoji":
        bench = emoji(data, split, linear_probe=linear_probe, languages=languages)
    elif name in ("coco", "flickr30k"):
        if data.is_dir() and (data / split).is_dir() and any((data / split).glob("*.tar")):
            bench = clip_benchmark_wds(data, split, name=name)
        else:
            bench = karpathy(name, data, split, image_root)
    elif name == "wds":
        bench = clip_benchmark_wds(data, split, linear_probe=linear_probe)
    elif name == "urban1k":
        bench = urban1k(data, split)
    elif name == "sharegpt4v-1k":
        bench = sharegpt4v(data, split, image_root)
    elif name == "dci":
        bench = dci(data, split)
    elif name == "docci":
        bench = docci(data, split)
    elif name == "xm3600":
        bench = xm3600(data, split, languages)
    elif name in ("imagenet", "classfolder"):
        bench = class_folder(data, split, name=name, linear_probe=linear_probe)
    elif name == "winoground":
        bench = winoground(data, split)
    elif name == "sugarcrepe":
        bench = sugarcrepe(data, split, image_root)
    else:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    log.info("benchmark %s, split %s, from %s: %s", name, split, data, bench.counts)
    if bench.split == PUBLISHED_SPLIT.get(name, "test"):
        for key, want in EXPECTED.get(name, {}).items():
            if key in bench.counts or name != "sugarcrepe":  # SugarCrepe: check the subsets present
                check_size(f"{name} {key}", bench.counts.get(key, 0), want, strict)
    return bench


__all__ = ["BENCHMARKS", "EXPECTED", "Benchmark", "BenchmarkError", "load_benchmark"]
