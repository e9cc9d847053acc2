"""The emoji manifest on a tiny npm-style fixture (exact rows, captions, pixels, splits); slow: for real."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from manifests import emoji
from manifests.schema import iter_rows, pairs_to_dict, read_manifest, read_manifest_info

# Pixels of every fixture PNG (2x2 RGBA); pixel (0,1) carries the image's id so rows can be matched to files.
HALF_RED, CLEAR, QUARTER_BLACK = (255, 0, 0, 128), (0, 0, 255, 0), (0, 0, 0, 64)
# round((c*a + 255*(255-a)) / 255): red at alpha 128 -> (255, 127, 127); black at alpha 64 -> 191.
ON_WHITE = {(0, 0): (255, 127, 127), (1, 0): (255, 255, 255), (1, 1): (191, 191, 191)}

EMOJI_JSON = [
    {
        "unified": "1F600",
        "image": "1f600.png",
        "name": "GRINNING FACE",
        "category": "Smileys & Emotion",
        "subcategory": "face-smiling",
        "sort_order": 1,
        "has_img_google": True,
        "has_img_twitter": True,
    },
    {
        "unified": "1F44B",
        "image": "1f44b.png",
        "name": "WAVING HAND SIGN",
        "category": "People & Body",
        "subcategory": "hand-fingers-open",
        "sort_order": 2,
        "has_img_google": True,
        "has_img_twitter": True,
        "skin_variations": {
            "1F3FF": {
                "unified": "1F44B-1F3FF",
                "image": "1f44b-1f3ff.png",
                "has_img_google": True,
                "has_img_twitter": True,
            },
            "1F3FB": {
                "unified": "1F44B-1F3FB",
                "image": "1f44b-1f3fb.png",
                "has_img_google": True,
                "has_img_twitter": True,
            },
        },
    },
    {
        "unified": "1F9A9",
        "image": "1f9a9.png",
        "name": "FLAMINGO",
        "category": "Animals & Nature",
        "subcategory": "animal-bird",
        "sort_order": 0,
        "has_img_google": True,
        "has_img_twitter": False,
    },
]
CLDR = {
    ("annotations", "en"): {
        "😀": {"default": ["face", "grin", "grinning face"], "tts": ["grinning face"]},
        "👋": {"default": ["hand", "wave"], "tts": ["waving hand"]},
    },
    ("annotationsDerived", "en"): {
        "👋🏻": {"default": ["hand", "light skin tone", "wave"], "tts": ["waving hand: light skin tone"]},
    },
    ("annotations", "de"): {
        "😀": {"default": ["Gesicht"], "tts": ["grinsendes Gesicht"]},
        "👋": {"default": ["Hand"], "tts": ["winkende Hand"]},
    },
    ("annotationsDerived", "de"): {
        "👋🏻": {"default": ["Hand"], "tts": ["winkende Hand: helle Hautfarbe"]},
        "👋🏿": {"default": ["Hand"], "tts": ["winkende Hand: dunkle Hautfarbe"]},
    },
}
IMAGES = ["1f600.png", "1f44b.png", "1f44b-1f3fb.png", "1f44b-1f3ff.png", "1f9a9.png"]
KEYS = [
    "google/1f9a9",
    "google/1f600",
    "twitter/1f600",
    "google/1f44b",
    "twitter/1f44b",
    "google/1f44b-1f3fb",
    "google/1f44b-1f3ff",
    "twitter/1f44b-1f3ff",
]


def _png(image_id: int, vendor_id: int) -> bytes:
    rows = [[HALF_RED, CLEAR], [(image_id, vendor_id, 30, 255), QUARTER_BLACK]]  # rows[y][x]
    pixels = np.array(rows, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def packages(tmp_path, monkeypatch) -> dict[str, Path]:
    """Fake extracted npm packages; twitter lacks 1f44b-1f3fb.png (flagged present) and 1f9a9."""
    dirs = {name: tmp_path / name for name in emoji.NPM_PACKAGES}
    (dirs["emoji-datasource"]).mkdir()
    (dirs["emoji-datasource"] / "emoji.json").write_text(json.dumps(EMOJI_JSON))
    for (kind, loc), table in CLDR.items():
        pkg = "cldr-annotations-full" if kind == "annotations" else "cldr-annotations-derived-full"
        path = dirs[pkg] / kind / loc / "annotations.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({kind: {"identity": {"language": loc}, "annotations": table}}))
    for vendor_id, vendor in enumerate(("google", "twitter"), start=1):
        img_dir = dirs[f"emoji-datasource-{vendor}"] / "img" / vendor / "64"
        img_dir.mkdir(parents=True)
        for image_id, name in enumerate(IMAGES, start=1):
            if vendor == "google" or name not in ("1f44b-1f3fb.png", "1f9a9.png"):
                (img_dir / name).write_bytes(_png(image_id, vendor_id))
    monkeypatch.setattr(emoji, "npm_package_dir", lambda name: dirs[name])
    return dirs


def _rows(out: Path) -> dict[str, dict]:
    return {row["key"]: row for row in iter_rows(out)}


def test_rows_labels_names_and_coverage(packages, tmp_path):
    out = tmp_path / "m"
    info = emoji.build_emoji_manifest(out)
    rows = _rows(out)
    assert list(rows) == KEYS
    assert [r["labels"]["base"] for r in rows.values()] == [
        "1f9a9",
        "1f600",
        "1f600",
        "1f44b",
        "1f44b",
        "1f44b",
        "1f44b",
        "1f44b",
    ]
    assert rows["twitter/1f44b-1f3ff"]["labels"] == {
        "category": "People & Body",
        "subcategory": "hand-fingers-open",
        "base": "1f44b",
        "vendor": "twitter",
    }
    assert rows["google/1f44b-1f3fb"]["names"] == {
        "en": "waving hand: light skin tone",
        "de": "winkende Hand: helle Hautfarbe",
    }
    assert rows["google/1f44b-1f3ff"]["names"] == {"de": "winkende Hand: dunkle Hautfarbe"}
    assert rows["google/1f9a9"]["names"] == {}
    assert {r["lang"] for r in rows.values()} == {"en"}
    assert {(r["image_path"], r["image_member"]) for r in rows.values()} == {(None, None)}
    cov = info.coverage
    assert cov["rows_per_vendor"] == {"google": 5, "twitter": 3}
    assert (cov["no_image_google"], cov["no_image_twitter"]) == (0, 1)
    assert (cov["missing_image_file_google"], cov["missing_image_file_twitter"]) == (0, 1)
    assert cov["name_fallback_emoji_json"] == 3
    assert (cov["names_per_locale"]["en"], cov["names_per_locale"]["de"], cov["names_per_locale"]["ja"]) == (
        5,
        7,
        0,
    )
    assert (cov["names_missing_per_locale"]["en"], cov["names_missing_per_locale"]["ja"]) == (3, 8)
    assert info.source["args"] == {
        "vendors": ["google", "twitter"],
        "seed": 0,
        "splits": [0.8, 0.1, 0.1],
        "limit": None,
    }
    assert read_manifest_info(out).counts == info.counts


def test_exact_captions(packages, tmp_path):
    out = tmp_path / "m"
    emoji.build_emoji_manifest(out)
    rows = _rows(out)
    wave = rows["google/1f44b-1f3fb"]
    assert wave["raw_caption"] == "waving hand: light skin tone"
    assert (
        wave["short_caption"]
        == "An emoji showing waving hand: light skin tone, from the people and body category."
    )
    assert wave["long_caption"] == (
        "An emoji from Google's Noto Color Emoji set showing waving hand: light skin tone. It belongs to the "
        "people and body category, in the hand fingers open group. Related words: hand, light skin tone, "
        "wave. It is drawn with rounded shapes, bright colours and subtle shading. The image is a small "
        "64 by 64 pixel icon on a white background."
    )
    assert rows["twitter/1f600"]["long_caption"] == (
        "An emoji from Twitter's Twemoji set showing grinning face. It belongs to the smileys and emotion "
        "category, in the face smiling group. Related words: face, grin. It is drawn with simple flat shapes "
        "and bold colours. The image is a small 64 by 64 pixel icon on a white background."
    )
    # No CLDR name: emoji.json name lower-cased (plus skin tones), and no "Related words" sentence.
    assert rows["google/1f44b-1f3ff"]["raw_caption"] == "waving hand sign: dark skin tone"
    assert rows["google/1f9a9"]["long_caption"] == (
        "An emoji from Google's Noto Color Emoji set showing flamingo. It belongs to the animals and nature "
        "category, in the animal bird group. It is drawn with rounded shapes, bright colours and subtle "
        "shading. The image is a small 64 by 64 pixel icon on a white background."
    )


def test_images_composited_on_white(packages, tmp_path):
    out = tmp_path / "m"
    emoji.build_emoji_manifest(out)
    for key, row in _rows(out).items():
        image = Image.open(io.BytesIO(row["image_bytes"]))
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (2, 2))
        for xy, rgb in ON_WHITE.items():
            assert image.getpixel(xy) == rgb
        vendor, code = key.split("/")
        assert image.getpixel((0, 1)) == (IMAGES.index(f"{code}.png") + 1, 1 + (vendor == "twitter"), 30)


def test_split_by_base_never_leaks(packages, tmp_path):
    for seed in range(20):
        out = tmp_path / f"m{seed}"
        info = emoji.build_emoji_manifest(out, seed=seed, splits=(0.34, 0.33, 0.33))
        split_of_base = {}
        for row in _rows(out).values():
            assert split_of_base.setdefault(row["labels"]["base"], row["split"]) == row["split"]
        assert sum(info.coverage["bases_per_split"].values()) == 3
    # u = int(sha256(f"{seed}:{base}")[:16], 16) / 2**64: 0:1f44b -> 0.160, 0:1f600 -> 0.190, 0:1f9a9 -> 0.451
    assert [emoji.split_of(b, 0, (0.17, 0.1, 0.73)) for b in ("1f44b", "1f600", "1f9a9")] == [
        "train",
        "val",
        "test",
    ]
    assert [emoji.split_of("1f600", s, (0.34, 0.33, 0.33)) for s in range(5)] == [
        "train",
        "val",
        "train",
        "val",
        "test",
    ]


def test_split_counts(packages, tmp_path):
    info = emoji.build_emoji_manifest(tmp_path / "m", splits=(0.17, 0.1, 0.73))
    assert info.counts == {"train": 5, "val": 2, "test": 1, "total": 8}
    assert info.coverage["bases_per_split"] == {"train": 1, "val": 1, "test": 1}
    assert read_manifest(tmp_path / "m", split="val")["key"].to_pylist() == ["google/1f600", "twitter/1f600"]
    assert read_manifest(tmp_path / "m", split="test")["key"].to_pylist() == ["google/1f9a9"]


def test_deterministic_bytes(packages, tmp_path):
    emoji.build_emoji_manifest(tmp_path / "a")
    emoji.build_emoji_manifest(tmp_path / "b", workers=1)
    for name in ("data/part-00000.parquet", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_limit_and_vendor_subset(packages, tmp_path):
    info = emoji.build_emoji_manifest(tmp_path / "m", limit=3)
    assert list(_rows(tmp_path / "m")) == KEYS[:3]
    assert info.counts["total"] == 3
    emoji.build_emoji_manifest(tmp_path / "t", vendors=("twitter",))
    assert list(_rows(tmp_path / "t")) == ["twitter/1f600", "twitter/1f44b", "twitter/1f44b-1f3ff"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"vendors": ("apple",)},
            r"vendors must be a non-empty subset of \['google', 'twitter'\], got \['apple'\]",
        ),
        ({"splits": (0.5, 0.2, 0.2)}, r"splits must be three non-negative fractions summing to 1"),
        ({"limit": 0}, r"limit must be a positive number of rows, got 0"),
    ],
)
def test_bad_arguments(packages, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        emoji.build_emoji_manifest(tmp_path / "m", **kwargs)


@pytest.mark.slow
def test_real_emoji_manifest(tmp_path):
    """The full build from the real npm packages (fetched once into $FLAME_HOME)."""
    info = emoji.build_emoji_manifest(tmp_path / "emoji")
    assert info.counts["total"] == 7572
    assert info.coverage["rows_per_vendor"] == {"google": 3786, "twitter": 3786}
    assert sum(info.coverage["bases_per_split"].values()) == 1911
    for loc in ("en", "de", "fr", "es", "ja", "zh", "ar", "hi"):
        assert info.coverage["names_per_locale"][loc] == 7572
    table = read_manifest(tmp_path / "emoji", columns=["labels"])
    assert len({pairs_to_dict(labels)["category"] for labels in table["labels"].to_pylist()}) == 10
    assert len({pairs_to_dict(labels)["subcategory"] for labels in table["labels"].to_pylist()}) == 99
    row = next(r for r in iter_rows(tmp_path / "emoji") if r["key"] == "google/1f44b-1f3fb")
    assert row["names"]["de"] == "winkende Hand: helle Hautfarbe"
    assert row["raw_caption"] == "waving hand: light skin tone"


def test_plain_pyarrow_reads_the_manifest(packages, tmp_path):
    import pyarrow.parquet as pq

    emoji.build_emoji_manifest(tmp_path / "m")
    table = pq.read_table(tmp_path / "m" / "data")
    assert table.num_rows == 8 and table.column("key").to_pylist() == KEYS
