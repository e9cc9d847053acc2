"""Stage-2 data: pairing by key, counted skips, determinism, resume positions, refusals (SPEC §5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.cache.store import CacheReader
from stage2_train_vision.config import ConfigError, DataConfig, ImageConfig
from stage2_train_vision.data.pairs import build_training_data
from stage2_train_vision.data.samples import DataError, draw_facets
from stage2_train_vision.data.transforms import train_transform
from tests.helpers.stage2_data import F, key, make_cache, make_manifest

N, N_TEST, BAD, NO_FACET, FEW_FACETS = 24, 4, 3, 5, 6


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    """24 keys (20 train), k003 undecodable, k018/k019 missing from the cache, k005 without any facet,
    k006 with 2 facets; manifest in parts of 5 rows."""
    root = tmp_path_factory.mktemp("s2data")
    make_manifest(root / "m", n=N, n_test=N_TEST, bad=(BAD,), rows_per_part=5)
    keys = [key(i) for i in range(N) if i not in (18, 19)]
    vec, mask = make_cache(root / "c", keys, absent={NO_FACET: list(range(F)), FEW_FACETS: list(range(2, F))})
    return root, {k: (vec[r], mask[r]) for r, k in enumerate(keys)}


def _build(root, mode, batch=2, workers=0, seed=0, rank=0, world=1, **kw):
    cfg = DataConfig(manifest=str(root / "m"), cache=str(root / "c"), positives=3, mode=mode,
                     num_workers=workers, shuffle_buffer=4, **kw)
    reader = CacheReader(cfg.cache)
    return build_training_data(cfg, reader, train_transform(ImageConfig(16)), 16, batch, rank, world, seed)


def _epoch(data, epoch, start=0):
    data.set_epoch(epoch, start)
    return list(data.loader)


def _check_pairing(batches, vectors):
    """Every valid text slot holds one of its own key's present vectors; invalid images hold no texts."""
    for b in batches:
        for key_, texts, valid, image_ok in zip(b["keys"], b["texts"], b["text_valid"], b["image_valid"]):
            vec, mask = vectors[key_]
            if not image_ok:
                assert not valid.any()
                continue
            assert valid.sum().item() == min(3, int(mask.sum()))
            own = torch.from_numpy(vec[mask])
            for t in texts[valid]:
                assert (own == t).all(dim=1).any(), f"{key_} paired with a vector that is not its own"


def test_memory_counts_skips_and_pairs_each_key_with_its_own_vectors(fixture):
    root, vectors = fixture
    data = _build(root, "memory")
    assert data.mode == "memory" and data.n_samples == 16
    assert dict(data.skipped) == {"missing_vector": 2, "no_facet": 1, "bad_image": 1}
    batches = _epoch(data, 0)
    assert len(batches) == data.steps_per_epoch(0) == 8
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(key(i) for i in range(20) if i not in (BAD, NO_FACET, 18, 19))
    assert batches[0]["images"].shape == (2, 3, 16, 16) and batches[0]["texts"].shape == (2, 3, 16)
    _check_pairing(batches, vectors)


