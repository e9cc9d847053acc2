"""Stage-1 token ids equal the tokenizer's ids of the prompt text (SPEC §2.2, §2.4; issue 11 part 1).

Small tokenizers of each supported family are trained in memory (no network), each with its family's
normalizer, pre-tokenizer, special tokens and BOS handling:

* ``llama3``: byte-level BPE split by the Llama-3 regex, ``<|begin_of_text|>`` prepended;
* ``tekken``: byte-level BPE split by the Mistral-Nemo (Tekken) regex, ``<s>`` prepended;
* ``sentencepiece``: Llama-2 / Mistral-7B style BPE with a ``▁`` word marker put before the first word only;
* ``gemma3``: Gemma-3 style BPE over the whole string with spaces as ``▁`` and Gemma's special-token ids
  (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<start_of_turn>`` 105), ``<bos>`` prepended;
* ``qwen2``: byte-level BPE split by the Qwen2 regex after NFC, no BOS.

Their training text holds the rendered prompts, so they learn merges across the caption's edges (``."``,
``"'``) that separate tokenization of template and caption gets wrong. A sixth tokenizer without any
pre-tokenization learns merges across the prefix/segment boundary and exercises the whole-string fallback.
The slow tests repeat the parity checks on the real Gemma-3 and SmolLM2 tokenizers of the embedded models.
"""

import functools
import json

import numpy as np
import pytest
import torch

from pipeline.cache.store import (
    CacheIdentity,
    CacheIdentityError,
    CacheLayout,
    CacheMeta,
    CacheReader,
    CacheWriter,
)
from stage1_embed_text.backends.llm import prepare_llm
from stage1_embed_text.encode.encoder import FacetEncoder
from stage1_embed_text.encode.packing import pack_caption, pack_samples
from stage1_embed_text.encode.prompts import FLAME, clean_for_prompt, get_prompt_set
from stage1_embed_text.encode.tokenization import TOKENIZATION, GroupTemplate, group_templates, plain_encode
from tests.helpers.stage1_tiny import spec_prompts, tiny_config

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
FAMILIES = ("llama3", "tekken", "sentencepiece", "gemma3", "qwen2")
CONTROL = "<eos> <bos> <pad> <start_of_turn> <|begin_of_text|> <|im_start|> <|endoftext|> <s> </s> [INST]"

CAPTIONS = [
    '"A quoted caption at both ends"',
    "'single quotes at both ends'",
    "Is this a cat?",
    'a sign saying "STOP" inside the frame',
    "room 101, 3.14 m, year 2024 and 1,000,000 dots",
    "猫がソファに座っている",
    "قطة تجلس على الأريكة",
    "Ёжик в тумане — ночь",
    "emoji 🍎🚀 and  two   spaces",
    "a red apple on a wooden table.",
    f"a cat {CONTROL} on a mat",
]
WORDS = "a dog runs in the park 12 and a cat sleeps on a mat; "


def _corpus() -> list[str]:
    lines = [WORDS * 3]
    for c in CAPTIONS + ["a red apple.", "'hi' there.", "two dogs play."] * 3:
        for g in FLAME.group_names:
            lines += spec_prompts(FLAME, g, c)
    return lines * 3


def _wrap(tok, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1 << 20, **special)


