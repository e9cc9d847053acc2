"""Stage-1 encoder (SPEC §2.3, §2.4) on tiny random Llama/Mistral/Gemma-3 models, plus one slow real-model test."""

import numpy as np
import pytest
import torch

from pipeline.cache.store import CacheIdentity, CacheIdentityError
from stage1_embed_text.api import TextEmbedder
from stage1_embed_text.backends.llm import load_llm
from stage1_embed_text.config import EmbedConfigError
from stage1_embed_text.encode.batching import collate, facet_mask, plan_batches
from stage1_embed_text.encode.encoder import FacetEncoder
from stage1_embed_text.encode.packing import pack_caption
from stage1_embed_text.encode.prompts import FLAME, SINGLE, clean_for_prompt
from tests.helpers.stage1_tiny import (
    ARCHS,
    WINDOW,
    spec_prompts,
    tiny_causal_lm,
    tiny_config,
    tiny_llm,
    tiny_tokenizer,
)

SAMPLE = {
    "raw": "a red apple",
    "short": "a green apple on a wooden table",
    "long": "two dogs play in the park, the sky is blue and the grass is green. " * 3,
}
LONGER = {
    "raw": "a rocket launch at night over the sea with a crowd watching from the beach " * 4,
    "short": "a smiling face with heart eyes, drawn in a flat style " * 6,
    "long": "cat, dog, face, hand, flag, food, animal, nature, travel, place, object, symbol " * 8,
}


