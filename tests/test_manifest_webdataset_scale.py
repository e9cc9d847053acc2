"""WebDataset manifest source at scale (issue 10) and its input edge cases (issue 12 items 5, 6).

Bucketed recaption join (exact key -> caption pairings, every counted outcome), ``workers`` that do not
change a byte of the output, shard URLs, captions read from ``.json``, recaption files with a BOM, in JSON
lines, with non-string values or a wrong caption field, and the 0-row error. Every fixture is built here:
each key's image has its own colour and its captions name the key, so a misaligned row cannot pass.
"""

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

import manifests.wds.recaptions as recaption_store
from flame_pipeline.cli import main
from manifests.common import DuplicateKeyError
from manifests.images import decode_image, load_image
from manifests.schema import ManifestError, iter_rows, read_manifest_info
from manifests.wds.digests import key_digests
from manifests.wds.recaptions import recaption_buckets
from manifests.webdataset_source import build_webdataset_manifest
from tests.helpers.shards import write_tar

HTML = b"<!DOCTYPE html><html><body>gone</body></html>"


def colour(i: int) -> tuple[int, int, int]:
    return (37 * i % 256, 255 - 11 * i % 256, (90 + 3 * i) % 256)


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), colour(i)).save(buf, format="PNG")
    return buf.getvalue()




def key(i: int) -> str:
    return f"k{i:03d}"


def samples(indices) -> list[tuple[str, bytes]]:
    """Members of good samples: ``k{i}.png`` in colour i and ``k{i}.txt`` = ``raw k{i}``."""
    members = []
    for i in indices:
        members += [(f"{key(i)}.png", png(i)), (f"{key(i)}.txt", f"raw {key(i)}".encode())]
    return members


@pytest.fixture
def three_shards(tmp_path):
    """k000..k119 in three shards of 40; k005's image is HTML (skipped as undecodable)."""
    paths = []
    for s in range(3):
        members = samples(range(40 * s, 40 * s + 40))
        if s == 0:
            members[10] = ("k005.png", HTML)
        paths.append(str(write_tar(tmp_path / f"shard-{s:05d}.tar", members)))
    return paths


def rows_by_key(out):
    return {r["key"]: r for r in iter_rows(out)}


