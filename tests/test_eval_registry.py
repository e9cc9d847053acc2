"""The benchmark registry, the one owner of the text modes and a light `flame eval` registration (issue 15)."""

import argparse
import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from eval.benchmarks import (
    BENCHMARKS,
    Benchmark,
    BenchmarkError,
    BenchmarkRequest,
    benchmark_names,
    get_benchmark,
    load_benchmark,
    register_benchmark,
    registry,
)
from eval.benchmarks.base import ImageRef, RetrievalTask
from eval.cli import add_parser
from stage1_embed_text.config import TEXT_MODES, check_text_mode

BUILT_IN = ("emoji", "coco", "flickr30k", "wds", "urban1k", "sharegpt4v-1k", "dci", "docci", "xm3600",
            "imagenet", "classfolder", "winoground", "sugarcrepe")


@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry as it is, restored after the test (registrations made in the test are dropped)."""
    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))


def test_builtin_benchmarks_keep_their_names_and_order():
    assert BENCHMARKS == BUILT_IN and benchmark_names() == BUILT_IN
    assert (get_benchmark("imagenet").published_split, get_benchmark("dci").published_split) == ("val", "all")
    assert get_benchmark("sugarcrepe").present_only and dict(get_benchmark("coco").expected) == {
        "images": 5000, "texts": 25010}
    with pytest.raises(BenchmarkError, match="unknown benchmark 'nope'; known: " + ", ".join(BUILT_IN)):
        get_benchmark("nope")


def test_a_benchmark_registered_in_a_test_is_loadable(tmp_path, scratch_registry, caplog):
    seen = []

    @register_benchmark("toy", expected={"images": 3})
    def load_toy(request: BenchmarkRequest) -> Benchmark:
        seen.append(request)
        task = RetrievalTask("retrieval_en", np.arange(2), ["a", "b"], np.array([[0, 0], [1, 1]]))
        return Benchmark("toy", request.split, [ImageRef(name="0"), ImageRef(name="1")], [task],
                         str(request.data), {"images": 2})

    assert benchmark_names() == (*BUILT_IN, "toy") and get_benchmark("toy").loader is load_toy
    with caplog.at_level(logging.WARNING):
        bench = load_benchmark("toy", tmp_path, languages=["de"], linear_probe=True, image_root="imgs")
    assert bench.name == "toy" and bench.counts == {"images": 2}
    assert seen[0] == BenchmarkRequest("toy", tmp_path, "test", "imgs", ["de"], True)
    assert "toy images: found 2, the published benchmark has 3" in caplog.text
    with pytest.raises(BenchmarkError, match="toy images: found 2, the published benchmark has 3"):
        load_benchmark("toy", tmp_path, strict=True)
    load_benchmark("toy", tmp_path, split="train", strict=True)  # sizes refer to the published split only
    with pytest.raises(ValueError, match="benchmark 'toy' is already registered"):
        register_benchmark("toy", load_toy)
    with pytest.raises(BenchmarkError, match="does not exist"):
        load_benchmark("toy", tmp_path / "missing")


def test_registry_is_restored_after_a_test():
    assert benchmark_names() == BUILT_IN


def test_text_modes_have_one_owner():
    import eval.embedding
    import stage1_embed_text.api

    assert TEXT_MODES == ("single", "multi")
    assert not hasattr(stage1_embed_text.api, "MODES") and not hasattr(eval.embedding, "TEXT_MODES")
    assert check_text_mode("multi") == "multi"
    with pytest.raises(ValueError, match=r"unknown text mode 'both' \(single, multi\)"):
        check_text_mode("both")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--model", "m", "--benchmark", "xm3600", "--data", "d", "--out", "o",
                              "--text-mode", "multi"])
    assert args.text_mode == "multi" and args.benchmark == "xm3600"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--model", "m", "--benchmark", "toy", "--data", "d", "--out", "o"])


def test_registering_flame_eval_imports_no_torch():
    code = "import sys, eval.cli; print([m for m in ('torch', 'transformers', 'eval.run') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_results_are_published_atomically(tmp_path):
    from eval.report import build_results, write_results

    doc = build_results("toy", "test", "data", {"images": 2}, None, "model", {}, [])
    js, md = write_results(doc, tmp_path / "a")
    assert json.loads(js.read_text(encoding="utf-8"))["benchmark"] == "toy" and md.read_text().startswith("# toy")
    write_results(dict(doc, benchmark="other"), tmp_path / "a")  # a rerun replaces both files
    assert json.loads(js.read_text(encoding="utf-8"))["benchmark"] == "other" and md.read_text().startswith("# other")
    (tmp_path / "b" / "results.md").mkdir(parents=True)  # publishing results.md fails at the rename
    with pytest.raises(OSError):
        write_results(doc, tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["results.json", "results.md"]  # no temporary file
