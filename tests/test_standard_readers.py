"""Issue 21 item 3: the one-liners of README "Reading the files without this package" run against a real small
manifest and cache, with pyarrow, DuckDB, polars, Hugging Face datasets and zarr (>= 3)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from manifests.schema import SCHEMA, ManifestWriter, iter_rows, read_manifest
from pipeline.cache.store import CacheIdentity, CacheLayout, CacheMeta, CacheReader, CacheWriter
from tests.helpers.images import png


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("readers")
    (root / "m").mkdir()
    Image.new("RGB", (4, 4), (0, 0, 255)).save(root / "m" / "blue.png")
    w = ManifestWriter(root / "m", {"name": "test", "args": {}})
    w.add({"key": "red", "image_bytes": png((255, 0, 0)), "raw_caption": "a red square", "split": "train",
           "labels": {"colour": "red", "shape": "square"}, "names": {"de": "rot"}})
    w.add({"key": "blue", "image_path": str(root / "m" / "blue.png"), "raw_caption": "a blue square",
           "split": "train", "labels": {"colour": "blue"}})
    w.close()
    ident = CacheIdentity(llm="tiny", llm_fingerprint="f", tokenizer="tiny", layer=3, readout="pre_norm", dim=4,
                          prompt_set="flame", prompt_set_hash="h", facets=("raw", "short"))
    cw = CacheWriter.create(root / "c", CacheMeta(ident, CacheLayout(n_rows=2, shard_rows=2, chunk_rows=1,
                                                                      plan_hash="p")))
    vec = np.zeros((2, 2, 4), np.float32)
    vec[0, 0, 0] = vec[0, 1, 1] = vec[1, 0, 2] = 1
    cw.write_shard(0, vec, np.array([[1, 1], [1, 0]], bool),
                   pa.table({"key": ["red", "blue"], "row": pa.array([0, 1], pa.int64())}))
    cw.build_lookup()
    return root


def test_pyarrow_duckdb_polars_read_manifest_and_cache_index(files):
    duckdb = pytest.importorskip("duckdb")
    pl = pytest.importorskip("polars")
    m, c = files / "m", files / "c"
    t = pq.read_table(m / "data")
    assert t.column("key").to_pylist() == ["red", "blue"]
    assert t.column("labels").to_pylist()[0] == [{"key": "colour", "value": "red"}, {"key": "shape", "value": "square"}]
    assert duckdb.sql(f"SELECT key, image.path AS path FROM '{m}/data/*.parquet' ORDER BY key").fetchall() == [
        ("blue", str(m / "blue.png")), ("red", None)]
    assert duckdb.sql(f"SELECT count(*) FROM '{m}/data/*.parquet', unnest(labels) AS l(kv) "
                      "WHERE kv.key = 'colour'").fetchall() == [(2,)]
    assert duckdb.sql(f"SELECT key, row FROM '{c}/index/*.parquet' ORDER BY row").fetchall() == [("red", 0), ("blue", 1)]
    assert pl.read_parquet(f"{m}/data/*.parquet")["raw_caption"].to_list() == ["a red square", "a blue square"]
    assert pl.read_parquet(f"{c}/index/*.parquet").sort("row")["key"].to_list() == ["red", "blue"]


def test_datasets_loads_the_manifest_and_decodes_its_images(files):
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("parquet", data_files=str(files / "m" / "data" / "*.parquet"), split="train",
                               cache_dir=str(files / "hf-cache"))
    assert isinstance(ds.features["image"], datasets.Image)
    red, blue = ds[0], ds[1]
    assert red["key"] == "red" and red["image"].getpixel((0, 0)) == (255, 0, 0)
    assert blue["image"].convert("RGB").getpixel((0, 0)) == (0, 0, 255)
    assert red["labels"] == [{"key": "colour", "value": "red"}, {"key": "shape", "value": "square"}]
    assert red["names"] == [{"key": "de", "value": "rot"}] and blue["names"] is None


def test_zarr_arrays_carry_facets_meaning_and_identity_hash(files):
    import zarr

    assert int(zarr.__version__.split(".")[0]) >= 3
    g = zarr.open_group(files / "c" / "store.zarr", mode="r")
    reader = CacheReader(files / "c")
    v = g["vectors"]
    assert v.attrs["facets"] == ["raw", "short"] and v.attrs["axes"] == ["row", "facet", "dim"]
    assert v.attrs["identity_hash"] == reader.identity.digest() == g.attrs["identity_hash"]
    assert "L2-normalized hidden state of tiny (layer 3, pre_norm)" in v.attrs["meaning"]
    assert g["mask"].attrs["facets"] == ["raw", "short"] and g.attrs["identity"]["layer"] == 3
    assert np.array_equal(v[:], reader.load_all()[0]) and g["mask"][:].tolist() == [[True, True], [True, False]]


def test_schema_1_manifest_still_reads_the_same(files, tmp_path):
    """A manifest written before schema 2 (``image_path``/``image_bytes`` columns, ``map`` labels)."""
    import json

    old = tmp_path / "old"
    (old / "data").mkdir(parents=True)
    v1 = pa.schema([f if f.name not in ("labels", "names") else pa.field(f.name, pa.map_(pa.string(), pa.string()))
                    for f in SCHEMA])
    rows = {"key": ["red"], "image_path": [None], "image_member": [None], "image_bytes": [png((255, 0, 0))],
            "raw_caption": ["a red square"], "short_caption": [None], "long_caption": [None], "split": ["train"],
            "lang": [None], "labels": [[("colour", "red")]], "names": [None]}
    pq.write_table(pa.table(rows, schema=v1), old / "data" / "part-00000.parquet")
    (old / "manifest.json").write_text(json.dumps({"schema_version": 1, "source": {"name": "old"},
                                                   "counts": {"train": 1, "total": 1}, "parts": ["data/part-00000.parquet"]}))
    columns = ["key", "image_bytes", "labels"]
    got = read_manifest(old, columns=columns)
    assert got.schema == read_manifest(files / "m", columns=columns).schema == SCHEMA.empty_table().select(columns).schema
    assert got.to_pylist() == [{"key": "red", "image_bytes": png((255, 0, 0)),
                                "labels": [{"key": "colour", "value": "red"}]}]
    row = next(iter_rows(old))
    assert row["labels"] == {"colour": "red"} and Image.open(io.BytesIO(row["image_bytes"])).size == (8, 8)
