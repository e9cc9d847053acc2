"""The fidelity study (issue 14): its pieces and a smoke run of the whole command on tiny fixtures.

The smoke run trains every variant for 2 steps of 8 images with a 1-block ViT and a 1-block text tower on a
tiny emoji-like manifest and two fake caches (F = 11 FLAME facets, D = 16), evaluates them on the ``emoji``
benchmark with a deterministic fake text embedder standing in for the LLMs, and checks the written files.
Loading an LLM anywhere in it is an error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

import stage1_embed_text.api
import stage1_embed_text.backends.llm
from manifests.schema import ManifestWriter
from pipeline.cache.store import CacheIdentity, CacheLayout, CacheMeta, CacheReader, CacheWriter
from stage1_embed_text.encode.prompts import FLAME
from stage2_train_vision.config import ModelConfig
from stage2_train_vision.loss import sigmoid_loss
from stage2_train_vision.model import FlameVisionModel
from stage2_train_vision.text_tower import CaptionSampler, TextTowerConfig, attach_text_tower, get_tokenizer
from tests.helpers.eval_fakes import FakeEmbedder
from tests.helpers.stage2_data import COLOURS, png_bytes

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import fidelity  # noqa: E402

D = 16
TINY_TOWER = {"width": 32, "heads": 2, "layers": 1, "context_length": 24}
TINY_VIT = ["model.img_size=32", "model.patch_size=8", "model.depth=1", "model.width=32", "model.num_heads=2",
            "model.proj_hidden=64", "train.batch_size=8", "optim.warmup_steps=1", "train.mixed_precision=\"no\""]
NAMES = ["grinning face", "red apple", "rocket", "green heart", "dog face", "pizza"]
CATS = ["Smileys & Emotion", "Food & Drink", "Travel & Places"]


def write_manifest(d: Path) -> Path:
    """6 emoji x 2 vendors: emoji 0-3 train (8 images), 4-5 test (4 images); captions, labels, names."""
    w = ManifestWriter(d, source={"name": "emoji-fixture", "args": {}})
    for e, name in enumerate(NAMES):
        for vendor in range(2):
            w.add({"key": f"{vendor}/{e}", "image_bytes": png_bytes(COLOURS[e % 4], 10 * e + vendor),
                   "split": "train" if e < 4 else "test", "raw_caption": name,
                   "short_caption": f"An emoji showing {name}.",
                   "long_caption": f"An emoji of {name}, drawn by vendor {vendor}. It is a small icon.",
                   "labels": {"category": CATS[e % 3], "subcategory": f"group-{e % 2}"},
                   "names": {"en": name, "de": f"{name} (de)", "ja": f"{name} (ja)"}})
    w.close()
    return d


def write_cache(d: Path, keys: list[str], llm: str, seed: int) -> Path:
    """A finished cache of random unit vectors, one row per key, FLAME facet names, llm name ``llm``."""
    rng = np.random.default_rng(seed)
    vec = rng.normal(size=(len(keys), len(FLAME.facets), D))
    vec /= np.linalg.norm(vec, axis=-1, keepdims=True)
    mask = np.ones(vec.shape[:2], bool)
    identity = CacheIdentity(llm=llm, llm_fingerprint=f"fp-{llm}", tokenizer="t", layer=3, readout="pre_norm",
                             dim=D, prompt_set="flame", prompt_set_hash="h", facets=FLAME.facets)
    layout = CacheLayout(n_rows=len(keys), shard_rows=8, chunk_rows=4, plan_hash="p")
    writer = CacheWriter.create(d, CacheMeta(identity, layout))
    for s in range(layout.n_shards):
        r = layout.shard_range(s)
        writer.write_shard(s, vec[r.start : r.stop], mask[r.start : r.stop],
                           pa.table({"key": keys[r.start : r.stop], "row": pa.array(list(r), pa.int64())}))
    writer.build_lookup(mask)
    return d


@pytest.fixture(scope="module")
def study_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    manifest = write_manifest(root / "manifest")
    keys = [f"{v}/{e}" for e in range(len(NAMES)) for v in range(2)]
    caches = {fidelity.GEMMA: write_cache(root / "cache-gemma", keys, fidelity.GEMMA, 0),
              fidelity.SMOLLM: write_cache(root / "cache-smollm", keys, fidelity.SMOLLM, 1)}
    return fidelity.StudyData(manifest, caches)


@pytest.fixture
def no_llm(monkeypatch, tmp_path):
    """Fail on any LLM load; eval texts of FLAME models go through :class:`FakeEmbedder`."""
    import eval.run
    from eval.embedding import TextEncoder

    def refuse(*a, **k):
        raise AssertionError("an LLM was loaded")

    monkeypatch.setattr(stage1_embed_text.backends.llm, "load_llm", refuse)
    monkeypatch.setattr(stage1_embed_text.api.TextEmbedder, "from_identity", refuse)
    monkeypatch.setattr(eval.run, "load_text_encoder",
                        lambda ident, root, bs: TextEncoder(FakeEmbedder(ident), ident, tmp_path / "text-cache", bs))


def test_smoke_study_writes_json_table_and_plot(study_data, no_llm, tmp_path):
    cfg = fidelity.StudyConfig(seeds=(3,), steps=2, overrides=tuple(TINY_VIT), runs=tmp_path / "runs",
                               out=tmp_path / "results", threads=1, tower=dict(TINY_TOWER))
    doc = fidelity.run_study(cfg, study_data)

    assert set(doc) == {"config", "variants"}
    assert list(doc["variants"]) == ["flame", "flame_single", "flame_english_llm", "clip_scratch"]
    assert doc["config"]["seeds"] == [3] and doc["config"]["steps"] == 2 and doc["config"]["images_per_run"] == 16
    for v in doc["variants"].values():
        assert v["seeds"] == [3] and len(v["runs"]) == 1 and v["runs"][0]["seed"] == 3
        for _, key in fidelity.TABLE:
            m = v["metrics"][key]
            assert len(m["values"]) == 1 and m["mean"] == m["values"][0] and m["std"] == 0.0
            assert 0.0 <= m["mean"] <= 1.0 and 0.0 < v["chance"][key] <= 1.0
        assert v["metrics"]["multilingual_de/text_retrieval_recall@1"]["values"][0] >= 0
        assert v["runs"][0]["final_loss"] > 0
    # 2 test emoji (2 texts), 4 test images: R@1 chance of an image query is 1/2
    assert doc["variants"]["flame"]["chance"]["retrieval_en_raw/text_retrieval_recall@1"] == pytest.approx(0.5)
    on_disk = json.loads((tmp_path / "results" / "fidelity.json").read_text())
    assert on_disk == json.loads(json.dumps(doc))
    md = (tmp_path / "results" / "fidelity.md").read_text()
    assert all(f"| `{n}` |" in md for n in doc["variants"]) and "| chance |" in md
    assert (tmp_path / "results" / "fidelity.png").stat().st_size > 10_000

    # which text side each exported model expects
    run_dirs = {p.name.split("-s3-")[0]: p for p in (tmp_path / "runs" / "fidelity").glob("*-s3-*")}
    configs = {n: json.loads((d / "train" / "model" / "config.json").read_text()) for n, d in run_dirs.items()}
    assert configs["clip_scratch"]["cache_identity"] is None
    assert configs["clip_scratch"]["text_side"]["kind"] == "text_tower"
    assert configs["clip_scratch"]["text_side"]["width"] == 32 and configs["clip_scratch"]["model"]["out_dim"] == D
    for n in ("flame", "flame_single", "flame_english_llm"):
        assert set(configs[n]) == {"library_name", "architectures", "format_version", "model", "image", "cache_identity",
                                   "text_encoder", "train"}  # the FLAME export format (a Hub model repo)
    assert configs["flame"]["cache_identity"]["llm"] == fidelity.GEMMA
    assert configs["flame_english_llm"]["cache_identity"]["llm"] == fidelity.SMOLLM
    assert json.loads((run_dirs["flame_single"] / "train" / "train_config.json").read_text())["data"]["positives"] == 1
    assert not any((d / "train" / "checkpoints").exists() for d in run_dirs.values())

    # a rerun reuses every finished run and reproduces the numbers
    again = fidelity.run_study(cfg, study_data)
    for name in doc["variants"]:
        assert again["variants"][name]["metrics"] == doc["variants"][name]["metrics"]


def test_same_seed_same_images_and_crops_for_flame_and_clip_scratch(study_data, tmp_path):
    """clip_scratch keeps P = 6 in the data config only so its image stream equals flame's."""
    from stage2_train_vision.config import load_config
    from stage2_train_vision.data.pairs import build_training_data
    from stage2_train_vision.data.transforms import train_transform

    cfg = fidelity.StudyConfig(seeds=(0,), steps=2, overrides=tuple(TINY_VIT))
    batches = {}
    for name in ("flame", "clip_scratch", "flame_single"):
        v = fidelity.VARIANTS[name]
        c = load_config(cfg.train_config, fidelity.train_overrides(cfg, v, 0, study_data.manifest,
                                                                   study_data.caches[v.llm], tmp_path / name))
        data = build_training_data(c.data, CacheReader(c.data.cache), train_transform(c), c.model.img_size, 8, 0, 1, 0)
        data.set_epoch(0)
        batches[name] = next(iter(data.loader))
    assert batches["flame"]["keys"] == batches["clip_scratch"]["keys"] == batches["flame_single"]["keys"]
    assert torch.equal(batches["flame"]["images"], batches["clip_scratch"]["images"])