def write_json(path: Path, entries, *, bom: bool = False, lines: bool = False) -> Path:
    text = "\n".join(json.dumps(e) for e in entries) + "\n" if lines else json.dumps(entries)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def test_recaption_join_over_many_buckets_pairs_every_key(tmp_path, three_shards, monkeypatch):
    monkeypatch.setattr(recaption_store, "RECAPTION_BUCKET_BYTES", 256)
    entries = [{"__key__": key(i), "minicpm": f"long {key(i)}"} for i in range(120) if i % 7]  # 102
    entries += [{"__key__": f"ghost{g}", "minicpm": "no such sample"} for g in range(15)]
    entries += [
        "not an object",
        {"minicpm": "no key"},
        {"__key__": 12, "minicpm": "key is a number"},
        {"__key__": "k007", "minicpm": 42},  # k007 has no good entry: i % 7 == 0
        {"__key__": "k014", "minicpm": None},
        {"__key__": "k021"},
        {"__key__": "k028", "minicpm": ["a", "list"]},
    ]
    entries.append({"__key__": "k035", "minicpm": "  \n "})  # whitespace: matched, but no caption
    path = write_json(tmp_path / "long.json", entries)
    assert recaption_buckets(path) >= 20  # many buckets, so matches come from many join outputs
    out = tmp_path / "m"
    info = build_webdataset_manifest(three_shards, out, long_captions=path)

    assert info.counts == {"train": 119, "total": 119}
    assert read_manifest_info(out).coverage == {
        "samples_seen": 120,
        "long_caption_bad_entry": 7,
        "long_caption_without_sample": 16,  # 15 ghosts + k005, whose image is skipped
        "sample_without_long_caption": 18,  # i % 7 == 0: no good entry (k035's is whitespace)
        "skipped_undecodable_image": 1,
    }
    rows = rows_by_key(out)
    assert list(rows) == [key(i) for i in range(120) if i != 5]
    for i in range(120):
        if i == 5:
            continue
        row = rows[key(i)]
        expected = None if i % 7 == 0 else f"long {key(i)}"
        assert (row["raw_caption"], row["long_caption"], row["short_caption"]) == (
            f"raw {key(i)}", expected, None)
        assert row["image_path"] == str(Path(three_shards[i // 40]).resolve())
        assert row["image_member"] == f"{key(i)}.png"
    assert load_image(rows["k077"], out).getpixel((0, 0)) == colour(77)
    assert not (out / ".staging").exists()


def test_recaption_duplicates_first_skip_error(tmp_path, three_shards, monkeypatch):
    monkeypatch.setattr(recaption_store, "RECAPTION_BUCKET_BYTES", 64)
    path = tmp_path / "long.json"
    a, b = "k010", "k050"
    entries = [
        {"__key__": a, "minicpm": "a first"},
        {"__key__": b, "minicpm": "b first"},
        {"__key__": b, "minicpm": "b second"},  # the first repeat in file order
        {"__key__": a, "minicpm": "a second"},
        {"__key__": b, "minicpm": "b third"},
        {"__key__": "ghost", "minicpm": "g1"},
        {"__key__": "ghost", "minicpm": "g2"},  # no sample: two entries without a sample, not a duplicate
        {"__key__": "k011", "minicpm": "single"},
    ]
    write_json(path, entries)
    buckets = recaption_buckets(path)
    assert key_digests([a])[0, 0] % buckets != key_digests([b])[0, 0] % buckets  # repeats in two buckets

    info = build_webdataset_manifest(three_shards, tmp_path / "first", long_captions=path,
                                     on_duplicate="first")
    rows = rows_by_key(tmp_path / "first")
    assert (rows[a]["long_caption"], rows[b]["long_caption"], rows["k011"]["long_caption"]) == (
        "a first", "b first", "single")
    assert info.coverage["long_caption_duplicate_key"] == 3
    assert info.coverage["long_caption_without_sample"] == 2
    assert info.coverage["sample_without_long_caption"] == 119 - 3

    info = build_webdataset_manifest(three_shards, tmp_path / "skip", long_captions=path, on_duplicate="skip")
    rows = rows_by_key(tmp_path / "skip")
    assert (rows[a]["long_caption"], rows[b]["long_caption"], rows["k011"]["long_caption"]) == (
        None, None, "single")
    assert info.coverage["long_caption_duplicate_key"] == 3
    assert info.coverage["sample_without_long_caption"] == 119 - 1

    with pytest.raises(DuplicateKeyError, match=r"long.json: key 'k050' is listed more than once"):
        build_webdataset_manifest(three_shards, tmp_path / "error", long_captions=path)
    assert not (tmp_path / "error" / "manifest.json").exists()
    assert not (tmp_path / "error" / ".staging").exists()


def test_recaption_files_with_bom_in_json_lines_and_bad_values(tmp_path, three_shards):
    long = write_json(tmp_path / "long.json", [{"__key__": key(i), "minicpm": f"long {i}"} for i in (1, 2)],
                      bom=True)
    short_entries = [
        {"__key__": "k001", "minicpm": "short 1"},
        {"__key__": "k002", "minicpm": 3},
        {"__key__": "k003", "minicpm": None},
        {"__key__": "k004", "minicpm": {"text": "nested"}},
        {"__key__": "k006"},
        {"__key__": "k008", "minicpm": "short 8"},
    ]
    short = write_json(tmp_path / "short.jsonl", short_entries, bom=True, lines=True)
    short.write_bytes(short.read_bytes().replace(b"\n", b"\n\n", 1))  # a blank line between entries
    info = build_webdataset_manifest(three_shards[:1], tmp_path / "m", long_captions=long,
                                     short_captions=short)
    rows = rows_by_key(tmp_path / "m")
    picked = [(k, rows[k]["long_caption"], rows[k]["short_caption"]) for k in ("k001", "k002", "k008")]
    assert picked == [("k001", "long 1", "short 1"), ("k002", "long 2", None), ("k008", None, "short 8")]
    assert info.coverage == {
        "samples_seen": 40,
        "sample_without_long_caption": 37,
        "sample_without_short_caption": 37,
        "short_caption_bad_entry": 4,
        "skipped_undecodable_image": 1,
    }

    other = write_json(tmp_path / "other.json", [{"__key__": "k001", "text": "x", "score": 1}] * 2)
    with pytest.raises(ManifestError) as err:
        build_webdataset_manifest(three_shards[:1], tmp_path / "m2", long_captions=other)
    assert str(err.value) == (
        f"{other}: no entry has the caption field 'minicpm' (--caption-field); "
        "the entries have the fields ['__key__', 'score', 'text']"
    )
    scalar = tmp_path / "scalar.json"
    scalar.write_text('"just a string"')
    with pytest.raises(ManifestError, match=r"scalar.json: expected a JSON list of objects or JSON lines"):
        build_webdataset_manifest(three_shards[:1], tmp_path / "m3", long_captions=scalar)
    garbage = tmp_path / "garbage.json"
    garbage.write_text('[{"__key__": "k001", "minicpm": "x"}] trailing')
    with pytest.raises(ManifestError, match=r"garbage.json: invalid JSON"):
        build_webdataset_manifest(three_shards[:1], tmp_path / "m4", long_captions=garbage)
    assert not (tmp_path / "m2" / "manifest.json").exists()


def test_workers_give_byte_identical_manifests(tmp_path, monkeypatch):
    monkeypatch.setattr(recaption_store, "RECAPTION_BUCKET_BYTES", 128)
    shards = []
    for s in range(5):
        members = samples(range(20 * s, 20 * s + 20))
        if s == 3:  # k025 again: its first copy is in shard 1
            members += [("k025.png", png(200)), ("k025.txt", b"k025 copy in shard 3")]
        shards.append(str(write_tar(tmp_path / f"s{s}.tar", members)))
    long = write_json(tmp_path / "long.json",
                      [{"__key__": key(i), "minicpm": f"long {i}"} for i in range(0, 110, 3)])
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        code = main(["manifest", "webdataset", *shards, "--out", str(out), "--on-duplicate", "first",
                     "--long-captions", str(long), "--workers", str(workers)])
        assert code == 0
        outs[workers] = out
    info = read_manifest_info(outs[1])
    assert info.counts == {"train": 100, "total": 100}
    assert info.coverage == {
        "samples_seen": 101,
        "duplicate_keys": 1,
        "long_caption_without_sample": 3,  # 102, 105, 108
        "sample_without_long_caption": 66,
        "skipped_duplicate": 1,
    }
    assert info.parts == [f"data/part-{s:05d}.parquet" for s in range(5)]
    for part in info.parts:
        assert (outs[1] / part).read_bytes() == (outs[2] / part).read_bytes()
    assert (outs[1] / "manifest.json").read_bytes() == (outs[2] / "manifest.json").read_bytes()
    rows = rows_by_key(outs[2])
    assert rows["k025"]["raw_caption"] == "raw k025" and rows["k025"]["image_path"].endswith("s1.tar")
    assert load_image(rows["k025"], outs[2]).getpixel((0, 0)) == colour(25)
    assert rows["k027"]["long_caption"] == "long 27" and rows["k028"]["long_caption"] is None

    with pytest.raises(DuplicateKeyError) as err:
        build_webdataset_manifest(shards, tmp_path / "e", workers=2)
    assert str(err.value).startswith(
        f"duplicate key 'k025' at {shards[1]} member k025.png (#11) and at {shards[3]} member k025.png (#41)")
    limited = build_webdataset_manifest(shards, tmp_path / "l2", workers=2, limit=30, on_duplicate="first")
    single = build_webdataset_manifest(shards, tmp_path / "l1", limit=30, on_duplicate="first")
    assert limited.coverage == single.coverage == {"samples_seen": 30}
    assert [r["key"] for r in iter_rows(tmp_path / "l2")] == [key(i) for i in range(30)]


def read_member_via_gopen(url: str, member: str) -> bytes:
    """A tar member read the way webdataset reads a shard URL (stream, no seek)."""
    from webdataset.gopen import gopen

    with gopen(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
            if info.name == member:
                return tar.extractfile(info).read()
    raise AssertionError(f"{member} not in {url}")


def test_shard_urls_flow_into_image_path_unchanged(tmp_path):
    a = write_tar(tmp_path / "a.tar", samples([1, 2]))
    b = write_tar(tmp_path / "b.tar", samples([3]))
    urls = [f"file://{a}", f"pipe:cat {b}", f"pipe:cat {tmp_path / 'missing.tar'}"]
    out = tmp_path / "m"
    info = build_webdataset_manifest(urls, out)
    assert info.coverage == {"samples_seen": 3, "shards_with_read_errors": 1}
    rows = rows_by_key(out)
    assert [(k, r["image_path"], r["image_member"], r["raw_caption"]) for k, r in rows.items()] == [
        ("k001", urls[0], "k001.png", "raw k001"),
        ("k002", urls[0], "k002.png", "raw k002"),
        ("k003", urls[1], "k003.png", "raw k003"),
    ]
    for k, i in (("k002", 2), ("k003", 3)):
        image = decode_image(read_member_via_gopen(rows[k]["image_path"], rows[k]["image_member"]))
        assert image.getpixel((0, 0)) == colour(i)
    with pytest.raises(FileNotFoundError, match="webdataset shard file:///nowhere/x.tar does not exist"):
        build_webdataset_manifest(["file:///nowhere/x.tar"], tmp_path / "x")


@pytest.mark.parametrize("form", ["file", "pipe"])
def test_load_image_opens_url_rows(tmp_path, form):
    tar = write_tar(tmp_path / "a.tar", samples([4]))
    url = f"file://{tar}" if form == "file" else f"pipe:cat {tar}"
    out = tmp_path / "m"
    build_webdataset_manifest([url], out)
    assert load_image(next(iter_rows(out)), out).getpixel((0, 0)) == colour(4)


def test_raw_caption_from_json_member(tmp_path, capsys):
    tar = write_tar(tmp_path / "a.tar", [
        ("s0.png", png(0)), ("s0.json", json.dumps({"caption": "from json", "url": "http://x"}).encode()),
        ("s1.png", png(1)), ("s1.txt", b"txt wins"), ("s1.json", b'{"caption": "not this"}'),
        ("s2.png", png(2)), ("s2.json", b'{"alt": "alt of s2"}'),
        ("s3.png", png(3)), ("s3.json", b"not json {"),
        ("s4.png", png(4)), ("s4.json", b'{"caption": "  "}'),
        ("s5.png", png(5)), ("s5.json", b'{"caption": 7, "alt": 8}'),
    ])
    out = tmp_path / "m"
    info = build_webdataset_manifest([str(tar)], out)
    assert [(r["key"], r["raw_caption"]) for r in iter_rows(out)] == [("s0", "from json"), ("s1", "txt wins")]
    assert info.coverage == {"samples_seen": 6, "caption_from_json": 1, "json_without_caption": 3,
                             "skipped_no_caption": 4}

    assert main(["manifest", "webdataset", str(tar), "--out", str(tmp_path / "alt"),
                 "--json-caption-field", "alt"]) == 0
    assert [(r["key"], r["raw_caption"]) for r in iter_rows(tmp_path / "alt")] == [
        ("s1", "txt wins"), ("s2", "alt of s2")]
    coverage = read_manifest_info(tmp_path / "alt").coverage
    assert (coverage["caption_from_json"], coverage["json_without_caption"]) == (1, 4)
    capsys.readouterr()


def test_zero_usable_rows_is_an_error_and_keeps_the_old_manifest(tmp_path, capsys):
    good = write_tar(tmp_path / "good.tar", samples([1]))
    out = tmp_path / "m"
    build_webdataset_manifest([str(good)], out)
    before = {p.name: p.read_bytes() for p in [out / "manifest.json", *sorted((out / "data").iterdir())]}
    bare = write_tar(tmp_path / "bare.tar",
                     [("s0.png", png(0)), ("s0.json", b'{"url": "u"}'), ("s1.png", png(1))])
    with pytest.raises(ManifestError) as err:
        build_webdataset_manifest([str(bare)], out)
    assert str(err.value) == (
        "no usable rows in 1 shard(s) (2 samples read; json_without_caption 1, skipped_no_caption 2)")
    after = {p.name: p.read_bytes() for p in [out / "manifest.json", *sorted((out / "data").iterdir())]}
    assert after == before and not (out / ".staging").exists()

    capsys.readouterr()
    code = main(["manifest", "webdataset", str(bare), "--out", str(tmp_path / "n")])
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("flame")]
    assert code == 2
    assert err_lines == [
        "flame manifest: no usable rows in 1 shard(s) (2 samples read; json_without_caption 1, "
        "skipped_no_caption 2)"]
    assert not (tmp_path / "n" / "manifest.json").exists()
