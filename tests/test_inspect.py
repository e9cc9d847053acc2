"""`flame inspect`: hand-built caches with known statistics."""

import json

import numpy as np
import pyarrow as pa
import zarr

from flame_pipeline.cli import main
from flame_pipeline.inspect import inspect_cache, nearest_neighbours
from pipeline.cache.store import CacheIdentity, CacheLayout, CacheMeta, CacheReader, CacheWriter

E = np.eye(4)


def _cache(path):
    """4 rows, 2 facets, D=4. Row r: facet a = e_r; facet b = e_r (rows 0, 1), e_(r+1 mod 4) (row 2), absent (row 3)."""
    ident = CacheIdentity(llm="tiny", llm_fingerprint="f", tokenizer="tiny", layer=1, readout="pre_norm", dim=4,
                          prompt_set="flame", prompt_set_hash="h", facets=("a", "b"))
    meta = CacheMeta(ident, CacheLayout(n_rows=4, shard_rows=2, chunk_rows=1, plan_hash="p"))
    w = CacheWriter.create(path, meta)
    vec = np.stack([np.stack([E[r], E[r] if r < 2 else E[(r + 1) % 4]]) for r in range(4)])
    mask = np.array([[1, 1], [1, 1], [1, 1], [1, 0]], bool)
    vec[3, 1] = 0
    keys = [["k0", "k0b"], ["k1"], ["k2"], ["k3"]]
    for s in range(2):
        rows = range(2 * s, 2 * s + 2)
        ks = [(k, r) for r in rows for k in keys[r]]
        w.write_shard(s, vec[rows.start:rows.stop], mask[rows.start:rows.stop],
                      pa.table({"key": [k for k, _ in ks], "row": pa.array([r for _, r in ks], pa.int64())}))
    return path


def test_statistics_match_hand_computation(tmp_path):
    report = inspect_cache(CacheReader(_cache(tmp_path)), manifest_keys=["k0", "k1", "zz"], pairs=200)
    assert (report.n_rows, report.n_keys, report.shards_done, report.n_shards) == (4, 5, 2, 2)
    assert report.bad_rows == []
    assert report.facet_presence == {"a": 4, "b": 3}
    # a.a = 1 for every row; a.b = 1 for rows 0, 1 and 0 for row 2 (row 3 has no b) -> 2/3.
    assert report.facet_cosine == [[1.0, round(2 / 3, 4)], [round(2 / 3, 4), 1.0]]
    # distinct rows of facet a are orthogonal basis vectors
    assert report.anisotropy["a"] == 0.0
    assert report.coverage == {"manifest_keys": 3, "in_cache": 2, "missing_from_cache": 1, "not_in_manifest": 3}


def test_corrupted_row_is_reported(tmp_path):
    _cache(tmp_path)
    arr = zarr.open_group(tmp_path / "store.zarr", mode="r+")["vectors"]
    arr[2, 0] = np.array([2, 0, 0, 0], np.float16)
    arr[1, 1] = np.array([np.nan, 0, 0, 0], np.float16)
    report = inspect_cache(CacheReader(tmp_path))
    assert report.bad_rows == [(1, 1), (2, 0)]


def test_neighbours_list_all_keys_of_a_row(tmp_path):
    reader = CacheReader(_cache(tmp_path))
    hits = nearest_neighbours(reader, E[0].astype(np.float32), facet="a", k=2)
    assert hits[0] == (["k0", "k0b"], 1.0)
    assert hits[1][1] == 0.0


def test_cli_json_and_plot(tmp_path, capsys):
    _cache(tmp_path / "c")
    code = main(["inspect", str(tmp_path / "c"), "--json", "--key", "k2", "--facet", "b", "-k", "1",
                 "--plot", str(tmp_path / "plots")])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["neighbours"] == [{"keys": ["k2"], "cosine": 1.0}]
    assert (tmp_path / "plots" / "facet_cosine.png").stat().st_size > 5000


def test_cli_fails_on_unfinished_cache(tmp_path, capsys):
    _cache(tmp_path)
    (tmp_path / "done" / "shard-00001.json").unlink()
    assert main(["inspect", str(tmp_path)]) == 1
    assert "1/2 finished" in capsys.readouterr().out
