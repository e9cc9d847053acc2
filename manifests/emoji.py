"""The emoji manifest (SPEC §9): vendor emoji PNGs with templated captions and multilingual CLDR names.

Sources (npm packages fetched by :mod:`pipeline.assets`): ``emoji-datasource`` (``emoji.json``: every emoji,
its skin-tone variants, category and subcategory), ``emoji-datasource-google`` / ``-twitter`` (64x64 PNGs
under ``img/<vendor>/64/``), ``cldr-annotations-full`` and ``cldr-annotations-derived-full`` (names and
keywords in 170 locales).

One row per (vendor, emoji), skin-tone variants included, in ``emoji.json`` ``sort_order`` (each base
emoji followed by its variants in code order), the vendors of one emoji next to each other:

- ``key``: ``<vendor>/<code>``, e.g. ``google/1f600``, ``google/1f44b-1f3fb``.
- ``image_bytes``: the PNG composited over white (RGBA -> RGB, ``round((c*a + 255*(255-a)) / 255)`` per
  channel), re-encoded as PNG. ``image_path``/``image_member`` are null.
- ``raw_caption``/``short_caption``/``long_caption``: templated recaptions, see
  :mod:`manifests.emoji_captions` (honestly: built from metadata, not from looking at the image). The
  name is the CLDR English name (annotations, else annotationsDerived); when CLDR has none, the
  ``emoji.json`` name lower-cased (plus the skin-tone names for a variant), counted in coverage.
- ``lang``: ``"en"``. ``labels``: ``category``, ``subcategory``, ``base`` (the base emoji's code, e.g.
  ``1f44b``), ``vendor``. ``names``: ``{locale: CLDR name}`` for :data:`NAME_LOCALES`; a locale without a
  CLDR name for the emoji gets no entry (``en`` included: the emoji.json fallback is not a CLDR name),
  counted per locale in coverage.
- ``split``: by **base** emoji, so skin-tone variants follow their base and test concepts never occur in
  training: ``u = int(sha256(f"{seed}:{base}")[:16], 16) / 2**64``; train if ``u < splits[0]``, val if
  ``u < splits[0] + splits[1]``, else test.

``manifest.json`` coverage: rows per vendor, bases and rows per split, names per locale (present /
missing), name fallbacks, and emoji a vendor has no image for.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from manifests.cldr import CldrEntry, CldrNames
from manifests.emoji_captions import emoji_captions
from manifests.images import composite_on_white
from manifests.registry import no_inputs, register_options, register_source
from manifests.schema import (
    LONG_CAPTION,
    RAW_CAPTION,
    SHORT_CAPTION,
    ManifestError,
    ManifestInfo,
    ManifestWriter,
)
from pipeline.assets import NPM_PACKAGES, npm_package_dir

logger = logging.getLogger(__name__)

VENDOR_PACKAGES = {"google": "emoji-datasource-google", "twitter": "emoji-datasource-twitter"}
NAME_LOCALES = (
    "en",
    "de",
    "fr",
    "es",
    "it",
    "pt",
    "ru",
    "ja",
    "zh",
    "ko",
    "ar",
    "hi",
    "tr",
    "pl",
    "nl",
    "sw",
    "vi",
    "th",
)
SPLITS = ("train", "val", "test")
SKIN_TONES = {
    "1f3fb": "light skin tone",
    "1f3fc": "medium-light skin tone",
    "1f3fd": "medium skin tone",
    "1f3fe": "medium-dark skin tone",
    "1f3ff": "dark skin tone",
}


@dataclass(frozen=True)
class EmojiEntry:
    """One emoji or skin-tone variant from ``emoji.json``.

    Attributes:
        code: lower-case dash-separated code points, e.g. ``"1f44b-1f3fb"``.
        base: ``code`` of the base emoji (equal to ``code`` for a base emoji).
        image: PNG file name under ``img/<vendor>/64/``.
        fallback_name: lower-cased ``emoji.json`` name (+ skin-tone names for a variant).
        category: e.g. ``"People & Body"``.
        subcategory: e.g. ``"hand-fingers-open"``.
        vendors: vendors ``emoji.json`` marks as having an image (``has_img_<vendor>``).
    """

    code: str
    base: str
    image: str
    fallback_name: str
    category: str
    subcategory: str
    vendors: frozenset[str]


def _vendors(record: dict) -> frozenset[str]:
    return frozenset(v for v in VENDOR_PACKAGES if record.get(f"has_img_{v}"))


def load_catalogue(emoji_json: str | Path) -> list[EmojiEntry]:
    """Read ``emoji.json`` into entries: bases in ``sort_order``, each followed by its skin-tone variants.

    Raises:
        OSError, json.JSONDecodeError, KeyError: unreadable or malformed file.
    """
    records = sorted(json.loads(Path(emoji_json).read_text(encoding="utf-8")), key=lambda r: r["sort_order"])
    entries = []
    for rec in records:
        base = rec["unified"].lower()
        name = rec["name"].lower()
        entries.append(
            EmojiEntry(base, base, rec["image"], name, rec["category"], rec["subcategory"], _vendors(rec))
        )
        variations = rec.get("skin_variations") or {}
        for tones in sorted(variations):
            var = variations[tones]
            tone_names = ", ".join(SKIN_TONES[t] for t in tones.lower().split("-"))
            entries.append(
                EmojiEntry(
                    var["unified"].lower(),
                    base,
                    var["image"],
                    f"{name}: {tone_names}",
                    rec["category"],
                    rec["subcategory"],
                    _vendors(var),
                )
            )
    return entries


def split_of(base: str, seed: int, splits: tuple[float, float, float]) -> str:
    """The split of a base emoji: a stable hash of ``f"{seed}:{base}"`` (see the module docstring)."""
    u = int(hashlib.sha256(f"{seed}:{base}".encode()).hexdigest()[:16], 16) / 2**64
    if u < splits[0]:
        return "train"
    return "val" if u < splits[0] + splits[1] else "test"


def png_on_white(png: bytes) -> bytes:
    """Decode an image, composite it over white and re-encode it as an RGB PNG.

    Unlike :func:`manifests.images.decode_image` (which also composites with
    :func:`manifests.images.composite_on_white`), no EXIF orientation or bit-depth rule is applied: the vendor
    PNGs are stored as the emoji data sets ship them.

    Args:
        png: encoded image bytes (any mode Pillow reads: RGBA, P with transparency, RGB, ...).

    Returns:
        PNG bytes, mode RGB, same size; per channel ``round((c*a + 255*(255-a)) / 255)`` (uint8).

    Raises:
        PIL.UnidentifiedImageError: undecodable bytes.
    """
    out = io.BytesIO()
    composite_on_white(Image.open(io.BytesIO(png))).save(out, format="PNG")
    return out.getvalue()


def _check_args(vendors: tuple[str, ...], splits: tuple[float, float, float], limit: int | None) -> None:
    unknown = [v for v in vendors if v not in VENDOR_PACKAGES]
    if unknown or not vendors:
        raise ManifestError(
            f"vendors must be a non-empty subset of {sorted(VENDOR_PACKAGES)}, got {list(vendors)}"
        )
    if len(splits) != 3 or min(splits) < 0 or abs(sum(splits) - 1.0) > 1e-9:
        raise ManifestError(f"splits must be three non-negative fractions summing to 1, got {splits}")
    if limit is not None and limit < 1:
        raise ManifestError(f"limit must be a positive number of rows, got {limit}")


def _read(path: Path) -> bytes | None:
    return png_on_white(path.read_bytes()) if path.is_file() else None


def _row(entry: EmojiEntry, vendor: str, image: bytes, cldr: CldrNames, split: str) -> dict:
    """One manifest row; ``names`` lacks ``en`` exactly when the English name fell back to emoji.json."""
    found = {loc: cldr.lookup(loc, entry.code) for loc in NAME_LOCALES}
    english = found["en"] or CldrEntry(entry.fallback_name, ())
    caps = emoji_captions(english.name, english.keywords, entry.category, entry.subcategory, vendor)
    return {
        "key": f"{vendor}/{entry.code}",
        "image_bytes": image,
        RAW_CAPTION: caps.raw,
        SHORT_CAPTION: caps.short,
        LONG_CAPTION: caps.long,
        "split": split,
        "lang": "en",
        "labels": {
            "category": entry.category,
            "subcategory": entry.subcategory,
            "base": entry.base,
            "vendor": vendor,
        },
        "names": {loc: e.name for loc, e in found.items() if e is not None},
    }


def _jobs(entries: list[EmojiEntry], vendors: tuple[str, ...], coverage: Counter
          ) -> list[tuple[EmojiEntry, str]]:
    """The ``(entry, vendor)`` pairs ``emoji.json`` marks an image for, in row order.

    Counts the others under ``no_image_<vendor>`` in ``coverage``.
    """
    jobs = []
    for entry in entries:
        for vendor in vendors:
            if vendor in entry.vendors:
                jobs.append((entry, vendor))
            else:
                coverage[f"no_image_{vendor}"] += 1
    return jobs


def _source(vendors: tuple[str, ...], seed: int, splits: tuple[float, float, float], limit: int | None
            ) -> dict:
    """The ``source`` of ``manifest.json``: the arguments and the npm package versions read."""
    packages = ["emoji-datasource", "cldr-annotations-full", "cldr-annotations-derived-full"]
    packages += [VENDOR_PACKAGES[v] for v in vendors]
    return {
        "name": "emoji",
        "args": {"vendors": list(vendors), "seed": seed, "splits": list(splits), "limit": limit},
        "packages": {p: NPM_PACKAGES[p].version for p in packages},
    }


def build_emoji_manifest(
    out_dir: str | Path,
    vendors: tuple[str, ...] = ("google", "twitter"),
    seed: int = 0,
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1),
    limit: int | None = None,
    workers: int = 4,
) -> ManifestInfo:
    """Build the emoji manifest (rows and columns as in the module docstring) under ``out_dir``.

    Fetches the npm packages on first use (:func:`pipeline.assets.npm_package_dir`).

    Args:
        out_dir: manifest directory (created; an existing manifest there is replaced).
        vendors: subset of ``("google", "twitter")``.
        seed: split seed; the same seed gives the same split for every base emoji.
        splits: train/val/test fractions over base emoji, summing to 1.
        limit: keep only the first ``limit`` rows (in row order); ``None`` keeps all (3,786 per vendor).
        workers: threads decoding and re-encoding PNGs.

    Returns:
        The :class:`ManifestInfo` written to ``manifest.json`` (``counts`` per split, ``coverage`` stats).

    Raises:
        ValueError: bad ``vendors``/``splits``/``limit``.
        pipeline.assets.AssetError: the npm packages could not be fetched.
    """
    vendors = tuple(vendors)
    splits = tuple(float(s) for s in splits)
    _check_args(vendors, splits, limit)
    entries = load_catalogue(npm_package_dir("emoji-datasource") / "emoji.json")
    cldr = CldrNames.load(
        npm_package_dir("cldr-annotations-full") / "annotations",
        npm_package_dir("cldr-annotations-derived-full") / "annotationsDerived",
        NAME_LOCALES,
    )
    image_dirs = {v: npm_package_dir(VENDOR_PACKAGES[v]) / "img" / v / "64" for v in vendors}
    coverage: Counter = Counter({"name_fallback_emoji_json": 0})
    coverage.update({f"no_image_{v}": 0 for v in vendors} | {f"missing_image_file_{v}": 0 for v in vendors})
    jobs = _jobs(entries, vendors, coverage)[:limit]
    writer = ManifestWriter(out_dir, _source(vendors, seed, splits, limit))
    per_vendor: Counter = Counter()
    names_present: Counter = Counter()
    bases: dict[str, set[str]] = {s: set() for s in SPLITS}
    paths = [image_dirs[v] / e.image for e, v in jobs]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        images = pool.map(_read, paths)
        for (entry, vendor), image in tqdm(zip(jobs, images), total=len(jobs), desc="emoji", unit="img"):
            if image is None:
                coverage[f"missing_image_file_{vendor}"] += 1
                continue
            row = _row(entry, vendor, image, cldr, split_of(entry.base, seed, splits))
            names_present.update(row["names"].keys())
            coverage["name_fallback_emoji_json"] += "en" not in row["names"]
            bases[row["split"]].add(entry.base)
            per_vendor[vendor] += 1
            writer.add(row)
    rows = sum(per_vendor.values())
    writer.info.coverage = {
        **{k: v for k, v in sorted(coverage.items())},
        "rows_per_vendor": {v: per_vendor[v] for v in vendors},
        "bases_per_split": {s: len(bases[s]) for s in SPLITS},
        "names_per_locale": {loc: names_present[loc] for loc in NAME_LOCALES},
        "names_missing_per_locale": {loc: rows - names_present[loc] for loc in NAME_LOCALES},
    }
    info = writer.close()
    logger.info("emoji manifest: %d rows %s in %s", rows, info.counts, out_dir)
    return info


@register_options("emoji", rank=90)  # listed last: the built-in data set, after the formats' flags
def _add_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--vendors", default="google,twitter", help="comma-separated emoji vendors")
    group.add_argument("--seed", type=int, default=0, help="split hash seed")


@register_source("emoji", rank=10, inputs="none (the embedded emoji data set, SPEC §9)",
                 check_inputs=no_inputs)
def _build_from_args(args: argparse.Namespace) -> ManifestInfo:
    vendors = tuple(v.strip() for v in args.vendors.split(",") if v.strip())
    return build_emoji_manifest(args.out, vendors=vendors, seed=args.seed, limit=args.limit)
