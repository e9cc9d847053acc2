"""Benchmark adapters; each registers its benchmarks with :func:`eval.benchmarks.registry.register_benchmark`.

Importing this package imports every adapter module, so every built-in benchmark is registered; the order of
the imports below is the order ``flame eval --benchmark`` lists them. A new benchmark is a new adapter module
that registers itself, plus its import here.
"""

from __future__ import annotations

# isort: off
from eval.benchmarks import emoji  # noqa: F401  (the embedded default)
from eval.benchmarks import retrieval_sets  # noqa: F401  (coco flickr30k wds urban1k sharegpt4v-1k dci docci)
from eval.benchmarks import xm3600  # noqa: F401  (multilingual)
from eval.benchmarks import classfolder  # noqa: F401  (imagenet classfolder)
from eval.benchmarks import compositional  # noqa: F401  (winoground sugarcrepe)

# isort: on
from eval.benchmarks.base import Benchmark, BenchmarkError
from eval.benchmarks.registry import (
    BenchmarkRequest,
    BenchmarkSpec,
    benchmark_names,
    get_benchmark,
    load_benchmark,
    register_benchmark,
    registered_benchmarks,
)

#: The built-in benchmark names, in listing order (``flame eval --benchmark`` choices).
BENCHMARKS = benchmark_names()

#: Published sizes of the built-in benchmarks' evaluation splits, by name (read from the registry).
EXPECTED = {name: dict(spec.expected) for name, spec in registered_benchmarks().items() if spec.expected}

__all__ = [
    "BENCHMARKS", "EXPECTED", "Benchmark", "BenchmarkError", "BenchmarkRequest", "BenchmarkSpec", "benchmark_names",
    "get_benchmark", "load_benchmark", "register_benchmark", "registered_benchmarks",
]
