"""Text cache, identity refusal and an end-to-end eval run with small fakes (issue 5)."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from eval.benchmarks import load_benchmark
from eval.embedding import TextEncoder, embed_images
from eval.report import build_results, write_results
from eval.run import evaluate_benchmark
from pipeline.cache import CacheIdentityError
from tests.test_eval_benchmarks import write_emoji_manifest

D = 16
IDENTITY = {"llm": "fake-llm", "llm_fingerprint": "abc", "layer": 3, "readout": "pre_norm", "dim": D,
            "prompt_set": "flame", "prompt_set_hash": "h1", "position_mode": "restart"}


class FakeEmbedder:
    """Deterministic text -> unit vector (sha256-seeded Gaussian); counts embedded texts."""

    def __init__(self, identity=IDENTITY):
        self.identity = dict(identity)
        self.calls = 0

    def embed(self, texts, mode="single"):
        self.calls += len(texts)
        out = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(f"{mode}:{t}".encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(D)
            out.append(v / np.linalg.norm(v))
        return np.array(out, np.float32)


class FakeModel(torch.nn.Module):
    """Fixed random projection of the 8x8 image: features = flattened pixels, output = normalized projection."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 8 * 8, D, bias=False)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    def features(self, x):
        return x.flatten(1)

    def forward(self, x):
        return torch.nn.functional.normalize(self.proj(self.features(x)), dim=-1)


def transform(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.resize((8, 8)), np.float32) / 255.0).permute(2, 0, 1)


def test_text_cache_reuse_and_dedupe(tmp_path):
    emb = FakeEmbedder()
    enc = TextEncoder(emb, IDENTITY, tmp_path, batch_size=2)
    v = enc.encode(["a", "b", "a", "c"], "single")
    assert emb.calls == 3 and v.shape == (4, D)
    np.testing.assert_array_equal(v[0], v[2])
    emb2 = FakeEmbedder()
    enc2 = TextEncoder(emb2, IDENTITY, tmp_path)
    np.testing.assert_array_equal(enc2.encode(["c", "a", "b", "d"], "single")[:3], v[[3, 0, 1]])
    assert emb2.calls == 1  # only "d" is new
    enc2.encode(["a"], "multi")
    assert emb2.calls == 2  # another mode is another cache
    other = dict(IDENTITY, layer=4)
    emb3 = FakeEmbedder(other)
    TextEncoder(emb3, other, tmp_path).encode(["a"], "single")
    assert emb3.calls == 1  # another identity is another cache


def test_identity_mismatch_refused(tmp_path):
    with pytest.raises(CacheIdentityError, match="layer: model was trained against 3, text embedder has 5"):
        TextEncoder(FakeEmbedder(dict(IDENTITY, layer=5)), IDENTITY, tmp_path)
    # the llm name may differ (alias vs path) when the weight fingerprints agree
    TextEncoder(FakeEmbedder(dict(IDENTITY, llm="/models/fake")), IDENTITY, tmp_path)


def test_embed_images_shapes(tmp_path):
    write_emoji_manifest(tmp_path / "m")
    b = load_benchmark("emoji", tmp_path / "m")
    emb, feats = embed_images(FakeModel(), b.images, transform, batch_size=3, features=True)
    assert emb.shape == (4, D) and feats.shape == (4, 192) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-5)


def test_emoji_end_to_end(tmp_path):
    write_emoji_manifest(tmp_path / "m")
    b = load_benchmark("emoji", tmp_path / "m", linear_probe=True)
    enc = TextEncoder(FakeEmbedder(), IDENTITY, tmp_path / "cache")
    out = tmp_path / "out"
    results = evaluate_benchmark(b, FakeModel(), transform, enc, out, batch_size=4)
    config = {"cache_identity": IDENTITY, "image": {"size": 8}}
    doc = build_results(b.name, b.split, "m", b.counts, None, "model", config, results)
    js, md = write_results(doc, out)
    data = json.loads(js.read_text())
    t = data["tasks"]
    assert t["retrieval_en_raw"]["text_mode"] == "single" and t["retrieval_en_long"]["text_mode"] == "multi"
    assert t["retrieval_en_raw"]["counts"]["n_texts"] == 2
    assert t["retrieval_en_raw"]["chance"]["text_retrieval_recall@1"] == 0.5
    assert set(t["classification_category"]["metrics"]) == {"acc1", "mean_per_class_recall"}
    assert data["summary"]["multilingual_average"]["languages"] == ["de", "fr"]
    assert data["cache_identity"]["layer"] == 3 and data["split"] == "test"
    assert "## Multilingual retrieval" in md.read_text() and "**average**" in md.read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["classification_category.png", "classification_subcategory.png", "linear_probe_category.png",
                    "multilingual_recall.png", "retrieval_examples_retrieval_en_long.png",
                    "retrieval_examples_retrieval_en_raw.png"]
    for p in out.glob("*.png"):
        img = np.asarray(Image.open(p).convert("L"))
        assert img.shape[0] > 100 and img.std() > 5  # a real figure, not a blank canvas


def test_run_benchmark_and_cli(tmp_path, monkeypatch):
    import eval.run as run_mod
    from pipeline.cli import main

    write_emoji_manifest(tmp_path / "m")
    config = {"cache_identity": IDENTITY, "image": {"size": 8}, "model": {}}
    monkeypatch.setattr(run_mod, "load_model", lambda d: (FakeModel(), config, transform))
    monkeypatch.setattr(run_mod, "load_text_encoder", lambda ident, root, bs: TextEncoder(FakeEmbedder(), ident, root, bs))
    doc = run_mod.run_benchmark("model", "emoji", tmp_path / "m", tmp_path / "o1", text_mode="multi",
                                text_cache=tmp_path / "c", linear_probe=False, plots=False)
    assert {v["text_mode"] for v in doc["tasks"].values()} == {"multi"} and doc["text_mode"] == "multi"
    rc = main(["eval", "--model", "model", "--benchmark", "emoji", "--data", str(tmp_path / "m"), "--out",
               str(tmp_path / "o2"), "--text-cache", str(tmp_path / "c"), "--no-plots", "--batch-size", "2"])
    assert rc == 0 and (tmp_path / "o2" / "results.md").exists()
    rc = main(["eval", "--model", "model", "--benchmark", "coco", "--data", str(tmp_path / "missing"), "--out",
               str(tmp_path / "o3")])
    assert rc == 2
