"""The ``vllm`` stage-1 backend against the ``hf`` reference (SPEC §2.5, issue 7).

Two kinds of tests:

* no vLLM needed (run everywhere): the truncated checkpoint loads in transformers, its ``final_norm`` output
  divided by the norm scale points exactly along the full model's ``hidden_states[L]`` (Llama ``w`` and
  Gemma ``1 + w``), and the facet requests are the packed ``hf`` sequences cut into ``prefix + facet_i``;
* vLLM parity (skipped with the import error as reason where vLLM is not importable, i.e. in ``.venv``;
  ``make test-vllm`` runs them in ``.venv-vllm``): 32 emoji-like samples through ``hf`` (fp32, ``restart``)
  and ``vllm`` give cosine >= 0.999 for every facet vector, the same mask/tokens/truncation flags and the
  same cache identity but for ``backend``; prefix caching on and off give the same vectors.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from stage1_embed_text.backends.truncate import (
    block_of,
    final_norm_scale,
    keep_tensor,
    truncated_checkpoint,
    truncated_config,
)
from stage1_embed_text.backends.vllm_settings import EngineSettings, vllm_available
from stage1_embed_text.encode.packing import pack_samples
from stage1_embed_text.encode.prompts import FLAME, GROUPS
from stage1_embed_text.encode.tokenization import group_templates

log = logging.getLogger(__name__)

VLLM_OK, VLLM_WHY = vllm_available()
needs_vllm = pytest.mark.skipif(
    not VLLM_OK, reason=f"vllm not importable here ({VLLM_WHY}); run `make test-vllm` (uses .venv-vllm)"
)
PARITY_LLM = "smollm2-135m"  # the smaller embedded model (Llama architecture, D = 576)
MIN_COSINE = 0.999

_EMOJI = [
    ("grinning face", "Smileys & Emotion", "face-smiling", "face, grin, happy"),
    ("face with tears of joy", "Smileys & Emotion", "face-smiling", "face, joy, laugh, tear"),
    ("smiling face with heart-eyes", "Smileys & Emotion", "face-affection", "eye, face, love, smile"),
    ("thinking face", "Smileys & Emotion", "face-hand", "face, thinking"),
    ("red heart", "Smileys & Emotion", "heart", "heart, love"),
    ("waving hand: medium skin tone", "People & Body", "hand-fingers-open", "hand, wave, waving"),
    ("thumbs up", "People & Body", "hand-fingers-closed", "+1, hand, thumb, up"),
    ("woman technologist: dark skin tone", "People & Body", "person-role", "coder, developer, woman"),
    ("person running", "People & Body", "person-activity", "marathon, running"),
    ("dog face", "Animals & Nature", "animal-mammal", "dog, face, pet"),
    ("cat", "Animals & Nature", "animal-mammal", "cat, pet"),
    ("spouting whale", "Animals & Nature", "animal-marine", "face, spouting, whale"),
    ("sunflower", "Animals & Nature", "plant-flower", "flower, sun, sunflower"),
    ("deciduous tree", "Animals & Nature", "plant-other", "deciduous, shedding, tree"),
    ("red apple", "Food & Drink", "food-fruit", "apple, fruit, red"),
    ("pizza", "Food & Drink", "food-prepared", "cheese, pizza, slice"),
    ("hot beverage", "Food & Drink", "drink", "beverage, coffee, drink, hot, steaming, tea"),
    ("globe showing Europe-Africa", "Travel & Places", "place-map", "Africa, earth, Europe, globe, world"),
    ("rocket", "Travel & Places", "transport-air", "rocket, space"),
    ("high-speed train", "Travel & Places", "transport-ground", "railway, shinkansen, speed, train"),
    ("rainbow", "Travel & Places", "sky & weather", "rain, rainbow"),
    ("soccer ball", "Activities", "sport", "ball, football, soccer"),
    ("jack-o-lantern", "Activities", "event", "celebration, halloween, jack, lantern"),
    ("video game", "Activities", "game", "controller, game"),
    ("mobile phone", "Objects", "phone", "cell, mobile, phone, telephone"),
    ("light bulb", "Objects", "light & video", "bulb, comic, electric, idea, light"),
    ("hammer and wrench", "Objects", "tool", "hammer, spanner, tool, wrench"),
    ("recycling symbol", "Symbols", "other-symbol", "recycle"),
    ("check mark button", "Symbols", "other-symbol", "button, check, mark, ✓"),
    ("flag: Japan", "Flags", "country-flag", "flag"),
    ("chequered flag", "Flags", "flag", "checkered, chequered, racing"),
    ("keycap: 7", "Symbols", "keycap", "keycap"),
]


def emoji_samples() -> list[dict]:
    """32 emoji-like samples with templated recaptions (as the emoji manifest builds them, SPEC §9).

    Sample 3 has no short caption and sample 7 no long one (absent groups); sample 11 has a ``"`` inside
    its caption (cleaned to ``'``, SPEC §2.1).
    """
    out = []
    for i, (name, group, sub, kw) in enumerate(_EMOJI):
        style = "Google's Noto" if i % 2 == 0 else "Twitter's Twemoji"
        raw = name if i != 11 else f'{name} "thar she blows"'
        short = f"A {name} emoji from the {group} group."
        long = (
            f"An emoji of a {name}. It is associated with {kw}. It belongs to the {group} group, in the "
            f"{sub} subgroup. It is drawn in {style} style as a small flat icon on a transparent background."
        )
        out.append({"raw": raw, "short": None if i == 3 else short, "long": None if i == 7 else long})
    assert len(out) == 32
    return out


# ------------------------------------------------------------------------------------------------------
# without vLLM


def test_keep_tensor_rules():
    assert block_of("model.layers.12.mlp.up_proj.weight") == 12
    assert block_of("model.embed_tokens.weight") is None
    assert keep_tensor("model.layers.2.self_attn.q_proj.weight", 3)
    assert not keep_tensor("model.layers.3.self_attn.q_proj.weight", 3)
    assert keep_tensor("model.norm.weight", 3) and keep_tensor("model.embed_tokens.weight", 3)
    assert not keep_tensor("lm_head.weight", 3)


def test_truncated_config_cuts_layer_types_and_validates():
    cfg = {"num_hidden_layers": 4, "layer_types": ["a", "b", "c", "d"], "hidden_size": 8}
    out = truncated_config(cfg, 2)
    assert out["num_hidden_layers"] == 2 and out["layer_types"] == ["a", "b"] and cfg["num_hidden_layers"] == 4
    for bad in (0, 5):
        with pytest.raises(ValueError, match="cannot cut a 4-block checkpoint"):
            truncated_config(cfg, bad)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_truncated_checkpoint_divided_norm_is_hidden_state_direction(tmp_path, arch):
    """What vLLM returns (``final_norm(h_L)`` of the cut model) divided by the scale is ``h_L``'s direction."""
    from transformers import AutoModelForCausalLM

    from tests.helpers.stage1_tiny import LAYERS, tiny_causal_lm, tiny_tokenizer

    torch.manual_seed(1)
    full = tiny_causal_lm(arch)
    with torch.no_grad():  # a non-trivial final-norm scale: ones (Llama) / zeros (Gemma) would hide mistakes
        w = full.model.norm.weight
        w.copy_(torch.rand_like(w) + 0.5 if arch == "llama" else torch.randn_like(w) * 0.4)
    src = tmp_path / f"tiny-{arch}"
    full.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    layer = LAYERS - 2
    cut = truncated_checkpoint(src, layer, root=tmp_path / "truncated")
    assert truncated_checkpoint(src, layer, root=tmp_path / "truncated") == cut  # made once, reused
    model = AutoModelForCausalLM.from_pretrained(cut, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == layer and len(model.model.layers) == layer
    if arch == "gemma3":
        assert len(model.config.layer_types) == layer
    ids = tiny_tokenizer()(['Image description : "a red apple." . After thinking step by step ,'], return_tensors="pt")
    with torch.no_grad():
        ref = full.model(**ids, output_hidden_states=True).hidden_states[layer][0]
        normed = model.model(**ids).last_hidden_state[0]  # the cut model applies its final norm, like vLLM
    scale = torch.from_numpy(final_norm_scale(cut))
    expect = full.model.norm.weight.float() + (1.0 if arch == "gemma3" else 0.0)
    torch.testing.assert_close(scale, expect)
    got = normed / scale
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert cos.min() > 0.99999, cos


def test_requests_are_packed_sequences_split_per_facet():
    from tests.helpers.stage1_tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    samples = emoji_samples()[:8]
    items = pack_samples(tok, group_templates(tok, FLAME), FLAME, samples, context_tokens=512)
    for it in items:
        seq = it.seq
        assert sum(len(it.request(k)) for k in range(len(seq.seg_lens))) == (
            len(seq.seg_lens) * seq.n_prefix + sum(seq.seg_lens)
        )
        for k, (start, n) in enumerate(zip(seq.readout() - np.asarray(seq.seg_lens) + 1, seq.seg_lens)):
            req = it.request(k)
            assert req[: seq.n_prefix] == seq.ids[: seq.n_prefix].tolist()
            assert req[seq.n_prefix :] == seq.ids[start : start + n].tolist()
            assert req[-1] == seq.ids[seq.readout()[k]]  # last token = the facet's closing quote
    assert {GROUPS[it.group] for it in items} == set(GROUPS)


def test_settings_defaults_per_device():
    cpu = EngineSettings(device="cpu").resolved()
    assert cpu.block_size == 32 and not cpu.enforce_eager and cpu.kv_cache_gib == 2.0 and cpu.in_process
    assert cpu.omp_threads_bind and cpu.gpu_memory_utilization is None
    gpu = EngineSettings(device="cuda").resolved()
    assert gpu.block_size == 16 and not gpu.enforce_eager and gpu.gpu_memory_utilization == 0.85
    with pytest.raises(ValueError, match="device"):
        EngineSettings(device="tpu").resolved()
    from stage1_embed_text.backends.vllm_settings import _count_cpus

    assert (_count_cpus("0,1"), _count_cpus("0-3,8"), _count_cpus("2")) == (2, 5, 1)


# ------------------------------------------------------------------------------------------------------
# with vLLM


@pytest.fixture(scope="module")
def hf_reference():
    from stage1_embed_text.backends.llm import load_llm
    from stage1_embed_text.encode.encoder import FacetEncoder

    enc = FacetEncoder(load_llm(PARITY_LLM, dtype="float32"), position_mode="restart")
    return enc.identity(), enc.encode(emoji_samples())


def _vllm_encode(prefix_caching: bool, dtype: str = "bfloat16", n: int = 32):
    from stage1_embed_text.backends.vllm_backend import VllmFacetEncoder

    enc = VllmFacetEncoder(  # eager: starts in seconds (compiling would take minutes on a small CPU)
        PARITY_LLM, settings=EngineSettings(dtype=dtype, enable_prefix_caching=prefix_caching, enforce_eager=True)
    )
    try:
        return enc.identity(), enc.encode(emoji_samples()[:n])
    finally:
        enc.close()


@pytest.fixture(scope="module")
def vllm_cached():
    return _vllm_encode(prefix_caching=True)


@needs_vllm
@pytest.mark.slow
def test_vllm_matches_hf_per_facet(hf_reference, vllm_cached):
    hf_id, hf = hf_reference
    v_id, v = vllm_cached
    np.testing.assert_array_equal(v.mask, hf.mask)
    np.testing.assert_array_equal(v.tokens, hf.tokens)
    np.testing.assert_array_equal(v.truncated, hf.truncated)
    assert v.mask.sum() == 32 * 11 - 3 - 7  # one sample without short, one without long
    cos = (v.vectors * hf.vectors).sum(-1)[hf.mask]
    log.info("hf vs vllm cosine: min %.6f mean %.6f over %d vectors", cos.min(), cos.mean(), cos.size)
    assert cos.min() >= MIN_COSINE, f"min cosine {cos.min():.6f} < {MIN_COSINE}"
    assert (v.vectors[~hf.mask] == 0).all()
    assert np.allclose(np.linalg.norm(v.vectors[hf.mask], axis=-1), 1.0, atol=1e-5)
    a, b = hf_id.to_dict(), v_id.to_dict()
    assert (a.pop("backend"), b.pop("backend")) == ("hf", "vllm")
    a.pop("dtype_compute"), b.pop("dtype_compute")
    assert a == b


@needs_vllm
@pytest.mark.slow
def test_prefix_caching_does_not_change_vectors():
    """In float32, so that a wrong cache hit (a facet reading another text's or facet's KV) cannot hide in bf16
    rounding: bf16 runs differ by up to ~4e-3 per entry (cosine 0.9999) just from different batch shapes."""
    _, on = _vllm_encode(prefix_caching=True, dtype="float32", n=12)  # 12 samples keep it short on 2 cores
    _, off = _vllm_encode(prefix_caching=False, dtype="float32", n=12)
    np.testing.assert_array_equal(on.mask, off.mask)
    cos = (on.vectors * off.vectors).sum(-1)[on.mask]
    diff = np.abs(on.vectors - off.vectors).max()
    log.info("prefix caching on vs off (float32): max |diff| %.3g, min cosine %.8f", diff, cos.min())
    assert diff <= 1e-4 and cos.min() >= 0.999999, (diff, cos.min())