def test_stream_drops_keys_up_front_marks_bad_slots_invalid_and_pairs_by_key(fixture):
    """Keys without a cache row or without a present facet leave before the parts are cut into ranges (counted as
    in memory mode); an undecodable image is only found when its batch is built, and marks its slot invalid."""
    root, vectors = fixture
    data = _build(root, "stream", batch=1)
    assert data.mode == "stream" and data.n_samples == 17
    assert dict(data.skipped) == {"missing_vector": 2, "no_facet": 1}
    batches = _epoch(data, 0)
    assert len(batches) == 17
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(key(i) for i in range(18) if i != NO_FACET)
    skipped = {}
    for b in batches:
        for reason, n in b["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert skipped == {"bad_image": 1}
    invalid = {k for b in batches for k, ok in zip(b["keys"], b["image_valid"]) if not ok}
    assert invalid == {key(BAD)}
    _check_pairing(batches, vectors)
    assert _build(root, "stream").steps_per_epoch(0) == 8  # 17 rows, batches of 2


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_same_seed_same_batches_any_workers_and_resume_from_a_position(fixture, mode):
    root, _ = fixture
    full = _epoch(_build(root, mode), 1)
    with_workers = _epoch(_build(root, mode, workers=2), 1)
    tail = _epoch(_build(root, mode), 1, start=3)
    for a, b in zip(full, with_workers, strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"]) and torch.equal(a["texts"], b["texts"])
    for a, b in zip(full[3:], tail, strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"]) and torch.equal(a["texts"], b["texts"])
    other_epoch = _epoch(_build(root, mode), 2)
    assert [k for b in full for k in b["keys"]] != [k for b in other_epoch for k in b["keys"]]


def test_facets_are_redrawn_each_epoch(fixture):
    root, _ = fixture
    data = _build(root, "memory", batch=16)
    (e0,), (e1,) = _epoch(data, 0), _epoch(data, 1)
    by_key0 = dict(zip(e0["keys"], e0["texts"]))
    assert any(not torch.equal(by_key0[k], t) for k, t in zip(e1["keys"], e1["texts"]))


def test_two_processes_take_disjoint_halves_of_each_global_batch(fixture):
    root, _ = fixture
    single = _epoch(_build(root, "memory", batch=4), 0)
    ranks = [_epoch(_build(root, "memory", batch=2, rank=r, world=2), 0) for r in range(2)]
    for g, b0, b1 in zip(single, *ranks, strict=True):
        assert g["keys"] == b0["keys"] + b1["keys"]


def test_draw_facets_takes_distinct_present_facets():
    mask = np.array([True, False, True, True, False])
    idx, valid = draw_facets(mask, 2, np.random.default_rng(0))
    assert valid.tolist() == [True, True] and len(set(idx.tolist())) == 2 and mask[idx].all()
    idx, valid = draw_facets(mask, 4, np.random.default_rng(0))
    assert valid.tolist() == [True, True, True, False] and sorted(idx[:3].tolist()) == [0, 2, 3]


def test_empty_split_is_refused(fixture):
    root, _ = fixture
    with pytest.raises(DataError, match=r"no rows in split 'val' \(rows per split: \{'train': 20, 'test': 4, 'total': 24\}\)"):
        _build(root, "memory", split="val")
    with pytest.raises(DataError, match="no rows in split 'val'"):
        _build(root, "stream", split="val")


def test_manifest_and_cache_without_common_keys_are_refused(tmp_path, fixture):
    root, _ = fixture
    make_cache(tmp_path / "c", ["x1", "x2"])
    (tmp_path / "m").symlink_to(root / "m")
    for mode in ("memory", "stream"):
        with pytest.raises(DataError, match="have no keys in common"):
            _build(tmp_path, mode)


def test_a_split_whose_rows_have_no_present_facet_is_refused_by_name(tmp_path, fixture):
    """Every key has a row but no row a present facet: one DataError naming both counts, in both modes (not the
    later 'fewer than one batch')."""
    root, _ = fixture
    keys = [key(i) for i in range(N)]
    make_cache(tmp_path / "c", keys, absent={r: list(range(F)) for r in range(N)})
    (tmp_path / "m").symlink_to(root / "m")
    for mode in ("memory", "stream"):
        with pytest.raises(DataError, match=r"no key of split 'train' in manifest .* has a present facet in cache "
                                            r".* \(0 without a row, 20 with an all-absent row\)$"):
            _build(tmp_path, mode)


def test_fewer_samples_than_a_batch_is_refused(fixture):
    root, _ = fixture
    with pytest.raises(DataError, match=r"16 usable samples are fewer than one global batch \(32 x 1 accumulation\)"):
        _build(root, "memory", batch=32)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """15 train keys in manifest parts of 7, 7 and 1 rows, all in the cache."""
    root = tmp_path_factory.mktemp("s2uneven")
    make_manifest(root / "m", n=15, n_test=0, rows_per_part=7)
    make_cache(root / "c", [key(i) for i in range(15)])
    return root


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_stream_gives_every_rank_the_same_rows_and_steps_with_uneven_parts(uneven, seed):
    """Each epoch's part order is cut into 2 ranges of 15 // 2 = 7 usable rows (a part may be shared), so both
    ranks run 7 // 2 = 3 batches in every epoch, whatever the permutation (seed 0 once gave a rank 1 row)."""
    ranks = [_build(uneven, "stream", seed=seed, rank=r, world=2) for r in range(2)]
    for epoch in range(6):
        assert [d.steps_per_epoch(epoch) for d in ranks] == [3, 3]
        ranges = [d.loader.dataset.ranges(epoch) for d in ranks]
        assert [sum(stop - first for _, first, stop in r) for r in ranges] == [7, 7]
        covered = [(part.path.name, i) for r in ranges for part, first, stop in r for i in range(first, stop)]
        assert len(covered) == len(set(covered)) == 14  # disjoint ranges; one row sits the epoch out
        keys = [[k for b in _epoch(d, epoch) for k in b["keys"]] for d in ranks]
        assert [len(k) for k in keys] == [6, 6] and not set(keys[0]) & set(keys[1])


def test_stream_with_fewer_rows_than_a_global_batch_names_the_rows_per_process(uneven):
    with pytest.raises(DataError, match=r"^15 usable rows are fewer than one global batch \(16 x 1 accumulation\): "
                                        r"7 rows per process for 2 processes$"):
        _build(uneven, "stream", batch=8, world=2)


def test_unknown_data_mode_is_a_config_error(uneven):
    with pytest.raises(ConfigError, match=r"data.mode must be memory, stream or auto, not 'disk'"):
        _build(uneven, "disk")


def test_training_warns_when_the_manifest_is_not_the_embedded_one(tmp_path, caplog):
    """Pairs are matched by key: captions changed under the same keys would silently train on old vectors."""
    from types import SimpleNamespace

    from stage2_train_vision.data.pairs import warn_if_manifest_changed

    part = tmp_path / "m" / "data" / "part-00000.parquet"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 10)
    st = part.stat()
    recorded = [["data/part-00000.parquet", st.st_size, st.st_mtime_ns, {"train": 1}]]
    reader = SimpleNamespace(dir=tmp_path / "c", meta=SimpleNamespace(
        extra={"manifest": str((tmp_path / "m").resolve()), "manifest_parts": recorded}))
    assert warn_if_manifest_changed(tmp_path / "m", reader) is False
    part.write_bytes(b"y" * 11)  # the part was rewritten (e.g. new captions)
    assert warn_if_manifest_changed(tmp_path / "m", reader) is True
    assert "is not the manifest" in caplog.text and "re-embed if the captions changed" in caplog.text
    assert warn_if_manifest_changed(tmp_path / "m", SimpleNamespace(dir="c", meta=SimpleNamespace(extra={}))) is False
