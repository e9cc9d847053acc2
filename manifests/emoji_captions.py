"""Templated captions for the emoji dataset (SPEC §9): deterministic text built from metadata, not a VLM.

The three caption columns are filled from Unicode CLDR (English name and keywords) and ``emoji.json``
(category and subcategory) plus the vendor's drawing style. They are *templated recaptions*: they stand in
for FLAME's raw alt-text / short / long VLM recaptions so the whole pipeline runs offline, but they carry
only what the metadata says, never anything seen in the image. Templates (``{name}`` = the CLDR English
name, ``{category}``/``{subcategory}`` = lower-cased, ``&`` -> ``and``, ``-`` -> space)::

    raw   {name}
    short An emoji showing {name}, from the {category} category.
    long  An emoji from {vendor set} showing {name}. It belongs to the {category} category, in the
          {subcategory} group. Related words: {keywords}. It is drawn with {vendor style}. The image is a
          small 64 by 64 pixel icon on a white background.

``{vendor set}``/``{vendor style}`` are in :data:`VENDOR_STYLES` (Google Noto vs Twitter Twemoji).

``{keywords}`` are the CLDR English keywords in CLDR order, without the ones equal to the name; the
"Related words" sentence is left out when none remain.
"""

from __future__ import annotations

from dataclasses import dataclass

VENDOR_STYLES = {
    "google": ("Google's Noto Color Emoji set", "rounded shapes, bright colours and subtle shading"),
    "twitter": ("Twitter's Twemoji set", "simple flat shapes and bold colours"),
}


@dataclass(frozen=True)
class EmojiCaptions:
    """The three caption texts of one (vendor, emoji) sample."""

    raw: str
    short: str
    long: str


def _phrase(label: str) -> str:
    return label.lower().replace("&", "and").replace("-", " ")


def emoji_captions(
    name: str, keywords: tuple[str, ...], category: str, subcategory: str, vendor: str
) -> EmojiCaptions:
    """Build raw/short/long captions from the templates in the module docstring.

    Args:
        name: English emoji name, e.g. ``"waving hand: light skin tone"``.
        keywords: English keywords, e.g. ``("bye", "hand", "wave")``.
        category: ``emoji.json`` category, e.g. ``"People & Body"``.
        subcategory: ``emoji.json`` subcategory, e.g. ``"hand-fingers-open"``.
        vendor: a key of :data:`VENDOR_STYLES`.

    Raises:
        KeyError: unknown vendor.
    """
    vendor_set, vendor_style = VENDOR_STYLES[vendor]
    category_phrase = _phrase(category)
    words = [k for k in keywords if k.lower() != name.lower()]
    sentences = [
        f"An emoji from {vendor_set} showing {name}.",
        f"It belongs to the {category_phrase} category, in the {_phrase(subcategory)} group.",
    ]
    if words:
        sentences.append(f"Related words: {', '.join(words)}.")
    sentences += [
        f"It is drawn with {vendor_style}.",
        "The image is a small 64 by 64 pixel icon on a white background.",
    ]
    return EmojiCaptions(
        raw=name,
        short=f"An emoji showing {name}, from the {category_phrase} category.",
        long=" ".join(sentences),
    )
