"""`flame import cache` (issue 13): the official one-``.pth``-per-sample tree -> our cache, exactly.

Fake trees are written the way FLAME's embedding script lays them out: ``<root>/<key[:5]>/<key>.pth`` (CC3M) and
``<root>/<key.split('_')[0]>/<key>.pth`` (YFCC15M), one ``torch.save``'d ``float16 [F, D]`` tensor of unit rows.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flame_pipeline.cli import main as flame_main
from flame_pipeline.imports.cache import import_cache, official_identity, pth_path
from manifests.schema import ManifestWriter
from pipeline.cache.files import index_schema
from pipeline.cache.store import CacheIdentity, CacheIdentityError, CacheMeta, CacheReader
from stage1_embed_text.encode.prompts import FLAME, GROUPS

CC3M = [f"{i:09d}" for i in range(100012, 100019)]  # prefix5 -> "00100/000100012.pth"
YFCC = [f"u{i}_{i * 7}" for i in range(5)]  # underscore -> "u0/u0_0.pth"
F, D = 11, 16


def small_identity() -> CacheIdentity:
    return CacheIdentity.from_dict(official_identity().to_dict() | {"dim": D})


def unit(rng: np.random.Generator, dim: int = D) -> np.ndarray:
    v = rng.normal(size=(F, dim)).astype(np.float32)
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float16)


def write_tree(root, keys_layouts, dim=D, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for k, layout in keys_layouts:
        p = pth_path(root, k, layout)
        p.parent.mkdir(parents=True, exist_ok=True)
        out[k] = unit(rng, dim)
        torch.save(torch.from_numpy(out[k]), p)
    return out


def write_manifest(path, keys, splits=None):
    w = ManifestWriter(path, {"name": "import-test", "args": {}}, rows_per_part=4)
    for k in keys:
        w.add({"key": k, "raw_caption": "x", "split": (splits or {}).get(k, "train")})
    w.close()
    return path


@pytest.fixture()
def tree(tmp_path):
    """Both layouts in one tree (7 + 5 good files), 3 keys without a file, 4 bad files: 19 manifest keys."""
    vectors = write_tree(tmp_path / "pth", [(k, "prefix5") for k in CC3M] + [(k, "underscore") for k in YFCC])
    bad = {"bad_norm": 2 * unit(np.random.default_rng(1)), "bad_nan": unit(np.random.default_rng(2)),
           "bad_shape": unit(np.random.default_rng(3))[:5]}
    bad["bad_nan"][3, 2] = np.nan
    for k, v in bad.items():
        p = pth_path(tmp_path / "pth", k, "underscore")
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.from_numpy(v), p)
    garbage = pth_path(tmp_path / "pth", "bad_garbage", "underscore")
    garbage.parent.mkdir(parents=True, exist_ok=True)
    garbage.write_bytes(b"not a torch file")
    missing = ["000200000", "nofile_1", "zz"]
    keys = CC3M[:3] + missing[:1] + YFCC + ["bad_norm", "bad_nan", "bad_shape", "bad_garbage"] + CC3M[3:] + missing[1:]
    write_manifest(tmp_path / "man", keys)
    return tmp_path, vectors


def test_round_trip_both_layouts_exactly(tree):
    root, vectors = tree
    summary = import_cache(root / "pth", root / "man", root / "cache", small_identity(), shard_rows=4, chunk_rows=2)
    assert (summary.keys, summary.found, summary.missing, summary.imported) == (19, 16, 3, 12)
    assert summary.bad == {"non_finite": 1, "not_unit_norm": 1, "shape": 1, "unreadable": 1}
    assert summary.layouts == {"prefix5": 7, "underscore": 9}
    reader = CacheReader(root / "cache")
    keys = list(vectors)
    got, mask = reader.get(keys)
    assert got.dtype == np.float16 and np.array_equal(got, np.stack([vectors[k] for k in keys]))
    assert mask.all() and len(reader) == 12
    for k in ("000200000", "nofile_1", "zz", "bad_norm", "bad_nan", "bad_shape", "bad_garbage"):
        assert k not in reader  # missing and bad keys are counted, never invented
    assert reader.facets == FLAME.facets and reader.identity == small_identity()
    index = reader.index
    assert index.schema == index_schema(GROUPS) and index.column("raw_sha1").null_count == 12
    assert sum(index.column("long_tokens").to_pylist()) == 0 and not any(index.column("short_truncated").to_pylist())
    extra = CacheMeta.read(root / "cache").extra["import"]
    assert (extra["source"], extra["missing"], extra["bad_total"]) == (str((root / "pth").resolve()), 3, 4)


def test_explicit_layout_and_split(tree, tmp_path):
    root, vectors = tree
    s = import_cache(root / "pth", root / "man", tmp_path / "c1", small_identity(), layout="prefix5")
    assert (s.found, s.imported) == (7, 7)
    assert sorted(CacheReader(tmp_path / "c1").index.column("key").to_pylist()) == sorted(CC3M)
    splits = {k: "val" for k in YFCC[:2]}
    write_manifest(tmp_path / "m2", CC3M[:2] + YFCC, splits)
    s = import_cache(root / "pth", tmp_path / "m2", tmp_path / "c2", small_identity(), layout="underscore", split="val")
    assert (s.keys, s.found, s.imported) == (2, 2, 2)
    got, _ = CacheReader(tmp_path / "c2").get(YFCC[:2])
    assert np.array_equal(got, np.stack([vectors[k] for k in YFCC[:2]]))


def test_rerun_finishes_and_refuses_another_identity(tree):
    root, _ = tree
    import_cache(root / "pth", root / "man", root / "cache", small_identity(), shard_rows=4, chunk_rows=2)
    again = import_cache(root / "pth", root / "man", root / "cache", small_identity(), shard_rows=4, chunk_rows=2)
    assert (again.shards, again.shards_skipped, again.imported) == (4, 4, 12)
    other = CacheIdentity.from_dict(small_identity().to_dict() | {"layer": 12})
    with pytest.raises(CacheIdentityError, match="layer"):
        import_cache(root / "pth", root / "man", root / "cache", other, shard_rows=4, chunk_rows=2)


def test_official_shape_through_the_cli(tmp_path, capsys):
    """The official ``[11, 5120]`` float16 files, default identity, through ``flame import cache``."""
    vectors = write_tree(tmp_path / "pth", [(k, "prefix5") for k in CC3M[:3]], dim=5120)
    write_manifest(tmp_path / "man", CC3M[:4])
    rc = flame_main(["import", "cache", str(tmp_path / "pth"), "--manifest", str(tmp_path / "man"),
                     "--out", str(tmp_path / "cache")])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["found"], printed["missing"], printed["imported"]) == (3, 1, 3)
    reader = CacheReader(tmp_path / "cache", expect={"dim": 5120, "layer": 39, "position_mode": "continuous"})
    got, _ = reader.get(CC3M[:3])
    assert np.array_equal(got, np.stack([vectors[k] for k in CC3M[:3]]))
    assert reader.identity == official_identity()


class Payload:
    """An arbitrary object: weights_only loading must refuse it."""


def test_refused_pickle_and_empty_tree_are_one_line_exit_2(tmp_path, capsys):
    write_tree(tmp_path / "pth", [(k, "prefix5") for k in CC3M[:2]])
    torch.save({"vec": Payload()}, pth_path(tmp_path / "pth", CC3M[1], "prefix5"))
    write_manifest(tmp_path / "man", CC3M[:2])
    (tmp_path / "ident.json").write_text(json.dumps(small_identity().to_dict()))
    base = ["import", "cache", "--manifest", str(tmp_path / "man"), "--identity", str(tmp_path / "ident.json")]
    for src, words in ((tmp_path / "pth", "refused"), (tmp_path / "empty", "is not a directory")):
        assert flame_main([*base[:2], str(src), *base[2:], "--out", str(tmp_path / f"c-{src.name}")]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after progress bars
        assert err.startswith("flame import:") and words in err and "\n" not in err


def test_keys_that_name_files_outside_the_root_are_refused_and_counted(tmp_path):
    """Issue 24 item 5: an absolute key or one with ``..`` never reads a file outside the root, even if that file
    exists and is a valid vector file; such keys are counted as ``outside_root`` and get no row."""
    root = tmp_path / "pth"
    good = write_tree(root, [(k, "prefix5") for k in CC3M[:3]])
    # valid files outside the root, where the hostile keys point
    elsewhere = tmp_path / "elsewhere"
    evil = unit(np.random.default_rng(9))
    for p in (elsewhere / "x.pth", tmp_path / "up" / "up_1.pth", tmp_path / "00000.pth"):
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.from_numpy(evil), p)
    hostile = [str(elsewhere / "x"), "../up_1", "../../00000", "..", "\0x"]
    assert all(pth_path(root, k, lay) is None for k in hostile[:4] for lay in ("prefix5", "underscore"))
    assert pth_path(root, CC3M[0], "prefix5") == root / CC3M[0][:5] / f"{CC3M[0]}.pth"
    write_manifest(tmp_path / "man", CC3M[:3] + hostile)
    s = import_cache(root, tmp_path / "man", tmp_path / "cache", small_identity(), shard_rows=4, chunk_rows=2)
    assert (s.keys, s.found, s.outside_root, s.missing, s.imported) == (8, 3, 5, 5, 3)
    reader = CacheReader(tmp_path / "cache")
    assert sorted(reader.index.column("key").to_pylist()) == sorted(CC3M[:3])
    assert np.array_equal(reader.get(CC3M[:3])[0], np.stack([good[k] for k in CC3M[:3]]))
    assert CacheMeta.read(tmp_path / "cache").extra["import"]["outside_root"] == 5