@torch.no_grad()
def reference_vectors(arch: str, sample: dict, layer: int, attn: str = "sdpa", readout: str = "pre_norm") -> np.ndarray:
    """Each facet's prompt text ``prefix + segment_i`` tokenized as one string by the tokenizer (BOS included,
    caption special-token text plain) and run alone through the untruncated HF model: ``hidden_states[layer]``
    at its last token."""
    model = tiny_causal_lm(arch, attn)
    tok = tiny_tokenizer()
    out = np.zeros((len(FLAME.facets), model.config.hidden_size), np.float32)
    for g in FLAME.group_names:
        for i, prompt in enumerate(spec_prompts(FLAME, g, sample[g])):
            ids = tok(prompt, split_special_tokens=True, return_tensors="pt")["input_ids"]
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            h = hs[layer][0, -1]
            if readout == "post_norm":
                h = model.model.norm(h)
            out[FLAME.facet_slice(g).start + i] = (h / h.norm()).numpy()
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_restart_equals_separate_passes(arch, attn):
    enc = FacetEncoder(tiny_llm(arch, attn=attn))
    got = enc.encode([SAMPLE])
    ref = reference_vectors(arch, SAMPLE, layer=3, attn=attn)
    assert got.mask.all()
    np.testing.assert_allclose(got.vectors[0], ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got.vectors[0], axis=-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_post_norm_and_other_layer_equal_reference(arch):
    enc = FacetEncoder(tiny_llm(arch, layer=2), readout="post_norm")
    ref = reference_vectors(arch, SAMPLE, layer=2, readout="post_norm")
    np.testing.assert_allclose(enc.encode([SAMPLE]).vectors[0], ref, atol=1e-5, rtol=0)


def test_sliding_window_matters_for_the_reference():
    """The tiny Mistral's window (24) changes HF's own output on long inputs, so the parity test above covers it."""
    ids = torch.tensor([tiny_tokenizer()(LONGER["long"])["input_ids"][:80]])
    windowed = tiny_causal_lm("mistral")
    cfg = tiny_config("mistral")
    cfg.sliding_window = None
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_config(cfg)
    full.load_state_dict(windowed.state_dict())
    with torch.no_grad():
        a = windowed(input_ids=ids, output_hidden_states=True).hidden_states[3][0, -1]
        b = full.eval()(input_ids=ids, output_hidden_states=True).hidden_states[3][0, -1]
    assert ids.shape[1] > WINDOW
    assert (a - b).abs().max() > 1e-3


def test_continuous_positions_change_only_later_facets():
    restart = FacetEncoder(tiny_llm("llama")).encode([SAMPLE]).vectors[0]
    cont = FacetEncoder(tiny_llm("llama"), position_mode="continuous").encode([SAMPLE]).vectors[0]
    first = [FLAME.facet_slice(g).start for g in FLAME.group_names]
    later = [i for i in range(len(FLAME.facets)) if i not in first]
    np.testing.assert_allclose(cont[first], restart[first], atol=1e-5, rtol=0)
    assert np.abs(cont[later] - restart[later]).max(axis=-1).min() > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_vectors_do_not_depend_on_batch_neighbours_or_padding(arch):
    llm = tiny_llm(arch)
    alone = FacetEncoder(llm).encode([SAMPLE]).vectors[0]
    for side in ("right", "left"):
        # a tiny budget forces several batches, a big one puts the short caption beside much longer ones
        for budget in (8192, 100_000):
            enc = FacetEncoder(llm, max_batch_tokens=budget, padding_side=side)
            mixed = enc.encode([LONGER, SAMPLE, LONGER])
            np.testing.assert_allclose(mixed.vectors[1], alone, atol=1e-5, rtol=0)


def test_an_unknown_padding_side_is_refused_when_the_encoder_is_built():
    with pytest.raises(EmbedConfigError, match=r"^padding_side must be one of \('right', 'left'\), got 'top'$"):
        FacetEncoder(tiny_llm("llama"), padding_side="top")


def test_bf16_batch_invariance_cosine():
    llm = tiny_llm("gemma3", dtype=torch.bfloat16)
    alone = FacetEncoder(llm).encode([SAMPLE]).vectors[0]
    for side in ("right", "left"):
        mixed = FacetEncoder(llm, padding_side=side).encode([LONGER, SAMPLE]).vectors[1]
        assert (mixed * alone).sum(-1).min() >= 0.999


def _readout_tokens(enc: FacetEncoder, group: str, caption: str, context_tokens: int):
    tok = enc.llm.tokenizer
    seq = pack_caption(tok, enc.templates[group], clean_for_prompt(caption), context_tokens)
    return seq, [tok.decode([int(seq.ids[i])]) for i in seq.readout()]


def test_readout_is_closing_quote_and_long_captions_are_cut():
    enc = FacetEncoder(tiny_llm("gemma3"), context_tokens=160)
    for g in FLAME.group_names:
        for caption in (SAMPLE[g], LONGER["long"] * 3):
            seq, readouts = _readout_tokens(enc, g, caption, enc.context_tokens)
            assert len(readouts) == len(FLAME.segments(g))
            assert all(r.endswith('"') for r in readouts), readouts
            assert len(seq) <= enc.context_tokens
    seq, _ = _readout_tokens(enc, "long", LONGER["long"] * 3, enc.context_tokens)
    t = enc.templates["long"]
    assert seq.truncated and len(seq) == enc.context_tokens
    np.testing.assert_array_equal(seq.ids[-sum(seq.seg_lens):], np.concatenate(t.segments))
    assert seq.seg_lens == tuple(len(s) for s in t.segments)
    # the prefix ends in the template words after the caption: the cut caption text + tail, tokenized as one
    prefix = enc.llm.tokenizer.decode(seq.ids[: seq.n_prefix], skip_special_tokens=True)
    assert prefix.endswith(t.tail_text) and prefix.startswith(t.head_text)
    assert (LONGER["long"] * 3).startswith(prefix[len(t.head_text) : -len(t.tail_text)])
    out = enc.encode([{"raw": "a cat", "long": LONGER["long"] * 3}])
    assert out.truncated.tolist() == [[False, False, True]]
    assert out.tokens[0, 2] == 160 and out.mask[0, FLAME.facet_slice("long")].all()


def test_special_captions_behave_as_documented():
    enc = FacetEncoder(tiny_llm("gemma3"), context_tokens=256)
    tok = enc.llm.tokenizer
    samples = [
        {"raw": 'she said "hello" to the word:"apple"', "short": "🍎🚀🎉", "long": "قطة تجلس على الأريكة. 猫がソファに座っている。"},
        {"raw": "she said 'hello' to the word:'apple'", "short": "", "long": None},
        {"raw": "   ", "short": "\n"},
        {"raw": "dog " * 20_000},
    ]
    out = enc.encode(samples)
    # quotes inside captions become ' (SPEC §2.1): no caption token can contain the closing quote
    t = enc.templates["raw"]
    seq = pack_caption(tok, t, clean_for_prompt(samples[0]["raw"]), 256)
    cap_ids = seq.ids[len(t.bos) + len(t.head) : seq.n_prefix - len(t.tail)]
    assert tok.decode(cap_ids) == "she said 'hello' to the word:'apple'"
    assert not any('"' in tok.decode([i]) for i in cap_ids)
    np.testing.assert_allclose(out.vectors[0, 0], out.vectors[1, 0], atol=1e-6)
    # emoji-only and Arabic/Japanese captions: present, finite, unit vectors
    assert out.mask[0].all()
    np.testing.assert_allclose(np.linalg.norm(out.vectors[0], axis=-1), 1.0, atol=1e-5)
    # blank or missing captions: the group is absent (mask False, zero vectors, 0 tokens)
    assert out.mask[1].tolist() == [True] + [False] * 10
    assert not out.mask[2].any() and not out.vectors[2].any() and out.tokens[2].tolist() == [0, 0, 0]
    # a 20k-token caption is cut to context_tokens, every facet kept, flagged
    assert out.tokens[3].tolist() == [256, 0, 0] and out.truncated[3].tolist() == [True, False, False]
    assert out.mask[3, 0] and abs(np.linalg.norm(out.vectors[3, 0]) - 1) < 1e-5


def test_progress_and_identity():
    llm = tiny_llm("llama")
    enc = FacetEncoder(llm, max_batch_tokens=256)
    calls = []
    out = enc.encode([SAMPLE, LONGER, {"raw": "x"}], progress=lambda s, t: calls.append((s, t)))
    assert len(calls) > 1 and calls[-1] == (7, int(out.tokens.sum()))
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(calls, calls[1:]))
    ident = enc.identity()
    assert isinstance(ident, CacheIdentity)
    assert ident.to_dict() == {
        "llm": "tiny-llama", "llm_fingerprint": "sha256:tiny-llama-0", "tokenizer": "tiny-llama", "layer": 3,
        "readout": "pre_norm", "dim": 64, "prompt_set": "flame", "prompt_set_hash": FLAME.content_hash,
        "facets": list(FLAME.facets), "position_mode": "restart", "bos_marker": "drop", "max_tokens": 512,
        "dtype_compute": "float32", "dtype_stored": "float16", "backend": "hf", "tokenization": "whole-prompt",
    }
    assert enc.facets == FLAME.facets and enc.dim == 64


