"""Prompt sets and caption clean-up: exact SPEC §2.1/§2.2 text, facet order, content hash.

The prompt texts are checked on the real path: the token ids :func:`stage1_embed_text.encode.packing.pack_samples`
feeds the LLM for each facet (what both backends run), decoded with the tiny byte-level tokenizer, which
decodes to the exact text it encoded.
"""

import dataclasses

import pytest

from pipeline.assets import DEFAULT_LLM, EMBEDDED_LLMS, default_readout
from stage1_embed_text.config import EmbedConfig, EmbedConfigError
from stage1_embed_text.encode.packing import pack_samples
from stage1_embed_text.encode.prompts import (
    FLAME,
    SINGLE,
    PromptSet,
    clean_for_prompt,
    get_prompt_set,
    prompt_captions,
)
from stage1_embed_text.encode.tokenization import group_templates
from tests.helpers.stage1_tiny import tiny_tokenizer

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
    assert clean_for_prompt(text) == expected
    assert clean_for_prompt(expected) == expected  # idempotent: the plan and the encoder may both clean


@pytest.mark.parametrize("text", [None, "", "   ", "\n\t "])
def test_blank_caption_is_absent(text):
    assert clean_for_prompt(text) is None
    tok = tiny_tokenizer()
    assert pack_samples(tok, group_templates(tok, FLAME), FLAME, [{"long": text, "raw": text}], 512) == []


def test_prompt_captions_cleans_the_prompt_sets_groups_only():
    """The one rule the planner's digests and the packed prompts share: each group of the set, cleaned, ``None``
    where absent (missing key, ``None``, blank); groups outside the set are not read."""
    samples = [{"raw": ' a "b" ', "short": "   ", "long": "c?"}, {"long": "d"}]
    assert prompt_captions(FLAME, samples) == {"raw": ["a 'b'", None], "short": [None, None], "long": ["c.", "d."]}
    assert prompt_captions(SINGLE, samples) == {"raw": ["a 'b'", None]}
    assert prompt_captions(FLAME, []) == {"raw": [], "short": [], "long": []}


def fed_prompts(group: str, caption: str) -> list[str]:
    """The text of each facet prompt the LLM is fed for ``caption`` in ``group`` (BOS dropped)."""
    tok = tiny_tokenizer()
    (item,) = pack_samples(tok, group_templates(tok, FLAME), FLAME, [{group: caption}], 512)
    return [
        tok.decode(item.request(k), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        for k in range(len(item.seq.seg_lens))
    ]


def test_raw_prompt_is_spec_text():
    assert fed_prompts("raw", "A red apple?") == [SPEC_RAW.replace("{caption}", "A red apple.")]


@pytest.mark.parametrize(("group", "prefix", "n"), [("short", SPEC_SHORT_PREFIX, 3), ("long", SPEC_LONG_PREFIX, 7)])
def test_facet_prompts_are_spec_text(group, prefix, n):
    assert fed_prompts(group, " x ") == [
        prefix.replace("{caption}", "x.") + " " + q + ' means in just one word:"' for q in SPEC_QUESTIONS[:n]
    ]


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
    with pytest.raises(EmbedConfigError, match=r"^unknown prompt set 'nope'; known: \['flame', 'single'\]$"):
        get_prompt_set("nope")
    with pytest.raises(EmbedConfigError, match=r"^unknown prompt groups \['medium'\]"):
        PromptSet("mine", 1, (dataclasses.replace(FLAME.groups[0], name="medium"),))
    with pytest.raises(ValueError, match="bos_marker"):
        get_prompt_set("flame", bos_marker="bos")


def test_default_readout_is_the_measured_choice_of_embedded_llms():
    assert default_readout("gemma3-270m") == "post_norm"
    assert default_readout("smollm2-135m") == "pre_norm"
    assert default_readout("mistralai/Mistral-Nemo-Base-2407") == "pre_norm"
    assert EmbedConfig(manifest="m", out="c").readout == "post_norm"
    assert EmbedConfig(manifest="m", out="c", llm="/models/x", readout=None).readout == "pre_norm"
    assert EmbedConfig(manifest="m", out="c", readout="pre_norm").readout == "pre_norm"


def test_embedded_llm_list_and_default_have_one_owner():
    """pipeline.assets owns the embedded LLMs and the default; stage 1 reads them from there."""
    import stage1_embed_text.backends.llm as llm

    assert EmbedConfig(manifest="m", out="c").llm == DEFAULT_LLM and DEFAULT_LLM in EMBEDDED_LLMS
    assert not hasattr(llm, "EMBEDDED")  # no second list
