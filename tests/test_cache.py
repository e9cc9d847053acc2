"""The cache contract (SPEC §3): atomic shards, identity checks, unit-norm enforcement, key lookup."""

import numpy as np
import pyarrow as pa
import pytest

from pipeline.cache.store import (
    CacheError,
    CacheIdentity,
    CacheIdentityError,
    CacheKeyError,
    CacheLayout,
    CacheMeta,
    CacheReader,
    CacheWriter,
)


def _identity(**kw):
    base = dict(llm="tiny", llm_fingerprint="f0", tokenizer="tiny", layer=3, readout="pre_norm", dim=8,
                prompt_set="flame", prompt_set_hash="h0", facets=("raw", "short_1"))
    return CacheIdentity(**(base | kw))


def _unit(rng, shape):
    v = rng.normal(size=shape)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _fill(cache_dir, n=10, shard_rows=4):
    meta = CacheMeta(_identity(), CacheLayout(n_rows=n, shard_rows=shard_rows, chunk_rows=2, plan_hash="p"))
    writer = CacheWriter.create(cache_dir, meta)
    rng = np.random.default_rng(0)
    full = _unit(rng, (n, 2, 8))
    mask = np.ones((n, 2), bool)
    mask[5, 1] = False
    full[5, 1] = 0
    for s in range(meta.layout.n_shards):
        r = meta.layout.shard_range(s)
        index = pa.table({"key": [f"k{i}" for i in r], "row": pa.array(list(r), pa.int64())})
        writer.write_shard(s, full[r.start:r.stop], mask[r.start:r.stop], index)
    return full, mask


def test_roundtrip_by_key_in_request_order(tmp_path):
    full, mask = _fill(tmp_path)
    reader = CacheReader(tmp_path, expect={"dim": 8, "layer": 3})
    vec, msk = reader.get(["k9", "k5", "k0", "k5"])
    assert vec.dtype == np.float16 and vec.shape == (4, 2, 8)
    np.testing.assert_allclose(vec.astype(np.float32), full[[9, 5, 0, 5]], atol=1e-3)
    assert msk.tolist() == [[True, True], [True, False], [True, True], [True, False]]
    assert len(reader) == 10 and reader.rows(["k3", "nope"]).tolist() == [3, -1]
    with pytest.raises(KeyError, match="1 keys not in cache") as err:
        reader.get(["k1", "nope"])
    assert isinstance(err.value, CacheKeyError) and str(err.value) == f"1 keys not in cache {tmp_path}, e.g. ['nope']"


def test_identity_mismatch_names_both_values(tmp_path):
    _fill(tmp_path)
    with pytest.raises(CacheIdentityError, match=r"dim: cache has 8, expected 640.*layer: cache has 3, expected 17"):
        CacheReader(tmp_path, expect={"dim": 640, "layer": 17})
    with pytest.raises(CacheIdentityError, match="prompt_set_hash: cache has 'h0', expected 'h1'"):
        CacheReader(tmp_path, expect={"prompt_set_hash": "h1"})


def test_unfinished_cache_is_refused(tmp_path):
    meta = CacheMeta(_identity(), CacheLayout(n_rows=10, shard_rows=4, chunk_rows=2, plan_hash="p"))
    writer = CacheWriter.create(tmp_path, meta)
    rng = np.random.default_rng(1)
    writer.write_shard(0, _unit(rng, (4, 2, 8)), np.ones((4, 2), bool),
                       pa.table({"key": ["a", "b", "c", "d"], "row": pa.array([0, 1, 2, 3], pa.int64())}))
    with pytest.raises(CacheError, match="2 of 3 shards missing"):
        CacheReader(tmp_path)
    assert len(CacheReader(tmp_path, allow_incomplete=True)) == 4


@pytest.mark.parametrize("bad", ["nan", "norm", "absent_nonzero"])
def test_non_unit_or_non_finite_vectors_fail_loudly(tmp_path, bad):
    meta = CacheMeta(_identity(), CacheLayout(n_rows=2, shard_rows=2, chunk_rows=2, plan_hash="p"))
    writer = CacheWriter.create(tmp_path, meta)
    v = _unit(np.random.default_rng(2), (2, 2, 8))
    mask = np.ones((2, 2), bool)
    if bad == "nan":
        v[1, 0, 3] = np.nan
    elif bad == "norm":
        v[0, 1] *= 1.5
    else:
        mask[0, 0] = False
    with pytest.raises(CacheError):
        writer.write_shard(0, v, mask, pa.table({"key": ["a", "b"], "row": pa.array([0, 1], pa.int64())}))
    assert not writer.is_done(0)


def test_reopen_with_other_identity_or_plan_is_refused(tmp_path):
    _fill(tmp_path)
    other = CacheMeta(_identity(layer=4), CacheLayout(n_rows=10, shard_rows=4, chunk_rows=2, plan_hash="p"))
    with pytest.raises(CacheIdentityError, match="layer: existing cache has 3, expected 4"):
        CacheWriter.create(tmp_path, other)
    replan = CacheMeta(_identity(), CacheLayout(n_rows=11, shard_rows=4, chunk_rows=2, plan_hash="q"))
    with pytest.raises(CacheIdentityError, match="planned differently"):
        CacheWriter.create(tmp_path, replan)


def test_a_stale_key_lookup_is_rebuilt_not_kept(tmp_path):
    """A lookup/ folder that does not open for this cache (other plan, other hash function) is replaced; the
    old code kept any folder with a lookup.json and then failed with 'does not open'."""
    import json

    from pipeline.cache.files import CacheFiles

    _fill(tmp_path)
    files = CacheFiles(tmp_path)
    CacheReader(tmp_path)  # stores lookup/
    info_path = files.lookup_dir / "lookup.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps(info | {"plan_hash": "another plan"}))
    reader = CacheReader(tmp_path)
    assert reader.rows(["k7", "k0"]).tolist() == [7, 0]
    assert json.loads(info_path.read_text())["plan_hash"] == "p"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".lookup")) == []


def test_a_deleted_vector_shard_file_is_an_error_not_zeros(tmp_path):
    """Zarr reads a missing chunk as its fill value: a damaged cache must not train on zero vectors."""
    from pipeline.cache.files import CacheFiles

    full, _ = _fill(tmp_path)
    (CacheFiles(tmp_path).vectors / "c" / "1" / "0" / "0").unlink()  # shard 1 = rows 4..7
    reader = CacheReader(tmp_path)
    vec, _ = reader.get(["k0", "k9"])  # other shards still read
    np.testing.assert_allclose(vec.astype(np.float32), full[[0, 9]], atol=1e-3)
    with pytest.raises(CacheError, match=r"2 rows of cache shard 1 have vectors .* done/shard-00001.json"):
        reader.get(["k5", "k0", "k6"])


def test_a_truncated_index_part_is_a_cache_error(tmp_path):
    from pipeline.cache.files import CacheFiles

    _fill(tmp_path)
    part = CacheFiles(tmp_path).index_part(1)
    part.write_bytes(part.read_bytes()[:20])
    with pytest.raises(CacheError, match=r"shard-00001.parquet is damaged"):
        CacheReader(tmp_path)


def test_a_missing_index_part_of_a_finished_shard_is_a_cache_error(tmp_path):
    """It used to be skipped, so the shard's keys silently vanished from the cache."""
    from pipeline.cache.files import CacheFiles

    _fill(tmp_path)
    CacheFiles(tmp_path).index_part(2).unlink()
    with pytest.raises(CacheError, match=r"shard-00002.parquet is missing although shard 2 is finished; delete "):
        CacheReader(tmp_path)
