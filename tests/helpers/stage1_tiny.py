"""Tiny, randomly initialised stage-1 models and an offline tokenizer, for fast CPU tests.

Shared by the stage-1 tests (encoder, batch job, bench smoke tests). Nothing here touches the network:
the tokenizer is a byte-level BPE trained in memory on the FLAME template words, so it encodes any
Unicode text (emoji, Arabic, Japanese) and prepends ``<s>`` like Llama/Gemma tokenizers do.

    llm = tiny_llm("gemma3")              # LoadedLLM, fp32, penultimate layer
    enc = FacetEncoder(llm)               # 11 facets, D = 64
"""

from __future__ import annotations

import functools

import torch

from stage1_embed_text.backends.llm import LoadedLLM, prepare_llm
from stage1_embed_text.encode.prompts import FLAME, QUESTIONS, PromptSet, clean_for_prompt

ARCHS = ("llama", "mistral", "gemma3")
HIDDEN = 64
LAYERS = 4
WINDOW = 24  # sliding window of the Mistral/Gemma-3 tiny models: shorter than most packed sequences

_CORPUS = [
    "a red apple on a wooden table.",
    "a green apple and a rocket launch at night.",
    "two dogs play in the park, the sky is blue and the grass is green.",
    "a smiling face with heart eyes, an emoji drawn in a flat style.",
    "cat, dog, face, hand, flag, food, animal, nature, travel, place, object, symbol, activity.",
] + [FLAME.group(g).prefix for g in ("short", "long")] + [" " + q + ' means in just one word:"' for _, q in QUESTIONS]


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A ``PreTrainedTokenizerFast``: byte-level BPE (vocab 512) with ``<pad>``=0, ``<s>``=1 (prepended), ``</s>``=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=1 << 20
    )


def tiny_config(arch: str):
    """Config of a tiny ``arch`` model (4 blocks, hidden 64, 4 heads, 2 KV heads; windows of 24 tokens)."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig

    vocab = len(tiny_tokenizer())
    common = dict(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=WINDOW)
    if arch == "gemma3":
        return Gemma3TextConfig(
            **common, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        )
    raise ValueError(f"unknown tiny arch {arch!r}; known: {ARCHS}")


def tiny_causal_lm(arch: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A randomly initialised ``*ForCausalLM`` (same ``seed`` -> same weights), eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation=attn)
    return model.to(dtype).eval()


def tiny_llm(
    arch: str, layer: int | None = None, attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0
) -> LoadedLLM:
    """:func:`tiny_causal_lm` wrapped as a stage-1 :class:`LoadedLLM` (default layer: the penultimate, 3)."""
    model = tiny_causal_lm(arch, attn, dtype, seed)
    return prepare_llm(model, tiny_tokenizer(), name=f"tiny-{arch}", fingerprint=f"sha256:tiny-{arch}-{seed}", layer=layer)


def spec_prompts(prompt_set: PromptSet, group: str, caption: str | None) -> list[str] | None:
    """Reference for tests: the single-facet prompt texts of ``caption`` written out from the prompt definition
    (SPEC §2.1 clean-up, ``{caption}`` filled in, each facet segment appended), ``None`` if the caption is absent.
    Independent of the packing code, which must feed the LLM exactly the tokens of these texts."""
    cleaned = clean_for_prompt(caption)
    if cleaned is None:
        return None
    prefix = prompt_set.group(group).prefix.replace("{caption}", cleaned)
    return [prefix + s for s in prompt_set.segments(group)]
