"""Prompt sets and caption clean-up: exact SPEC §2.1/§2.2 text, facet order, content hash."""

import pytest

from stage1_embed_text.prompts import FLAME, SINGLE, clean_caption, get_prompt_set

SPEC_RAW = (
    'Image description : "{caption}" . After thinking step by step , this image description means in just one word:"'
)
SPEC_QUESTIONS = [
    "this image description",
    "the category of the main object in this image",
    "the prominent characteristic or pattern of the main object in this image",
    "the category of the minor object in this image",
    "the prominent characteristic or pattern of the minor object in this image",
    "the primary action or event taking place in this image",
    "the overall atmosphere or emotion of this image",
]
SPEC_SHORT_PREFIX = 'Image description : "{caption}" . After thinking step by step ,'
SPEC_LONG_PREFIX = 'Detailed Image description : "{caption}" . After thinking step by step ,'
FACETS = (
    "raw", "short.description", "short.main_category", "short.main_attribute", "long.description",
    "long.main_category", "long.main_attribute", "long.minor_category", "long.minor_attribute", "long.action",
    "long.atmosphere",
)
FLAME_HASH = "sha256:35349c672c64762171b375b9be32f53b80be8b9fd9b7d59ea2e6ae4f37e0d474"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  a dog on a sofa  ", "a dog on a sofa."),
        ("a dog.", "a dog."),
        ("Is it a cat?", "Is it a cat."),
        ("why??", "why?."),
        ("a?b", "a?b."),
        ('He said "hi"', "He said 'hi'"),
        ('the word:"apple" here', "the word:'apple' here."),
        ("it's 'x'", "it's 'x'"),
        ("🍎", "🍎."),
        ("猫が寝ている", "猫が寝ている."),
        ("tab\t\n", "tab."),
    ],
)
def test_clean_caption_exact(text, expected):
    assert clean_caption(text) == expected


@pytest.mark.parametrize("text", [None, "", "   ", "\n\t "])
def test_blank_caption_is_absent(text):
    assert clean_caption(text) is None
    assert FLAME.render("long", text) is None


def test_raw_prompt_is_spec_text():
    prefix, segments = FLAME.render("raw", "A red apple?")
    assert len(segments) == 1
    assert prefix + segments[0] == SPEC_RAW.replace("{caption}", "A red apple.")


@pytest.mark.parametrize(("group", "prefix", "n"), [("short", SPEC_SHORT_PREFIX, 3), ("long", SPEC_LONG_PREFIX, 7)])
def test_facet_prompts_are_spec_text(group, prefix, n):
    got_prefix, segments = FLAME.render(group, "x")
    assert got_prefix == prefix.replace("{caption}", "x.")
    assert list(segments) == [" " + q + ' means in just one word:"' for q in SPEC_QUESTIONS[:n]]


def test_facet_names_and_slices():
    assert FLAME.facets == FACETS
    assert FLAME.facet_slice("raw") == slice(0, 1)
    assert FLAME.facet_slice("short") == slice(1, 4)
    assert FLAME.facet_slice("long") == slice(4, 11)
    assert SINGLE.facets == ("raw",)
    assert SINGLE.group_names == ("raw",)
    with pytest.raises(KeyError, match="groups"):
        SINGLE.facet_slice("long")


def test_content_hash_golden_and_sensitive():
    assert FLAME.content_hash == FLAME_HASH
    assert get_prompt_set("flame") is FLAME
    kept = get_prompt_set("flame", bos_marker="keep")
    assert kept.content_hash != FLAME_HASH
    assert kept.segments("long")[0] == "<s> this image description means in just one word:\""
    assert kept.segments("long")[1] == FLAME.segments("long")[1]
    assert SINGLE.content_hash != FLAME_HASH


def test_unknown_names_raise():
    with pytest.raises(KeyError, match="known"):
        get_prompt_set("nope")
    with pytest.raises(ValueError, match="bos_marker"):
        get_prompt_set("flame", bos_marker="bos")


def test_default_readout_is_the_measured_choice_of_embedded_llms():
    from stage1_embed_text.job import EmbedConfig
    from stage1_embed_text.llm import default_readout

    assert default_readout("gemma3-270m") == "post_norm"
    assert default_readout("smollm2-135m") == "pre_norm"
    assert default_readout("mistralai/Mistral-Nemo-Base-2407") == "pre_norm"
    assert EmbedConfig(manifest="m", out="c").readout == "post_norm"
    assert EmbedConfig(manifest="m", out="c", llm="/models/x", readout=None).readout == "pre_norm"
    assert EmbedConfig(manifest="m", out="c", readout="pre_norm").readout == "pre_norm"
