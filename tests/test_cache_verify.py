"""Cache integrity (issue 24 item 2): checksums in the finished markers, `flame inspect --verify`, and damaged
index parts, Zarr shard indexes and lookups as one-line errors in readers and inspect, never tracebacks."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from flame_pipeline.cli import main
from pipeline.cache.files import CacheFiles
from pipeline.cache.store import CacheError, CacheIdentity, CacheLayout, CacheMeta, CacheReader, CacheWriter
from pipeline.cache.verify import sha256_file, shard_paths, verify_cache

D, F, N, SHARD = 8, 2, 12, 4


def _cache(path, seed=0):
    """12 rows in 3 shards of 4 (chunks of 2 rows), 2 facets, D = 8; key ``k{row}``; the lookup is built."""
    ident = CacheIdentity(llm="tiny", llm_fingerprint="f", tokenizer="tiny", layer=1, readout="pre_norm", dim=D,
                          prompt_set="flame", prompt_set_hash="h", facets=("a", "b"))
    meta = CacheMeta(ident, CacheLayout(n_rows=N, shard_rows=SHARD, chunk_rows=2, plan_hash="p"),
                     extra={"manifest": "/data/m", "split": "train", "limit": None})
    w = CacheWriter.create(path, meta)
    v = np.random.default_rng(seed).normal(size=(N, F, D)).astype(np.float32)
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    for s in range(N // SHARD):
        r = range(s * SHARD, (s + 1) * SHARD)
        w.write_shard(s, v[r.start : r.stop], np.ones((SHARD, F), bool),
                      pa.table({"key": [f"k{i}" for i in r], "row": pa.array(list(r), pa.int64())}))
    w.build_lookup()
    return path, v.astype(np.float16)


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_markers_record_the_sha256_of_each_shard_file_and_a_fresh_cache_verifies(tmp_path, capsys):
    cache, _ = _cache(tmp_path / "c")
    files = CacheFiles(cache)
    marker = json.loads(files.marker(1).read_text())
    paths = shard_paths(files, 1)
    assert sorted(marker["sha256"]) == ["index/shard-00001.parquet", "store.zarr/mask/c/1/0",
                                        "store.zarr/vectors/c/1/0/0"]
    assert all(marker["sha256"][n] == sha256_file(p) and len(marker["sha256"][n]) == 64 for n, p in paths.items())
    report = verify_cache(cache)
    assert (report.ok, report.shards, report.damaged, report.no_checksums, report.lookup_checked) == (
        True, 3, {}, [], True)
    assert main(["inspect", str(cache), "--verify"]) == 0
    assert "verify     : 3 finished shards checked, 0 damaged" in capsys.readouterr().out


def test_negated_vector_is_found_by_checksums_only(tmp_path, capsys):
    cache, v = _cache(tmp_path / "c")
    import zarr

    arr = zarr.open_group(cache / "store.zarr", mode="r+")["vectors"]
    arr[5, 1] = -v[5, 1]
    assert np.array_equal(CacheReader(cache).get(["k5"])[0][0, 1], -v[5, 1])  # still unit-norm, readable
    assert verify_cache(cache, checksums=False).ok
    report = verify_cache(cache)
    assert report.damaged == {1: ["store.zarr/vectors/c/1/0/0 differs from its checksum"]}
    assert report.redo[1].startswith(f"rm {cache}/done/shard-00001.json && flame embed --manifest /data/m --out ")
    assert "--split train" in report.redo[1] and "--shard-rows 4 --chunk-rows 2" in report.redo[1]
    assert main(["inspect", str(cache), "--verify", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["integrity"]["damaged"] == {"1": ["store.zarr/vectors/c/1/0/0 differs from its checksum"]}
    assert out["bad_rows"] == []


def test_flipped_byte_in_a_zarr_shard_index_is_one_line_in_reader_and_inspect(tmp_path, capsys):
    cache, v = _cache(tmp_path / "c")
    shard_file = cache / "store.zarr/vectors/c/2/0/0"
    _flip(shard_file, shard_file.stat().st_size - 10)  # inside the (offset, nbytes) index, before its CRC
    reader = CacheReader(cache)
    assert np.array_equal(reader.get(["k1"])[0], v[[1]])  # other shards still read
    with pytest.raises(CacheError, match=r"chunk index of cache shard 2 does not match its CRC-32C.*shard-00002"):
        reader.get(["k9"])
    assert main(["inspect", str(cache)]) == 1  # the cheap level finds it too: one problem per file
    out = capsys.readouterr().out
    assert "unreadable : shard 2:" in out and "CRC-32C" in out
    damaged = "  shard 2: store.zarr/vectors/c/2/0/0 has a chunk index that does not match its CRC-32C (a changed byte)"
    assert damaged in out.splitlines()
    assert main(["inspect", str(cache), "--verify"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert damaged in lines and f"    redo   : rm {cache}/done/shard-00002.json && flame embed --manifest /data/m " \
        f"--out {cache} --llm tiny" in "\n".join(lines)
    assert verify_cache(cache).damaged == verify_cache(cache, checksums=False).damaged == {2: [damaged[11:]]}


def test_zarr_fallback_read_of_a_damaged_shard_is_a_cache_error(tmp_path):
    cache, _ = _cache(tmp_path / "c")
    shard_file = cache / "store.zarr/vectors/c/0/0/0"
    _flip(shard_file, shard_file.stat().st_size - 10)
    reader = CacheReader(cache)
    reader._direct = None  # the zarr path (other layouts): zarr's "Stored and computed checksum do not match"
    with pytest.raises(CacheError, match=r"reading rows of shards \[0\] failed \(Stored and computed checksum"):
        reader.read_rows(np.array([0, 1]))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_index_part_is_one_line_and_found_by_inspect(tmp_path, capsys, damage):
    cache, _ = _cache(tmp_path / "c")
    part = cache / "index/shard-00001.parquet"
    if damage == "flip":
        _flip(part, 40)  # inside the first data page
    else:
        part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    reader = CacheReader(cache)  # the lookup is already built: keys still resolve
    assert reader.rows(["k5"]).tolist() == [5]
    with pytest.raises(CacheError, match=r"index/shard-00001.parquet is damaged \(.*\); delete .*shard-00001.json"):
        list(reader.iter_index())
    cheap = verify_cache(cache, checksums=False)
    assert list(cheap.damaged) == ([] if damage == "flip" else [1])
    assert list(verify_cache(cache).damaged) == [1]
    assert main(["inspect", str(cache), "--verify"]) == 1
    assert "shard 1: index/shard-00001.parquet" in capsys.readouterr().out
    if damage == "truncate":
        assert main(["inspect", str(cache)]) == 1  # the cheap check runs on every inspect
        assert "index/shard-00001.parquet is damaged" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_lookup_is_one_line_and_rebuilt_after_deleting_it(tmp_path, capsys, damage):
    cache, v = _cache(tmp_path / "c")
    rows_npy = cache / "lookup/rows.npy"
    if damage == "truncate":
        rows_npy.write_bytes(rows_npy.read_bytes()[:100])
        with pytest.raises(CacheError, match=r"key lookup .*lookup is damaged \(.*\); delete that folder"):
            CacheReader(cache)
    else:
        _flip(rows_npy, rows_npy.stat().st_size - 3)  # a row number changes: only the checksum sees it
    report = verify_cache(cache)
    found = ("is damaged (EOF: reading array header, expected 118 bytes got 90)" if damage == "truncate"
             else "differs from its checksum")  # a cut file is found without its checksum
    assert report.lookup == [f"lookup/rows.npy {found}; delete {cache}/lookup (the next reader "
                             "rebuilds it from the index parts)"]
    assert verify_cache(cache, checksums=False).lookup == (report.lookup if damage == "truncate" else [])
    assert main(["inspect", str(cache), "--verify"]) == 1
    assert f"  lookup : {report.lookup[0]}" in capsys.readouterr().out.splitlines()
    import shutil

    shutil.rmtree(cache / "lookup")
    assert np.array_equal(CacheReader(cache).get(["k11"])[0], v[[11]]) and verify_cache(cache).ok


def test_cache_without_checksums_still_reads_and_verify_says_so(tmp_path, capsys):
    cache, v = _cache(tmp_path / "c")
    for marker in (cache / "done").glob("*.json"):
        doc = json.loads(marker.read_text())
        del doc["sha256"]
        marker.write_text(json.dumps(doc))
    report = verify_cache(cache)
    assert report.ok and report.no_checksums == [0, 1, 2]
    assert np.array_equal(CacheReader(cache).get(["k0"])[0], v[[0]])
    assert main(["inspect", str(cache), "--verify"]) == 0
    assert "3 shards have no checksums recorded" in capsys.readouterr().out
