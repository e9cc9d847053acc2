"""Manifest sources (SPEC §4, issue 2 item 6): bad input is counted, never misaligned.

Every fixture is built here: real tar shards, real PNG/JPEG images. Each sample's key is encoded in its
image (a colour per key) and in its caption, so a kept row can be checked against the bytes it references.
"""

import io
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flame_pipeline.cli import main
from manifests.common import DuplicateKeyError
from manifests.csv_source import build_csv_manifest
from manifests.folder_source import build_folder_manifest
from manifests.images import load_image, read_image_bytes
from manifests.parquet_source import build_parquet_manifest
from manifests.schema import ManifestError, iter_rows, read_manifest_info
from manifests.webdataset_source import build_webdataset_manifest
from tests.helpers.shards import write_tar

LONG_TEXT = "word " * 10_000  # 50,000 characters
QUOTE_TEXT = 'He said "hi" and then:" left; a "quoted: "value"'
HTML = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>gone</body></html>"


def colour(i: int) -> tuple[int, int, int]:
    return (37 * i % 256, 255 - 11 * i % 256, 90 + i)


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour(i)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(i: int, size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((size, size), 60).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()




def caption(key: str) -> bytes:
    return f"a picture of {key}".encode()


@pytest.fixture
def shards(tmp_path):
    """Two img2dataset-style shards with every kind of bad input.

    Returns the shard paths and ``{key: (image bytes, raw caption)}`` for every key that may become a row.
    """
    good = {k: png(i) for i, k in enumerate(["a0", "a1", "a2", "empty2", "quote", "long", "nonutf", "a3"])}
    dupin_first, dupin_second, dupx_first, dupx_second = png(50), png(51), png(52), png(53)
    b0 = jpeg(1)
    s0 = [
        ("a0.png", good["a0"]), ("a0.txt", caption("a0")), ("a0.json", b'{"status": "success"}'),
        # non-adjacent: a1's caption comes after a2's image
        ("a1.png", good["a1"]), ("a2.png", good["a2"]), ("a1.txt", caption("a1")), ("a2.txt", caption("a2")),
        ("trunc.jpg", jpeg(2, size=256)[:1500]), ("trunc.txt", caption("trunc")),
        ("html.jpg", HTML), ("html.txt", caption("html")),
        ("noimg.txt", caption("noimg")), ("noimg.json", b"{}"),
        ("empty.png", png(60)), ("empty.txt", b"  \n\t "),
        ("empty2.png", good["empty2"]), ("empty2.txt", b""),
        ("quote.png", good["quote"]), ("quote.txt", QUOTE_TEXT.encode()),
        ("long.png", good["long"]), ("long.txt", LONG_TEXT.encode()),
        ("nonutf.png", good["nonutf"]), ("nonutf.txt", b"caf\xe9 au lait \xff"),
        ("dupin.png", dupin_first), ("dupin.txt", b"dupin first copy"),
        ("dupin.png", dupin_second), ("dupin.txt", b"dupin second copy"),
        ("dupx.png", dupx_first), ("dupx.txt", b"dupx in shard 0"),
        ("a3.png", good["a3"]), ("a3.txt", caption("a3")),
        ("README", b"not a sample"),
    ]
    s1 = [
        ("dupx.png", dupx_second), ("dupx.txt", b"dupx in shard 1"),
        ("b0.jpg", b0), ("b0.txt", caption("b0")),
        ("amb.jpg", jpeg(3)), ("amb.png", png(70)), ("amb.txt", caption("amb")),
    ]
    paths = [write_tar(tmp_path / "shard-00000.tar", s0), write_tar(tmp_path / "shard-00001.tar", s1)]
    expected = {k: (data, caption(k).decode()) for k, data in good.items()}
    expected |= {
        "empty2": (good["empty2"], None),
        "quote": (good["quote"], QUOTE_TEXT),
        "long": (good["long"], LONG_TEXT),
        "nonutf": (good["nonutf"], "caf\ufffd au lait \ufffd"),
        "dupin": (dupin_first, "dupin first copy"),
        "dupx": (dupx_first, "dupx in shard 0"),
        "b0": (b0, caption("b0").decode()),
    }
    return [str(p) for p in paths], expected


@pytest.fixture
def recaptions(tmp_path):
    long = [{"__key__": k, "minicpm": f"long recaption of {k}"} for k in ["a0", "a1", "empty2", "ghost1", "ghost2", "html"]]
    short = [{"__key__": k, "minicpm": f'short "{k}"'} for k in ["a0", "a2", "ghost3"]]
    (tmp_path / "long.json").write_text(json.dumps(long))
    (tmp_path / "short.json").write_text(json.dumps(short))
    return tmp_path / "long.json", tmp_path / "short.json"


def rows_by_key(out):
    return {r["key"]: r for r in iter_rows(out)}


def assert_belongs(rows, out, expected):
    """Every row's referenced image bytes and raw caption are exactly that key's."""
    for key, row in rows.items():
        assert (read_image_bytes(row, out), row["raw_caption"]) == expected[key], key
        assert load_image(row, out).mode == "RGB"


def test_webdataset_first_counts_every_outcome(tmp_path, shards, recaptions):
    paths, expected = shards
    out = tmp_path / "m"
    info = build_webdataset_manifest(paths, out, on_duplicate="first", long_captions=recaptions[0],
                                     short_captions=recaptions[1])
    assert info.counts == {"train": 11, "total": 11}
    assert read_manifest_info(out).coverage == {
        "samples_seen": 18,
        "caption_non_utf8": 1,
        "duplicate_keys": 2,
        "empty_caption_to_null": 1,
        "ignored_tar_members": 1,
        "long_caption_without_sample": 3,
        "sample_without_long_caption": 8,
        "sample_without_short_caption": 9,
        "short_caption_without_sample": 1,
        "skipped_ambiguous_image": 1,
        "skipped_duplicate": 2,
        "skipped_no_caption": 1,
        "skipped_no_image": 1,
        "skipped_undecodable_image": 2,
    }
    rows = rows_by_key(out)
    assert list(rows) == ["a0", "a1", "a2", "empty2", "quote", "long", "nonutf", "dupin", "dupx", "a3", "b0"]
    assert_belongs(rows, out, expected)
    assert len(rows["long"]["raw_caption"]) == 50_000
    plain = pads.dataset(out / "data").to_table(columns=["key", "image_member", "raw_caption"])
    assert plain.to_pylist() == [
        {"key": k, "image_member": rows[k]["image_member"], "raw_caption": rows[k]["raw_caption"]} for k in rows]
    assert rows["dupx"]["image_path"] == str(Path(paths[0]).resolve())
    assert rows["empty2"]["long_caption"] == "long recaption of empty2"
    assert rows["a0"]["long_caption"] == "long recaption of a0"
    assert rows["a0"]["short_caption"] == 'short "a0"'
    assert rows["a1"]["short_caption"] is None
    assert rows["a2"]["short_caption"] == 'short "a2"'
    assert rows["b0"]["image_member"] == "b0.jpg"
    assert load_image(rows["dupin"], out).getpixel((0, 0)) == colour(50)
    assert load_image(rows["a1"], out).getpixel((0, 0)) == colour(1)
    assert not (out / ".staging").exists()


def test_webdataset_skip_drops_every_copy(tmp_path, shards):
    paths, expected = shards
    out = tmp_path / "m"
    info = build_webdataset_manifest(paths, out, on_duplicate="skip")
    assert info.counts == {"train": 8, "total": 8}
    assert info.coverage["skipped_duplicate"] == 4
    assert info.coverage["duplicate_keys"] == 2
    # without recaptions, empty2 has no caption at all
    assert info.coverage["skipped_no_caption"] == 2
    rows = rows_by_key(out)
    assert sorted(rows) == ["a0", "a1", "a2", "a3", "b0", "long", "nonutf", "quote"]
    assert_belongs(rows, out, expected)
    skipped = sum(v for k, v in info.coverage.items() if k.startswith("skipped_"))
    assert skipped + info.counts["total"] == info.coverage["samples_seen"] == 18


def test_webdataset_duplicate_error_names_key_and_both_locations(tmp_path, shards):
    paths, _ = shards
    out = tmp_path / "m"
    with pytest.raises(DuplicateKeyError) as err:
        build_webdataset_manifest(paths, out)
    message = str(err.value)
    assert "'dupin'" in message
    assert "shard-00000.tar member dupin.png (#24)" in message
    assert "shard-00000.tar member dupin.png (#26)" in message
    assert "2 duplicated key(s)" in message
    assert not (out / "manifest.json").exists() and not (out / ".staging").exists()


def test_webdataset_limit_and_recaption_duplicates(tmp_path, shards):
    paths, _ = shards
    dup_json = tmp_path / "dup.json"
    dup_json.write_text(json.dumps([{"__key__": "a0", "minicpm": "one"}, {"__key__": "a0", "minicpm": "two"}]))
    out = tmp_path / "m"
    info = build_webdataset_manifest(paths, out, limit=3, long_captions=dup_json, on_duplicate="first")
    assert info.counts == {"train": 3, "total": 3}
    assert info.coverage["long_caption_duplicate_key"] == 1
    assert rows_by_key(out)["a0"]["long_caption"] == "one"
    with pytest.raises(DuplicateKeyError, match="'a0' is listed more than once"):
        build_webdataset_manifest(paths, out, limit=3, long_captions=dup_json)


def test_webdataset_truncated_tar_counts_read_error(tmp_path):
    members = []
    for i in range(3):
        members += [(f"k{i}.png", png(i)), (f"k{i}.txt", caption(f"k{i}"))]
    whole = write_tar(tmp_path / "whole.tar", members).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: 512 * 7 + 5])  # k0 complete, k1.png complete, k1.txt cut inside its data
    out = tmp_path / "m"
    info = build_webdataset_manifest([str(cut)], out)
    assert info.counts == {"train": 1, "total": 1}
    assert info.coverage == {"samples_seen": 2, "skipped_no_caption": 1, "shards_with_read_errors": 1}
    row = next(iter_rows(out))
    assert (row["key"], row["raw_caption"]) == ("k0", "a picture of k0")
    assert load_image(row, out).getpixel((0, 0)) == colour(0)


