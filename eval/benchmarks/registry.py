"""Benchmarks by name: each adapter module registers its benchmarks where it defines them (SPEC §6).

A benchmark is a loader (``BenchmarkRequest -> Benchmark``) plus the published sizes its evaluation split is
checked against::

    @register_benchmark("urban1k", expected={"images": 1000, "texts": 1000})
    def _load_urban1k(request: BenchmarkRequest) -> Benchmark:
        return urban1k(request.data, request.split)

:mod:`eval.benchmarks` imports the adapter modules so that they register; the order they register in is the
order ``flame eval --benchmark`` lists them. :func:`load_benchmark` is what callers use. A benchmark
registered anywhere else (a plug-in, a test) is loadable the same way as soon as its module is imported.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from eval.benchmarks.base import Benchmark, BenchmarkError, check_size

log = logging.getLogger("eval.benchmarks")


@dataclass(frozen=True)
class BenchmarkRequest:
    """What a loader is asked for (the arguments of :func:`load_benchmark`).

    Attributes:
        name: the registered name (a loader registered under several names tells them apart by it).
        data: the benchmark's file or folder (exists).
        split: split to evaluate.
        image_root: images folder for the JSON formats (COCO/Flickr30k, ShareGPT4V, SugarCrepe), or None.
        languages: multilingual languages, ``["all"]`` for every language present, or None for the default.
        linear_probe: add a linear probe where the benchmark has a train split.
    """

    name: str
    data: Path
    split: str = "test"
    image_root: str | Path | None = None
    languages: list[str] | None = None
    linear_probe: bool = False


#: A benchmark loader; raises :class:`BenchmarkError` on unreadable data.
Loader = Callable[[BenchmarkRequest], Benchmark]


@dataclass(frozen=True)
class BenchmarkSpec:
    """One registered benchmark.

    Attributes:
        name: what ``flame eval --benchmark`` takes.
        loader: builds the :class:`Benchmark`.
        expected: published sizes, by key of :attr:`Benchmark.counts` (``{}``: nothing to check).
        published_split: the split (as the loader reports it) the published sizes refer to.
        present_only: check only the keys the loaded counts have (SugarCrepe: the subset files present).
    """

    name: str
    loader: Loader
    expected: Mapping[str, int] = field(default_factory=dict)
    published_split: str = "test"
    present_only: bool = False

    def check_sizes(self, bench: Benchmark, strict: bool) -> None:
        """Compare ``bench.counts`` with :attr:`expected` when ``bench`` is the published split.

        A missing count is compared as 0 (unless :attr:`present_only`).

        Raises:
            BenchmarkError: a size differs and ``strict`` (else a warning is logged).
        """
        if bench.split != self.published_split:
            return
        for key, want in self.expected.items():
            if key in bench.counts or not self.present_only:
                check_size(f"{self.name} {key}", bench.counts.get(key, 0), want, strict)


_SPECS: dict[str, BenchmarkSpec] = {}


def register_benchmark(name: str, loader: Loader | None = None, *, expected: Mapping[str, int] | None = None,
                       published_split: str = "test", present_only: bool = False):
    """Register benchmark ``name``: as a decorator of its loader, or called with the loader.

    Args:
        name: the benchmark's name; listed after those registered before it.
        loader: the loader (omit to use this as a decorator).
        expected, published_split, present_only: see :class:`BenchmarkSpec`.

    Returns:
        ``loader`` unchanged (or a decorator returning it).

    Raises:
        ValueError: ``name`` is already registered.
    """
    def add(fn: Loader) -> Loader:
        if name in _SPECS:
            raise ValueError(f"benchmark {name!r} is already registered")
        _SPECS[name] = BenchmarkSpec(name, fn, dict(expected or {}), published_split, present_only)
        return fn

    return add if loader is None else add(loader)


def benchmark_names() -> tuple[str, ...]:
    """Every registered name, in registration order."""
    return tuple(_SPECS)


def registered_benchmarks() -> Mapping[str, BenchmarkSpec]:
    """A read-only view of the registry, name -> :class:`BenchmarkSpec`, in registration order."""
    return MappingProxyType(_SPECS)


def get_benchmark(name: str) -> BenchmarkSpec:
    """The registered benchmark ``name``.

    Raises:
        BenchmarkError: no benchmark of that name (the message lists the known ones).
    """
    try:
        return _SPECS[name]
    except KeyError:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(_SPECS)}") from None


def load_benchmark(name: str, data: str | Path, split: str = "test", strict: bool = False,
                   image_root: str | Path | None = None, languages: list[str] | None = None,
                   linear_probe: bool = False) -> Benchmark:
    """Read benchmark ``name`` from ``data``; check its size against the published one (published split only).

    Args:
        name: a registered name (:func:`benchmark_names`). ``coco``/``flickr30k`` read a Karpathy JSON, or
            CLIP_benchmark's webdataset layout when ``data/<split>/`` holds tar shards.
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
        BenchmarkError: ``data`` does not exist, unknown name, unreadable data, or a size mismatch with
            ``strict``.
    """
    data = Path(data)
    if not data.exists():
        raise BenchmarkError(f"benchmark data {data} does not exist")
    spec = get_benchmark(name)
    try:
        bench = spec.loader(BenchmarkRequest(name, data, split, image_root, languages, linear_probe))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # a truncated or binary annotation file
        raise BenchmarkError(f"{name}: an annotation file under {data} is not readable text/JSON ({e})") from None
    log.info("benchmark %s, split %s, from %s: %s", name, split, data, bench.counts)
    spec.check_sizes(bench, strict)
    return bench