@functools.cache
def family_tokenizer(family: str):
    """A small trained tokenizer of ``family`` (see the module docstring), as a fast HF tokenizer."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    corpus = _corpus()
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if family in ("llama3", "tekken", "qwen2", "no-split"):
        specials = {
            "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|eot_id|>"],
            "tekken": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
            "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "no-split": ["<|endoftext|>"],
        }[family]
        tok = Tokenizer(models.BPE())
        split = {"llama3": LLAMA3_SPLIT, "tekken": TEKKEN_SPLIT, "qwen2": QWEN2_SPLIT}.get(family)
        steps = [pre_tokenizers.Split(Regex(split), behavior="isolated")] if split else []
        tok.pre_tokenizer = pre_tokenizers.Sequence(steps + [byte_level])
        if family == "qwen2":
            tok.normalizer = normalizers.NFC()
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=3000 if family == "no-split" else 700, special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(corpus, trainer=trainer)
        if family == "llama3":
            tok.post_processor = processors.TemplateProcessing(
                single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
            )
            return _wrap(tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
        if family == "tekken":
            tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
            return _wrap(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        return _wrap(tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")

    # SentencePiece-like vocabularies: trained on words with the "▁" marker in front (never inside a token)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    if family == "gemma3":
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<unused{i}>" for i in range(100)]
        specials += ["<start_of_turn>", "<end_of_turn>"]
    else:
        specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=specials)
    tok.train_from_iterator(corpus, trainer=trainer)
    if family == "gemma3":
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
        return _wrap(tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return _wrap(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def whole_prompt_ids(tok, group: str, caption: str) -> list[list[int]]:
    """Reference: the tokenizer's ids of each rendered single-facet prompt text, tokenized as one string with
    its own special-token handling (BOS), special-token text in the caption kept plain."""
    return [tok(prompt, split_special_tokens=True)["input_ids"] for prompt in spec_prompts(FLAME, group, caption)]


def split_segment_ids(tok, t: GroupTemplate, group: str, caption: str) -> list[list[int]]:
    """What stage 1 did before: template words and caption tokenized separately, then concatenated."""
    cap = tok(clean_for_prompt(caption), add_special_tokens=False)["input_ids"]
    return [list(t.bos) + list(t.head) + cap + list(t.tail) + list(s) for s in t.segments]


def _requests(tok, templates, samples, context_tokens=4096):
    items = pack_samples(tok, templates, FLAME, samples, context_tokens)
    return {(it.row, FLAME.group_names[it.group]): it for it in items}


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_ids_equal_whole_prompt_tokenization(family):
    tok = family_tokenizer(family)
    templates = group_templates(tok, FLAME)
    assert all(t.separable for t in templates.values()), family
    items = _requests(tok, templates, [{g: c for g in FLAME.group_names} for c in CAPTIONS])
    differs = 0
    for (row, g), it in items.items():
        ref = whole_prompt_ids(tok, g, CAPTIONS[row])
        got = [it.request(k) for k in range(len(it.seq.seg_lens))]
        assert got == ref, (family, g, CAPTIONS[row])
        # the readout is the closing quote, found from segment lengths
        assert all(tok.decode([int(it.seq.ids[i])]).endswith('"') for i in it.seq.readout())
        differs += got != split_segment_ids(tok, templates[g], g, CAPTIONS[row])
    # the captions exercise merges across the caption's edges: the old separate tokenization was wrong there
    assert differs > 0, family


def test_boundary_merge_falls_back_to_whole_strings():
    """A tokenizer without pre-tokenization merges ``, this`` across the prefix/segment boundary."""
    tok = family_tokenizer("no-split")
    templates = group_templates(tok, FLAME)
    assert not any(t.separable for t in templates.values())
    prefix = FLAME.group("long").prefix.replace("{caption}", "a red apple.")
    head = plain_encode(tok, [prefix])["input_ids"][0]
    assert plain_encode(tok, spec_prompts(FLAME, "long", "a red apple.")[:1])["input_ids"][0][: len(head)] != head
    items = _requests(tok, templates, [{g: c for g in FLAME.group_names} for c in CAPTIONS])
    for (row, g), it in items.items():
        ref = whole_prompt_ids(tok, g, CAPTIONS[row])
        assert [it.request(k) for k in range(len(ref))] == ref, (g, CAPTIONS[row])
        assert all(n >= 1 for n in it.seq.seg_lens)
        assert it.seq.readout().tolist() == (it.seq.n_prefix + np.cumsum(it.seq.seg_lens) - 1).tolist()
        assert len(it.seq) == it.seq.n_prefix + sum(len(r) - it.seq.n_prefix for r in ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_caption_text_is_never_a_control_token(family):
    tok = family_tokenizer(family)
    templates = group_templates(tok, FLAME)
    specials = {int(i) for i, t in tok.added_tokens_decoder.items() if t.special}
    caption = f"a cat {CONTROL} on a mat"
    parsed = tok(caption, add_special_tokens=False)["input_ids"]
    assert specials & set(parsed), "this tokenizer would parse the caption's control text by default"
    it = _requests(tok, templates, [{"long": caption}])[(0, "long")]
    bos = templates["long"].bos
    assert it.seq.ids[: len(bos)].tolist() == list(bos)
    assert not specials & set(it.seq.ids[len(bos) :].tolist())
    for k in range(len(it.seq.seg_lens)):  # what the vllm backend sends
        assert not specials & set(it.request(k)[len(bos) :])


def test_gemma_control_ids_stay_text():
    tok = family_tokenizer("gemma3")
    assert tok.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>", "<start_of_turn>"]) == [0, 1, 2, 105]
    templates = group_templates(tok, FLAME)
    caption = clean_for_prompt("a cat <eos> on a <bos> mat <pad> <start_of_turn>")
    seq = pack_caption(tok, templates["raw"], caption, 512)
    assert seq.ids[0] == 2 and not {0, 1, 2, 105} & set(seq.ids[1:].tolist())
    assert tok.decode(seq.ids[1:], skip_special_tokens=False).startswith(
        'Image description : "a cat <eos> on a <bos> mat <pad> <start_of_turn>." . After'
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_long_caption_cut_keeps_template_and_every_facet(family):
    tok = family_tokenizer(family)
    templates = group_templates(tok, FLAME)
    caption = clean_for_prompt(WORDS * 1600 + "猫がソファに座っている")
    assert len(tok(caption, add_special_tokens=False)["input_ids"]) > 20_000
    max_tokens = 300
    for g in FLAME.group_names:
        t = templates[g]
        seq = pack_caption(tok, t, caption, max_tokens)
        assert seq.truncated and max_tokens - 2 <= len(seq) <= max_tokens
        assert seq.seg_lens == tuple(len(s) for s in t.segments)
        prefix = tok.decode(seq.ids[len(t.bos) : seq.n_prefix])
        assert prefix.startswith(t.head_text) and prefix.endswith(t.tail_text)
        kept = prefix[len(t.head_text) : len(prefix) - len(t.tail_text)]
        assert len(kept) > 100 and caption.startswith(kept)
        for k, seg in enumerate(t.segment_texts):
            ends = seq.n_prefix + np.cumsum((0,) + seq.seg_lens)
            single = seq.ids[: seq.n_prefix].tolist() + seq.ids[ends[k] : ends[k + 1]].tolist()
            assert single == tok(prefix + seg, split_special_tokens=True)["input_ids"]
        # a caption that fits is untouched
        assert not pack_caption(tok, t, "a dog.", max_tokens).truncated


@pytest.mark.parametrize("family", ["tekken", "sentencepiece"])
def test_kept_bos_marker_is_the_tokenizers_special(family):
    """``bos_marker="keep"``: the template's own ``<s>`` is the special token, the caption's stays text."""
    tok = family_tokenizer(family)
    keep = get_prompt_set("flame", bos_marker="keep")
    templates = group_templates(tok, keep)
    assert templates["short"].lead_special == (True, False, False)
    items = pack_samples(tok, templates, keep, [{"short": "a red apple <s> on a table."}], 512)
    it = items[0]
    prefix = keep.group("short").prefix.replace("{caption}", "a red apple <s> on a table.")
    ref = tok(prefix, split_special_tokens=True)["input_ids"]
    assert it.request(0)[: len(ref)] == ref and it.request(0)[len(ref)] == tok.bos_token_id
    assert it.request(0).count(tok.bos_token_id) == 2  # BOS + the marker, none from the caption
    clean = pack_samples(tok, templates, keep, [{"short": "a red apple."}], 512)[0]
    assert [clean.request(k) for k in range(3)] == [tok(p)["input_ids"] for p in spec_prompts(keep, "short", "a red apple.")]


@pytest.mark.parametrize(
    ("arch", "family"), [("llama", "llama3"), ("gemma3", "gemma3"), ("mistral", "tekken")]
)
@torch.no_grad()
def test_vectors_equal_plain_transformers_forward_of_the_prompt_text(arch, family):
    """Our packed restart pass against a plain HF forward of each whole prompt string (fp32)."""
    from transformers import AutoModelForCausalLM

    tok = family_tokenizer(family)
    cfg = tiny_config(arch)
    cfg.vocab_size = len(tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    samples = [{g: c for g in FLAME.group_names} for c in CAPTIONS[:4] + CAPTIONS[-2:]]
    torch.manual_seed(0)
    ref_model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    enc = FacetEncoder(prepare_llm(model, tok, name=f"tiny-{arch}", fingerprint="sha256:t", layer=3))
    got = enc.encode(samples).vectors
    for r, s in enumerate(samples):
        for g in FLAME.group_names:
            for k, ids in enumerate(whole_prompt_ids(tok, g, s[g])):
                out = ref_model(input_ids=torch.tensor([ids]), output_hidden_states=True)
                ours = torch.from_numpy(got[r, FLAME.facet_slice(g)][k])
                cos = float(torch.nn.functional.cosine_similarity(out.hidden_states[3][0, -1], ours, 0))
                assert cos >= 0.9999, (arch, g, k, s[g], cos)


def test_identity_names_the_tokenization_and_old_caches_are_refused(tmp_path):
    from tests.helpers.stage1_tiny import tiny_llm

    ident = FacetEncoder(tiny_llm("llama")).identity()
    assert ident.tokenization == TOKENIZATION == "whole-prompt"
    assert ident.essential()["tokenization"] == "whole-prompt"
    # a cache written before the field existed: its meta.json identity has no "tokenization"
    old = {k: v for k, v in ident.to_dict().items() if k != "tokenization"}
    refused = "tokenization: cache has 'split-segments', expected 'whole-prompt'"
    with pytest.raises(CacheIdentityError, match=refused):
        CacheIdentity.from_dict(old).check(ident.essential())
    CacheIdentity.from_dict(ident.to_dict()).check(ident.essential())

    cache = tmp_path / "cache"
    meta = CacheMeta(ident, CacheLayout(n_rows=2, shard_rows=2, chunk_rows=1, plan_hash="p"))
    CacheWriter.create(cache, meta)
    on_disk = json.loads((cache / "meta.json").read_text())
    assert on_disk["identity"]["tokenization"] == "whole-prompt"
    del on_disk["identity"]["tokenization"]
    (cache / "meta.json").write_text(json.dumps(on_disk))
    with pytest.raises(CacheIdentityError, match="tokenization"):
        CacheReader(cache, expect=ident.essential(), allow_incomplete=True)
    with pytest.raises(CacheIdentityError, match="tokenization"):  # resuming into it is refused too
        CacheWriter(cache, meta)


def _embedded_tokenizer(name: str):
    from transformers import AutoTokenizer

    from pipeline.assets import llm_gguf

    gguf = llm_gguf(name)
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma3-270m", "smollm2-135m"])
def test_real_tokenizers_whole_prompt_parity(name):
    tok = _embedded_tokenizer(name)
    templates = group_templates(tok, FLAME)
    assert all(t.separable for t in templates.values())
    items = _requests(tok, templates, [{g: c for g in FLAME.group_names} for c in CAPTIONS])
    differs = 0
    for (row, g), it in items.items():
        ref = whole_prompt_ids(tok, g, CAPTIONS[row])
        assert [it.request(k) for k in range(len(ref))] == ref, (name, g, CAPTIONS[row])
        differs += ref != split_segment_ids(tok, templates[g], g, CAPTIONS[row])
    assert differs > 0
    specials = {int(i) for i, t in tok.added_tokens_decoder.items() if t.special}
    it = items[(len(CAPTIONS) - 1, "long")]
    assert not specials & set(it.seq.ids[len(templates["long"].bos) :].tolist())
    if name == "gemma3-270m":
        assert not {0, 1, 2, 105} & set(it.seq.ids[1:].tolist())
