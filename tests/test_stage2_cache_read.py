"""The memory-mapped read path of ``CacheReader.read_rows`` returns exactly what Zarr returns."""

from __future__ import annotations

import numpy as np

from pipeline.cache.store import CacheReader
from tests.helpers.stage2_data import F, make_cache


def test_direct_reads_equal_zarr_reads_across_shards_repeats_and_empty_chunks(tmp_path):
    # 37 rows: shards of 16 (the last one partial), chunks of 4; rows 0-3 have no facet at all, so their chunk
    # is all zeros and Zarr does not store it
    keys = [f"k{i}" for i in range(37)]
    vec, mask = make_cache(tmp_path, keys, absent={r: list(range(F)) for r in range(4)} | {9: [0, 5]})
    reader = CacheReader(tmp_path)
    assert reader._direct is not None
    rows = np.array([36, 0, 17, 5, 17, 2, 33, 9, 15, 16, 31, 3, 36])
    got_v, got_m = reader.read_rows(rows)
    ref_v = reader.vectors.get_orthogonal_selection((np.unique(rows), slice(None), slice(None)))
    ref_v = ref_v[np.searchsorted(np.unique(rows), rows)]
    assert got_v.dtype == np.float16 and got_v.shape == (13, F, 16)
    assert np.array_equal(got_v, ref_v) and np.array_equal(got_v.astype(np.float32), vec[rows])
    assert np.array_equal(got_m, mask[rows])
    assert not got_v[[1, 5, 11]].any() and not got_m[[1, 5, 11]].any()
    got_v[0] = 0  # a copy, not a view of the memory map
    assert reader.read_rows(np.array([36]))[0].any()


def test_reader_falls_back_to_zarr_when_the_layout_is_not_plain(tmp_path):
    keys = [f"k{i}" for i in range(10)]
    vec, _ = make_cache(tmp_path, keys)
    reader = CacheReader(tmp_path)
    reader._direct = None
    assert np.array_equal(reader.get(["k9", "k1", "k9"])[0].astype(np.float32), vec[[9, 1, 9]])


def test_mapped_pages_are_released_after_the_read_budget_and_reads_stay_equal(tmp_path):
    keys = [f"k{i}" for i in range(37)]
    vec, _ = make_cache(tmp_path, keys)
    reader = CacheReader(tmp_path)
    direct = reader._direct
    direct.RELEASE_BYTES = 3 * (direct.row_elems * 2 + direct.FAULT_AROUND)  # release once more than 3 rows were read
    released = []
    real = direct.release
    direct.release = lambda: (released.append(direct._read_since_release), real())
    for rows in ([1, 2], [3], [30, 31], [36]):
        got, _ = reader.read_rows(np.array(rows))
        assert np.array_equal(got.astype(np.float32), vec[rows])
    row = direct.row_elems * 2 + direct.FAULT_AROUND
    assert released == [5 * row] and direct._read_since_release == 1 * row  # at the 3rd read (5 rows)
