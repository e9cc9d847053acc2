"""Text cache, identity refusal and an end-to-end eval run with small fakes (issue 5)."""

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from eval.benchmarks import load_benchmark
from eval.embedding import EmbedderError, TextEncoder, embed_images
from eval.report import build_results, write_results
from eval.run import evaluate_benchmark
from pipeline.cache.store import CacheIdentityError
from tests.helpers.eval_fakes import (
    IDENTITY,
    D,
    FakeEmbedder,
    write_emoji_manifest,
)
from tests.helpers.images import png, png_chunks


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


class _BadEmbedder(FakeEmbedder):
    def __init__(self, damage):
        super().__init__()
        self.damage = damage

    def embed(self, texts, mode="single"):
        v = super().embed(texts, mode)
        return v[:, :8] if self.damage == "shape" else v * np.float32("nan")


@pytest.mark.parametrize(("damage", "message"), [
    ("shape", r"^text embedder returned \(2, 8\), expected \[2, 16\]$"),
    ("nan", r"^text embedder returned vectors that are not finite and unit-norm$")])
def test_an_embedder_returning_bad_vectors_is_refused_and_nothing_is_cached(tmp_path, damage, message):
    with pytest.raises(EmbedderError, match=message):
        TextEncoder(_BadEmbedder(damage), IDENTITY, tmp_path).encode(["a", "b"], "single")
    good = FakeEmbedder()
    TextEncoder(good, IDENTITY, tmp_path).encode(["a", "b"], "single")
    assert good.calls == 2


def test_embed_images_shapes(tmp_path):
    write_emoji_manifest(tmp_path / "m")
    b = load_benchmark("emoji", tmp_path / "m")
    emb, feats, failed = embed_images(FakeModel(), b.images, transform, batch_size=3, features=True)
    assert emb.shape == (4, D) and feats.shape == (4, 192) and emb.dtype == np.float32 and failed == {}
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-5)


def test_emoji_end_to_end(tmp_path):
    write_emoji_manifest(tmp_path / "m")
    b = load_benchmark("emoji", tmp_path / "m", linear_probe=True)
    enc = TextEncoder(FakeEmbedder(), IDENTITY, tmp_path / "cache")
    out = tmp_path / "out"
    results, skipped = evaluate_benchmark(b, FakeModel(), transform, enc, out, batch_size=4)
    assert skipped == {}
    config = {"cache_identity": IDENTITY, "image": {"size": 8}}
    doc = build_results(b.name, b.split, "m", b.counts, None, "model", config, results, skipped)
    js, md = write_results(doc, out)
    data = json.loads(js.read_text())
    t = data["tasks"]
    assert t["retrieval_en_raw"]["text_mode"] == "single" and t["retrieval_en_long"]["text_mode"] == "multi"
    assert t["retrieval_en_raw"]["counts"]["n_texts"] == 2
    assert t["retrieval_en_raw"]["chance"]["text_retrieval_recall@1"] == 0.5
    assert set(t["classification_category"]["metrics"]) == {"acc1", "mean_per_class_recall"}
    assert data["summary"]["multilingual_average"]["languages"] == ["de", "fr"]
    assert data["cache_identity"]["layer"] == 3 and data["split"] == "test" and data["skipped"] == {}
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
    from flame_pipeline.cli import main

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


COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class ColorEmbedder(FakeEmbedder):
    """A text naming red / green / blue -> the unit vector e0 / e1 / e2 (anything else -> e15)."""

    def embed(self, texts, mode="single"):
        self.calls += len(texts)
        axis = [next((i for i, c in enumerate(COLORS) if c in t), D - 1) for t in texts]
        return np.eye(D, dtype=np.float32)[axis]


class ColorModel(FakeModel):
    """An image -> its normalized mean (R, G, B) in the first 3 of D dimensions: solid red -> e0, green -> e1."""

    def forward(self, x):
        return torch.nn.functional.normalize(torch.nn.functional.pad(x.mean(dim=(2, 3)), (0, D - 3)), dim=-1)