def test_cli_webdataset_summary_and_error(tmp_path, shards, recaptions, capsys):
    paths, _ = shards
    out = tmp_path / "m"
    code = main(["manifest", "webdataset", *paths, "--out", str(out), "--on-duplicate", "first",
                 "--long-captions", str(recaptions[0]), "--caption-field", "minicpm"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "train" in printed and "skipped_undecodable_image" in printed
    assert any(line.split() == ["skipped_undecodable_image", "2"] for line in printed.splitlines())
    assert main(["manifest", "webdataset", *paths, "--out", str(tmp_path / "e")]) == 2
    assert "duplicate key 'dupin'" in capsys.readouterr().err


# ---------- parquet / HF datasets ----------


def image_table(rows):
    return pa.table({
        "key": [r[0] for r in rows],
        "image": pa.array([{"bytes": r[1], "path": None} for r in rows],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "text": [r[2] for r in rows],
        "long": [r[3] for r in rows],
    })


PARQUET_ROWS = [
    ("p0", png(0), "caption p0", "long p0"),
    ("p1", HTML, "caption p1", None),
    ("p2", png(2), "caption p2", None),
    ("p0", png(9), "caption p0 again", None),
    ("p3", png(3), " ", "long p3"),
    ("p4", png(4), "", ""),
]


def test_parquet_source(tmp_path):
    src = tmp_path / "data.parquet"
    pq.write_table(image_table(PARQUET_ROWS), src)
    out = tmp_path / "m"
    with pytest.raises(DuplicateKeyError, match=r"'p0' at data row 0 and at data row 3"):
        build_parquet_manifest([src], out)
    info = build_parquet_manifest([src], out, long_column="long", on_duplicate="first")
    assert info.counts == {"train": 3, "total": 3}
    assert info.coverage == {"samples_seen": 6, "duplicate_keys": 1, "empty_caption_to_null": 1,
                             "skipped_duplicate": 1, "skipped_no_caption": 1, "skipped_undecodable_image": 1}
    rows = rows_by_key(out)
    assert {k: (r["raw_caption"], r["long_caption"]) for k, r in rows.items()} == {
        "p0": ("caption p0", "long p0"), "p2": ("caption p2", None), "p3": (None, "long p3")}
    for key, row in rows.items():
        assert load_image(row, out).getpixel((0, 0)) == colour(int(key[1]))
    table = pads.dataset(out / "data").to_table()  # plain pyarrow, no project code
    assert table.column("key").to_pylist() == ["p0", "p2", "p3"]
    assert [im["bytes"] for im in table.column("image").to_pylist()] == [png(0), png(2), png(3)]
    with pytest.raises(ManifestError, match=r"no column 'title' \(--raw-column\)"):
        build_parquet_manifest([src], out, raw_column="title")


def test_hf_datasets_folder_with_paths_and_splits(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(png(i))
    (tmp_path / "img" / "bad.jpg").write_bytes(HTML)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    train = datasets.Dataset.from_dict(
        {"image": [str(tmp_path / "img" / "0.png"), str(tmp_path / "img" / "bad.jpg")], "text": ["zero", "bad"]},
        features=features)
    test = datasets.Dataset.from_dict({"image": [str(tmp_path / "img" / "2.png")], "text": ["two"]}, features=features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "m"
    info = build_parquet_manifest([tmp_path / "hf"], out)
    assert info.counts == {"train": 1, "test": 1, "total": 2}
    assert info.coverage == {"samples_seen": 3, "skipped_undecodable_image": 1}
    rows = rows_by_key(out)
    assert set(rows) == {"train-00000000", "test-00000000"}
    assert rows["train-00000000"]["raw_caption"] == "zero"
    assert load_image(rows["train-00000000"], out).getpixel((0, 0)) == colour(0)
    assert rows["test-00000000"]["split"] == "test"
    assert load_image(rows["test-00000000"], out).getpixel((0, 0)) == colour(2)


# ---------- csv ----------


def test_csv_source_tab_and_comma(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(3):
        (tmp_path / "images" / f"{i}.png").write_bytes(png(i))
    (tmp_path / "images" / "html.jpg").write_bytes(HTML)
    lines = ["filepath\ttitle", "images/0.png\tzero", "images/html.jpg\thtml", "images/missing.png\tgone",
             f"{tmp_path / 'images' / '2.png'}\t{QUOTE_TEXT}", "images/1.png\tone",
             "images/0.png\tzero again", "images/1.png\t  "]
    tsv = tmp_path / "train.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "m"
    with pytest.raises(DuplicateKeyError, match=r"'images/0.png' at .*train.tsv line 2 and at .*train.tsv line 7"):
        build_csv_manifest([tsv], out)
    info = build_csv_manifest([tsv], out, on_duplicate="skip")
    assert info.counts == {"train": 1, "total": 1}
    assert info.coverage == {"samples_seen": 7, "duplicate_keys": 2, "skipped_duplicate": 4,
                             "skipped_no_image": 1, "skipped_undecodable_image": 1}
    rows = rows_by_key(out)
    assert list(rows) == [str(tmp_path / "images" / "2.png")]
    assert rows[str(tmp_path / "images" / "2.png")]["raw_caption"] == QUOTE_TEXT
    assert load_image(rows[str(tmp_path / "images" / "2.png")], out).getpixel((0, 0)) == colour(2)
    comma = tmp_path / "train.csv"
    comma.write_text('filepath,title\nimages/0.png,"zero, with ""quotes"":"""\nimages/1.png,one\n')
    info = build_csv_manifest([comma], out)
    rows = rows_by_key(out)
    assert rows["images/0.png"]["raw_caption"] == 'zero, with "quotes":"'
    assert load_image(rows["images/1.png"], out).getpixel((0, 0)) == colour(1)
    assert info.source["args"]["sep"] is None


# ---------- folder ----------


def test_folder_source(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(4):
        (folder / "sub" / f"{i}.png").write_bytes(png(i))
    (folder / "broken.jpg").write_bytes(jpeg(5, size=256)[:1200])
    entries = [
        json.dumps({"file": "sub/0.png", "raw_caption": "zero", "long_caption": "a long zero"}),
        json.dumps({"file": "sub/1.png", "caption": QUOTE_TEXT, "split": "val", "lang": "en"}),
        "{not json",
        json.dumps({"file": "broken.jpg", "caption": "broken"}),
        "",
        json.dumps({"file": "sub/0.png", "caption": "zero again"}),
        json.dumps({"file": "sub/2.png", "short_caption": "   "}),
        json.dumps({"key": "k3", "file": "sub/3.png", "short_caption": "three"}),
    ]
    (folder / "captions.jsonl").write_text("\n".join(entries) + "\n")
    out = tmp_path / "m"
    with pytest.raises(DuplicateKeyError, match="'sub/0.png'.*line 1 and at .*line 6"):
        build_folder_manifest(folder, out)
    info = build_folder_manifest(folder, out, on_duplicate="first", split="test")
    assert info.counts == {"test": 2, "val": 1, "total": 3}
    assert info.coverage == {"samples_seen": 7, "duplicate_keys": 1, "skipped_bad_line": 1,
                             "skipped_duplicate": 1, "skipped_no_caption": 1,
                             "skipped_undecodable_image": 1}
    rows = rows_by_key(out)
    assert rows["sub/0.png"]["raw_caption"] == "zero" and rows["sub/0.png"]["long_caption"] == "a long zero"
    assert rows["sub/1.png"]["raw_caption"] == QUOTE_TEXT and rows["sub/1.png"]["lang"] == "en"
    assert rows["k3"]["short_caption"] == "three" and rows["k3"]["raw_caption"] is None
    for key, n in (("sub/0.png", 0), ("sub/1.png", 1), ("k3", 3)):
        assert load_image(rows[key], out).getpixel((0, 0)) == colour(n)
    (folder / "unlisted.webp").write_bytes(b"x")
    assert build_folder_manifest(folder, out, on_duplicate="first").coverage["unlisted_images"] == 1


def test_manifest_inside_data_folder_uses_relative_paths(tmp_path):
    (tmp_path / "a.png").write_bytes(png(1))
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "a.png", "caption": "one"}) + "\n")
    out = tmp_path / "m"
    build_folder_manifest(tmp_path, out)
    row = next(iter_rows(out))
    assert row["image_path"] == str((tmp_path / "a.png").resolve())
    build_folder_manifest(tmp_path, tmp_path)
    row = next(iter_rows(tmp_path))
    assert row["image_path"] == "a.png"
    assert load_image(row, tmp_path).getpixel((0, 0)) == colour(1)


def test_cli_flags_reach_csv_parquet_and_folder_sources(tmp_path, capsys):
    (tmp_path / "0.png").write_bytes(png(0))
    (tmp_path / "list.txt").write_text("path;caption;long\n0.png;zero;a long zero\nmissing.png;gone;x\n")
    out = tmp_path / "csv"
    assert main(["manifest", "csv", str(tmp_path / "list.txt"), "--out", str(out), "--sep", ";",
                 "--image-column", "path", "--raw-column", "caption", "--long-column", "long", "--split", "val"]) == 0
    assert [(r["key"], r["raw_caption"], r["long_caption"], r["split"]) for r in iter_rows(out)] == [
        ("0.png", "zero", "a long zero", "val")]
    assert any(line.split() == ["skipped_no_image", "1"] for line in capsys.readouterr().out.splitlines())

    pq.write_table(image_table(PARQUET_ROWS[:3]), tmp_path / "t.parquet")
    out = tmp_path / "pq"
    assert main(["manifest", "parquet", str(tmp_path / "t.parquet"), "--out", str(out), "--limit", "1"]) == 0
    assert [r["key"] for r in iter_rows(out)] == ["p0"]

    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "0.png", "caption": "zero"}) + "\n")
    assert main(["manifest", "folder", str(tmp_path), "--out", str(tmp_path / "f")]) == 0
    assert [r["raw_caption"] for r in iter_rows(tmp_path / "f")] == ["zero"]
    capsys.readouterr()

    assert main(["manifest", "folder", "--out", str(tmp_path / "x")]) == 2
    assert main(["manifest", "emoji", "extra", "--out", str(tmp_path / "x")]) == 2
    assert main(["manifest", "csv", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "takes exactly one folder" in err and "takes no inputs" in err and "nope.csv does not exist" in err


def test_unreadable_side_files_raise_clear_errors(tmp_path, shards):
    paths, _ = shards
    broken = tmp_path / "broken.json"
    broken.write_text('[{"__key__": "a0", "minicpm": "x"}, {"__key__": ')
    with pytest.raises(ManifestError, match="broken.json: invalid JSON"):
        build_webdataset_manifest(paths, tmp_path / "m", on_duplicate="first", long_captions=broken)
    with pytest.raises(FileNotFoundError, match="recaption file .*absent.json does not exist"):
        build_webdataset_manifest(paths, tmp_path / "m", short_captions=tmp_path / "absent.json")
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(b"filepath,title\nx.png,caf\xe9\n")
    with pytest.raises(ManifestError, match="latin1.csv is not UTF-8 text"):
        build_csv_manifest([latin1], tmp_path / "m")
    assert not (tmp_path / "m" / ".staging").exists()


def test_image_paths_outside_the_root_are_never_opened_and_counted(tmp_path):
    """Issue 24 item 5: a captions line or CSV cell naming an image outside the source's root (absolute elsewhere,
    or ``..`` climbing out) is skipped as ``skipped_image_outside_root``, although the file exists and decodes."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "in.png").write_bytes(png(0))
    (tmp_path / "secret.png").write_bytes(png(1))
    entries = [{"file": "in.png", "caption": "in"}, {"file": str(folder / "in.png"), "key": "abs-in", "caption": "x"},
               {"file": "../secret.png", "caption": "up"}, {"file": str(tmp_path / "secret.png"), "caption": "abs"},
               {"file": "sub/../../secret.png", "caption": "sneaky"}]
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    info = build_folder_manifest(folder, tmp_path / "m")
    assert info.coverage == {"samples_seen": 5, "skipped_image_outside_root": 3}
    assert sorted(rows_by_key(tmp_path / "m")) == ["abs-in", "in.png"]
    csv_file = folder / "list.csv"
    csv_file.write_text(f"filepath,title\nin.png,in\n../secret.png,up\n{tmp_path / 'secret.png'},abs\n")
    info = build_csv_manifest([csv_file], tmp_path / "c")
    assert info.coverage == {"samples_seen": 3, "skipped_image_outside_root": 2}
    assert list(rows_by_key(tmp_path / "c")) == ["in.png"]
    info = build_csv_manifest([csv_file], tmp_path / "c", image_root=tmp_path)  # a wider root, on purpose
    assert info.coverage == {"samples_seen": 3} and len(rows_by_key(tmp_path / "c")) == 3