def test_plan_batches_respects_budget():
    lengths = [5, 50, 7, 49, 100, 3, 3, 60]
    batches = plan_batches(lengths, 120)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [4]  # 100 + 60 padded to 2 x 100 > 120
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 120
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    # order by length: 100, 60, 50, 49, 7, 5, 3, 3 -> at most 3 sequences per batch on top of the budget
    assert plan_batches(lengths, 10_000, max_batch_sequences=3) == [[4, 7, 1], [3, 2, 0], [5, 6]]


def test_mask_hides_other_facets_and_padding():
    enc = FacetEncoder(tiny_llm("llama"))
    t = enc.templates["short"]
    a = pack_caption(enc.llm.tokenizer, t, "a cat", 512)
    b = pack_caption(enc.llm.tokenizer, t, "a cat sitting on a red mat in the sun", 512)
    assert len(b) > len(a)
    batch = collate([a, b], pad_id=0)
    m = facet_mask(batch.segments, batch.position_ids, torch.float32)[:, 0] == 0
    seg = batch.segments[0]
    q = int(a.readout()[1])  # facet 2's closing quote in the shorter row
    assert m[0, q][seg == 0].all() and m[0, q][seg == 2][: int((seg[: q + 1] == 2).sum())].all()
    assert not m[0, q][(seg == 1) | (seg == 3) | (seg == -1)].any()
    pads = (seg == -1).nonzero().flatten()
    assert len(pads) == len(b) - len(a)
    assert not m[0][seg != -1][:, pads].any()  # real tokens never see padding keys
    expected = torch.zeros(len(pads), len(seg), dtype=torch.bool)
    expected[torch.arange(len(pads)), pads] = True
    assert m[0][pads].equal(expected)  # a padding query sees only itself (keeps it finite)