def bad_images() -> dict[str, bytes]:
    """One of each: over Pillow's pixel limit (a 20000x20000 PNG header), a truncated JPEG, HTML saved as .jpg."""
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="JPEG")
    return {"bomb.png": png_chunks(20000, 20000, 8, 0), "cut.jpg": buf.getvalue()[: len(buf.getvalue()) // 2],
            "page.jpg": b"<html><body>Not Found</body></html>"}


def patch_color_eval(monkeypatch):
    import eval.run as run_mod

    config = {"cache_identity": IDENTITY, "image": {"size": 8}, "model": {}}
    monkeypatch.setattr(run_mod, "load_model", lambda d: (ColorModel(), config, transform))
    monkeypatch.setattr(run_mod, "load_text_encoder",
                        lambda ident, root, bs: TextEncoder(ColorEmbedder(), ident, root, bs))


def test_classfolder_skips_undecodable_images_and_scores_the_rest(tmp_path, monkeypatch, caplog, capsys):
    from flame_pipeline.cli import main

    patch_color_eval(monkeypatch)
    bad = bad_images()
    files = {"green/e.png": png(COLORS["green"]), "green/f_page.jpg": bad["page.jpg"],
             "red/a_bomb.png": bad["bomb.png"], "red/b_cut.jpg": bad["cut.jpg"], "red/c.png": png(COLORS["red"]),
             "red/d.png": png(COLORS["green"])}  # d: a green image filed under red, classified green (wrong)
    for name, data in files.items():
        (tmp_path / "cls" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cls" / name).write_bytes(data)
    (tmp_path / "cls" / "templates.txt").write_text("a {} thing.\n")
    args = ["eval", "--model", "model", "--benchmark", "classfolder", "--data", str(tmp_path / "cls"),
            "--text-cache", str(tmp_path / "c"), "--batch-size", "4"]
    with caplog.at_level(logging.WARNING):
        assert main(args + ["--out", str(tmp_path / "o")]) == 0
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert doc["skipped"] == {"image_too_large": 1, "undecodable_image": 2}
    assert doc["counts"] == {"images": 6, "classes": 2}
    task = doc["tasks"]["zeroshot_classification"]
    # remaining: e (green, right), c (red, right), d (green image labelled red, wrong)
    assert task["metrics"] == {"acc1": 2 / 3, "mean_per_class_recall": (1 + 1 / 2) / 2}
    assert task["counts"]["n_images"] == 3 and task["counts"]["n_classes_present"] == 2
    md = (tmp_path / "o" / "results.md").read_text()
    assert "Skipped images (did not open; left out of every task): 3 (image_too_large 1, undecodable_image 2)." in md
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("skipping image" in w for w in warnings) == 3
    assert any("red/a_bomb.png" in w and "exceeds limit of" in w and "(image_too_large)" in w for w in warnings)
    assert "classfolder: 3 of 6 images skipped (image_too_large 1, undecodable_image 2)" in caplog.text
    for name in ("green/e.png", "red/c.png", "red/d.png"):
        (tmp_path / "cls" / name).unlink()
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "o2")]) == 2  # nothing left to score: a one-line error
    assert "flame eval: classfolder: none of the 3 images opens" in capsys.readouterr().err  # pipeline.errors


def test_retrieval_drops_an_undecodable_image_with_its_pairs(tmp_path, monkeypatch):
    import eval.run as run_mod

    patch_color_eval(monkeypatch)
    images = {"a": png(COLORS["red"]), "b": bad_images()["page.jpg"], "c": png(COLORS["blue"]),
              "d": png(COLORS["red"])}
    captions = {"a": "red", "b": "green", "c": "blue", "d": "blue"}  # d: a red image captioned blue
    for key, data in images.items():
        (tmp_path / "u" / "image").mkdir(parents=True, exist_ok=True)
        (tmp_path / "u" / "caption").mkdir(exist_ok=True)
        (tmp_path / "u" / "image" / f"{key}.jpg").write_bytes(data)
        (tmp_path / "u" / "caption" / f"{key}.txt").write_text(captions[key])
    doc = run_mod.run_benchmark("model", "urban1k", tmp_path / "u", tmp_path / "o", text_cache=tmp_path / "c",
                                workers=2, batch_size=2, plots=False)
    assert doc["skipped"] == {"undecodable_image": 1}
    task = doc["tasks"]["long_caption_en"]
    assert task["counts"] == {"n_images": 3, "n_texts": 3, "n_pairs": 3, "n_image_queries": 3, "n_text_queries": 3}
    # left: images a, c, d and texts red (a's), blue (c's), blue (d's); "green" went with b. Ties go to the
    # lower index. I->T: a -> red (hit), c -> c's blue (hit), d -> red (miss).
    # T->I: red -> a (hit), c's blue -> c (hit), d's blue -> c (miss).
    r1 = {k: v for k, v in task["metrics"].items() if k.endswith("@1")}
    assert r1 == {"image_retrieval_recall@1": 2 / 3, "text_retrieval_recall@1": 2 / 3}
    assert task["metrics"]["text_retrieval_recall@5"] == 1.0
