"""bench/scale.py (issue 10): its synthetic data, its stand-in encoder, and one whole run at 3,000 samples."""

import importlib.util
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.store import CacheReader

ROOT = Path(__file__).resolve().parents[1]
N = 3_000
# At 3,000 samples (30 blocks of 100): 60 repeat a caption set, 150 a raw caption, 90 have no long caption.
KEYS, ROWS, UNIQUE_TEXTS = 3_000, 2_940, 2_790 + 2_940 + 2_850  # unique raw + short + long texts


@pytest.fixture(scope="module")
def scale():
    """bench/scale.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_synthetic_captions_have_flame_lengths_and_the_stated_duplicates(scale):
    table = scale.synthetic_captions(0, N)
    assert table.column_names == ["key", "raw_caption", "short_caption", "long_caption"]
    keys = table["key"].to_pylist()
    assert keys[:2] == ["000000000", "000000001"] and len(set(keys)) == N
    assert scale.key_of(12_345) == "000012345"
    lengths = {c: np.mean([len(t) for t in table[c].drop_null().to_pylist()]) for c in table.column_names[1:]}
    assert 50 < lengths["raw_caption"] < 70 and 130 < lengths["short_caption"] < 170
    assert 700 < lengths["long_caption"] < 900
    assert table["long_caption"].null_count == 90
    sets = list(zip(*(table[c].to_pylist() for c in table.column_names[1:])))
    assert len(set(sets)) == ROWS
    assert sum(len({s[g] for s in sets if s[g] is not None}) for g in range(3)) == UNIQUE_TEXTS
    assert scale.expected_counts(N) == {"keys": KEYS, "rows": ROWS, "unique_texts": UNIQUE_TEXTS,
                                        "set_duplicate": 60, "raw_duplicate": 150, "no_long": 90}
    assert scale.synthetic_captions(2_000, 2_010) == table.slice(2_000, 10)  # any chunk, the same samples


def test_webdataset_shards_and_recaption_files(scale, tmp_path):
    scale.write_webdataset(tmp_path, 10_005)
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    assert [s.name for s in shards] == ["00000.tar", "00001.tar"]
    with tarfile.open(shards[1]) as tar:
        names = tar.getnames()
        assert names[:2] == ["000010000.png", "000010000.txt"] and len(names) == 10
        raw = tar.extractfile("000010000.txt").read().decode()
    assert raw == scale.synthetic_captions(10_000, 10_001)["raw_caption"][0].as_py()
    long = json.loads((tmp_path / "recap_long.json").read_text())
    short = json.loads((tmp_path / "recap_short.json").read_text())
    assert len(short) == 10_005 and len(long) == 10_005 - int(scale.expected_counts(10_005)["no_long"])
    assert set(short[0]) == {"__key__", "minicpm"}


def test_digest_stand_in_encoder(scale):
    encoder = scale.DigestStandInEncoder(dim=8)
    samples = [{"raw": "a cat.", "short": "A cat on a mat.", "long": None}, {"raw": "a cat.", "short": " "}]
    out = encoder.encode(samples)
    assert out.vectors.shape == (2, 11, 8) and out.vectors.dtype == np.float32
    assert out.mask.tolist() == [[True] * 4 + [False] * 7, [True] + [False] * 10]
    np.testing.assert_allclose(np.linalg.norm(out.vectors[out.mask], axis=-1), 1.0, rtol=1e-6)
    assert not out.vectors[~out.mask].any()
    np.testing.assert_array_equal(out.vectors[0, 0], out.vectors[1, 0])  # same text, same vector
    assert not np.allclose(out.vectors[0, 1], out.vectors[0, 2])  # facets of one text differ
    assert out.tokens.tolist() == [[len("a cat.") // 4 + 20, len("A cat on a mat.") // 4 + 20, 0],
                                   [len("a cat.") // 4 + 20, 0, 0]]
    assert not out.truncated.any() and out.tokens.dtype == np.int32
    np.testing.assert_array_equal(encoder.encode(samples).vectors, out.vectors)
    assert encoder.identity().llm == "digest-stand-in" and encoder.identity().dim == 8


def test_scale_bench_runs_every_cache_stage_and_builds_the_expected_cache(tmp_path):
    out = tmp_path / "scale.json"
    stages = ["plan", "embed", "cache_open", "first_batch", "lookup"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scale.py"), "--samples", str(N), "--json", str(out),
         "--stages", ",".join(stages), "--workdir", str(tmp_path / "work"), "--reads", "5"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert set(report) == {"samples", "cpu", "stages"} and report["samples"] == N and report["cpu"]
    assert list(report["stages"]) == stages
    for name, stage in report["stages"].items():
        assert stage["peak_rss_mib"] > 0 and stage["seconds"] >= 0, (name, stage)
    assert report["stages"]["embed"]["keys"] == KEYS and report["stages"]["embed"]["rows"] == ROWS
    assert report["stages"]["embed"]["unique_texts"] == UNIQUE_TEXTS
    assert report["stages"]["first_batch"]["images"] == [256, 3, 32, 32]
    assert report["stages"]["lookup"]["keys_per_read"] == N
    reader = CacheReader(tmp_path / "work" / "ours" / "cache")
    assert len(reader) == KEYS and reader.meta.layout.n_rows == ROWS
    assert "| first_batch |" in proc.stdout