def test_text_embedder_modes():
    enc = FacetEncoder(tiny_llm("gemma3"))
    emb = TextEmbedder(enc)
    texts = ["a red apple", "a rocket launch"]
    full = enc.encode([{"raw": t, "long": t} for t in texts]).vectors
    np.testing.assert_allclose(emb.embed(texts, "single"), full[:, 0], atol=1e-6)
    mean = full[:, FLAME.facet_slice("long")].mean(1)
    np.testing.assert_allclose(emb.embed(texts, "multi"), mean / np.linalg.norm(mean, axis=-1, keepdims=True), atol=1e-6)
    with pytest.raises(ValueError, match="blank"):
        emb.embed(["ok", " "])
    with pytest.raises(ValueError, match="long"):
        TextEmbedder(FacetEncoder(tiny_llm("gemma3"), prompt_set=SINGLE)).embed(texts, "multi")


def test_from_identity_refuses_changed_prompt_set():
    ident = FacetEncoder(tiny_llm("llama")).identity().to_dict() | {"prompt_set_hash": "sha256:old"}
    with pytest.raises(CacheIdentityError, match="sha256:old"):
        TextEmbedder.from_identity(ident)


def test_load_llm_from_folder_truncates_and_fingerprints(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAME_HOME", str(tmp_path / "home"))
    tiny_causal_lm("gemma3").save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    llm = load_llm(str(tmp_path / "m"), dtype="float32", layer=2)
    assert (llm.layer, llm.num_layers, len(llm.model.layers), llm.hidden_size) == (2, 4, 2, 64)
    assert not hasattr(llm.model, "lm_head") and isinstance(llm.model.norm, torch.nn.Identity)
    assert llm.layer_types == ("sliding_attention", "full_attention") and llm.sliding_window == WINDOW
    assert load_llm(str(tmp_path / "m"), dtype="bfloat16").fingerprint == llm.fingerprint
    assert llm.fingerprint.startswith("sha256:") and len(llm.fingerprint) == 71
    assert llm.name == str((tmp_path / "m").resolve())
    ref = reference_vectors("gemma3", SAMPLE, layer=2)
    np.testing.assert_allclose(FacetEncoder(llm).encode([SAMPLE]).vectors[0], ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="layer"):
        load_llm(str(tmp_path / "m"), dtype="float32", layer=5)


@pytest.mark.slow
def test_real_gemma3_270m():
    llm = load_llm("gemma3-270m")
    assert (llm.num_layers, llm.layer, llm.hidden_size) == (18, 17, 640)
    enc = FacetEncoder(llm)
    out = enc.encode([{"raw": t, "short": t, "long": t} for t in ("a red apple", "a green apple", "a rocket launch")])
    assert out.vectors.shape == (3, 11, 640) and out.mask.all()
    np.testing.assert_allclose(np.linalg.norm(out.vectors, axis=-1), 1.0, atol=1e-5)
    for f in range(11):
        v = out.vectors[:, f]
        assert v[0] @ v[1] > v[0] @ v[2], FLAME.facets[f]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are fastest single-threaded (and the CI CPUs are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
