"""The manifest writer (SPEC §4): keys unique across parts, and a full disk is one clear error."""

import errno

import pyarrow.parquet as pq
import pytest

from manifests.schema import ManifestError, ManifestWriter, RowFetcher, iter_batches


def test_key_repeated_across_parts_is_refused_on_close(tmp_path):
    w = ManifestWriter(tmp_path / "m", {"name": "test", "args": {}}, rows_per_part=2)
    for k in ["a", "b", "c", "a"]:
        w.add({"key": k, "raw_caption": "x"})
    with pytest.raises(ManifestError, match="^duplicate key 'a' written to the manifest$"):
        w.close()
    assert not (tmp_path / "m" / "manifest.json").exists()


def test_batches_and_positions_address_the_same_rows(tmp_path):
    w = ManifestWriter(tmp_path / "m", {"name": "test", "args": {}}, rows_per_part=3)
    for i in range(8):
        w.add({"key": f"k{i}", "raw_caption": f"caption {i}"})
    assert w.close().counts == {"train": 8, "total": 8}
    starts = [(start, b.num_rows) for start, b in iter_batches(tmp_path / "m", ["key"], batch_rows=2)]
    assert starts == [(0, 2), (2, 1), (3, 2), (5, 1), (6, 2)]
    rows = RowFetcher(tmp_path / "m", ["key", "raw_caption"]).take([7, 0, 4, 4])
    assert rows.column("key").to_pylist() == ["k7", "k0", "k4", "k4"]
    assert rows.column("raw_caption").to_pylist() == ["caption 7", "caption 0", "caption 4", "caption 4"]
    with pytest.raises(ManifestError, match="outside"):
        RowFetcher(tmp_path / "m", ["key"]).take([8])


def test_disk_full_while_writing_a_manifest_is_one_clear_error(tmp_path, monkeypatch):
    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    w = ManifestWriter(tmp_path / "m", {"name": "test", "args": {}}, rows_per_part=2)
    monkeypatch.setattr(pq, "write_table", full)
    w.add({"key": "a", "raw_caption": "x"})
    with pytest.raises(ManifestError, match=r"^no space left on the device writing .*part-00000.parquet: the "
                       r"manifest is unfinished \(no manifest.json\); free space and run the same command again$"):
        w.add({"key": "b", "raw_caption": "y"})
    assert not (tmp_path / "m" / "manifest.json").exists()
    assert list((tmp_path / "m" / "data").iterdir()) == []


def test_a_decompression_bomb_is_its_own_counted_reason_and_a_warning(caplog):
    import io

    import numpy as np
    from PIL import Image

    from manifests.common import image_problem

    buf = io.BytesIO()
    Image.fromarray(np.zeros((20000, 20000), np.uint8)).save(buf, format="PNG")
    with caplog.at_level("WARNING", logger="manifests.common"):
        assert image_problem(buf.getvalue(), "bomb.png") == "image_too_large"
    assert any("exceeds limit of" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert image_problem(b"<html>not an image</html>", "x.jpg") == "undecodable_image"
    assert image_problem(None, "x.jpg") == "no_image"