def test_raw_only_cache_keeps_exactly_the_raw_facet(study_data, tmp_path):
    info = fidelity.raw_only_cache(study_data.caches[fidelity.GEMMA], tmp_path / "raw")
    src, raw = CacheReader(study_data.caches[fidelity.GEMMA]), CacheReader(tmp_path / "raw")
    assert info == {"facet": "raw", "rows": 12, "rows_with_facet": 12}
    assert raw.identity == src.identity and raw.facets[0] == "raw"
    v_src, _ = src.get(["0/1", "1/5"])
    v_raw, m_raw = raw.get(["0/1", "1/5"])
    assert m_raw.tolist() == [[True] + [False] * 10] * 2
    assert np.array_equal(v_raw[:, 0], v_src[:, 0]) and not v_raw[:, 1:].any()


def test_clip_scratch_text_tower_gets_gradients_from_the_sigmoid_loss(study_data):
    torch.manual_seed(0)
    model = FlameVisionModel(ModelConfig(img_size=32, patch_size=8, depth=1, width=32, num_heads=2, proj_hidden=64,
                                         out_dim=D))
    cfg = TextTowerConfig(**TINY_TOWER)
    tower = attach_text_tower(model, cfg, D)
    assert any(n.startswith("text_tower.") for n, _ in model.named_parameters())
    sampler = CaptionSampler(cfg, study_data.manifest, "train")
    keys = ["0/0", "1/1", "0/2", "1/3"]
    tokens = sampler(keys, seed=0)
    assert tokens.shape == (4, 24) and tokens.dtype == torch.int64
    img, txt = model(torch.randn(4, 3, 32, 32), tokens)
    assert img.shape == txt.shape == (4, D) and torch.allclose(txt.norm(dim=-1), torch.ones(4))
    loss = sigmoid_loss(img, txt[:, None], torch.ones(4, 1, dtype=torch.bool), model.temperature(), model.logit_bias)
    loss.backward()
    grads = {n: p.grad for n, p in tower.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert grads["text_projection"].abs().sum() > 0 and grads["transformer.resblocks.0.mlp.c_fc.weight"].abs().sum() > 0
    used = torch.unique(tokens[tokens != 0])  # 0 pads after <end_of_text>: causal attention never reads it
    emb_grad = grads["token_embedding.weight"].abs().sum(dim=1)
    unused = torch.ones(len(emb_grad), dtype=torch.bool)
    unused[used] = False
    assert (emb_grad[used] > 0).all() and not emb_grad[unused].any()  # exactly the tokens it saw


def test_caption_sampler_draws_raw_short_and_long_deterministically(study_data):
    cfg = TextTowerConfig(**TINY_TOWER)
    sampler = CaptionSampler(cfg, study_data.manifest, "train")
    tok = get_tokenizer(cfg)
    assert set(sampler.tokens) == {f"{v}/{e}" for e in range(4) for v in range(2)}  # train split only
    choices = [sampler(["0/0"], seed=s)[0] for s in range(30)]
    options = tok(["grinning face", "An emoji showing grinning face.",
                   "An emoji of grinning face, drawn by vendor 0. It is a small icon."])
    hits = [next(i for i in range(3) if torch.equal(c, options[i])) for c in choices]
    assert set(hits) == {0, 1, 2}
    assert torch.equal(sampler(["0/0", "1/2"], seed=7), sampler(["0/0", "1/2"], seed=7))


def test_aggregate_mean_and_sample_std_over_seeds():
    agg = fidelity.aggregate({0: {"a/x": 0.1, "b/y": 1.0}, 1: {"a/x": 0.3, "b/y": 1.0}, 2: {"a/x": 0.2}})
    assert list(agg) == ["a/x"]  # only metrics every seed has
    assert agg["a/x"]["values"] == [0.1, 0.3, 0.2]
    assert agg["a/x"]["mean"] == pytest.approx(0.2) and agg["a/x"]["std"] == pytest.approx(0.1)
