"""The fidelity study (issues 14, 23): its pieces and a smoke run of the whole command on tiny fixtures.

The smoke run trains every arm for 2 steps of 8 images with a 1-block ViT and a 1-block text tower on a
tiny emoji-like manifest and two fake caches (F = 11 FLAME facets, D = 16), evaluates them on the ``emoji``
benchmark with a deterministic fake text embedder standing in for the LLMs, and checks the written files.
Loading an LLM anywhere in it is an error.
"""

from __future__ import annotations

import json
import math
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


README = "# Project\n\n## Fidelity\n\n<!-- fidelity:begin -->\nold text\n<!-- fidelity:end -->\n\n## Next\n"


def test_smoke_study_writes_runs_json_table_plot_and_readme_and_check_passes(study_data, no_llm, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    out = tmp_path / "results"
    cfg = fidelity.StudyConfig(seeds=(3,), steps=2, overrides=tuple(TINY_VIT), runs=tmp_path / "runs", out=out,
                               readme=readme, threads=1, tower=dict(TINY_TOWER))
    doc = fidelity.run_study(cfg, study_data)

    arms = ["flame", "flame_one_prompt", "raw_only", "clip_scratch", "flame_english_llm"]
    assert doc["complete_arms"] == arms and list(doc["arms"]) == arms and doc["incomplete_arms"] == {}
    assert doc["study"]["seeds"] == [3] and doc["study"]["steps"] == 2 and doc["study"]["batch_size"] == 8
    for a in arms:
        v = doc["arms"][a]
        run = json.loads((out / "fidelity" / f"{a}-s3.json").read_text())
        assert run["final_loss"] > 0 and len(run["inputs_hash"]) == 12
        for _, key in fidelity.TABLE:
            m = v["metrics"][key]
            assert m["values"] == [run["metrics"][key]] and m["std"] == 0.0 and 0.0 < v["chance"][key] <= 1.0
        assert {k.split("/")[0] for k in run["metrics"] if k.startswith("multi:")} == {
            "multi:retrieval_en_raw", "multi:retrieval_en_long"}  # English retrieval in both text modes
        assert "single:classification_category/mean_per_class_recall" in run["metrics"]
        de = v["multilingual"]["de"]["i2t"]
        assert de["queries"] == 4 and de["hits"] == round(4 * run["metrics"]["single:multilingual_de/text_retrieval_recall@1"])
    # 2 test emoji (2 texts), 4 test images: R@1 chance of an image query is 1/2
    assert doc["arms"]["flame"]["chance"]["single:retrieval_en_raw/text_retrieval_recall@1"] == pytest.approx(0.5)
    # test split: emoji 4 (Food & Drink) and 5 (Travel & Places), 2 images each
    base = doc["study"]["baselines"]["classification_category"]
    assert base["images"] == 4 and base["most_common_acc1"] == 0.5
    assert [c["id"] for c in doc["claims"]] == [c[0] for c in fidelity.CLAIMS]
    assert all(not t["holds"] and t["p"] == 1.0 for c in doc["claims"] for t in c["tests"].values())  # one seed

    files = {p.name: p.read_bytes() for p in (out / "fidelity").iterdir()} | {
        p.name: p.read_bytes() for p in out.glob("fidelity.*")}
    assert b"/tmp" not in b"".join(files.values()) and str(tmp_path).encode() not in b"".join(files.values())
    md = (out / "fidelity.md").read_text()
    assert all(f"`{a}`" in md for a in arms) and "most common class" in md
    assert (out / "fidelity.png").stat().st_size > 10_000
    text = readme.read_text()
    assert text.startswith("# Project\n\n## Fidelity\n\n<!-- fidelity:begin -->\nTrained on ")
    assert text.endswith("<!-- fidelity:end -->\n\n## Next\n") and "old text" not in text
    assert fidelity.main(["--check", "--out", str(out), "--readme", str(readme)]) == 0

    # a hand edit of any derived file fails the check, naming the file
    (out / "fidelity.md").write_text(md.replace("| `flame` |", "| `flame` | ", 1))
    assert fidelity.check(out, readme) == ["fidelity.md differs from the one rendered from fidelity.json"]
    (out / "fidelity.md").write_text(md)
    readme.write_text(text.replace("Trained on ", "Trained  on "))
    assert fidelity.check(out, readme) == ["README.md's fidelity block differs from the one rendered from fidelity.json"]
    readme.write_text(text)
    run = json.loads((out / "fidelity" / "raw_only-s3.json").read_text())
    run["final_loss"] += 1
    (out / "fidelity" / "raw_only-s3.json").write_text(json.dumps(run))
    assert fidelity.check(out, readme) == ["fidelity.json differs from what the per-run files give"]
    run["final_loss"] -= 1
    (out / "fidelity" / "raw_only-s3.json").write_text(json.dumps(run))
    assert fidelity.check(out, readme) == []

    # which text side each exported model expects, and what each arm's cache holds
    run_dirs = {p.name.split("-s3-")[0]: p for p in (tmp_path / "runs" / "fidelity").glob("*-s3-*")}
    configs = {n: json.loads((d / "train" / "model" / "config.json").read_text()) for n, d in run_dirs.items()}
    assert configs["clip_scratch"]["cache_identity"] is None
    assert configs["clip_scratch"]["text_side"]["kind"] == "text_tower"
    assert configs["flame"]["cache_identity"]["llm"] == fidelity.GEMMA
    assert configs["flame_english_llm"]["cache_identity"]["llm"] == fidelity.SMOLLM
    train_cfgs = {n: json.loads((d / "train" / "train_config.json").read_text()) for n, d in run_dirs.items()}
    assert {n: c["data"]["positives"] for n, c in train_cfgs.items()} == {
        "flame": 6, "flame_one_prompt": 3, "raw_only": 1, "flame_english_llm": 6, "clip_scratch": 6}
    one = CacheReader(train_cfgs["flame_one_prompt"]["data"]["cache"])
    assert one.load_all()[1][0].tolist() == [f in ("raw", FLAME.facets[1], FLAME.facets[4]) for f in FLAME.facets]
    assert not any((d / "train" / "checkpoints").exists() for d in run_dirs.values())

    # a rerun trains nothing and writes the same bytes
    before = (out / "fidelity.json").read_bytes()
    import stage2_train_vision.train as train_mod

    def refuse(*a, **k):
        raise AssertionError("a finished run was trained again")

    orig, train_mod.train = train_mod.train, refuse
    try:
        fidelity.run_study(cfg, study_data)
    finally:
        train_mod.train = orig
    assert (out / "fidelity.json").read_bytes() == before


def test_incomplete_arm_is_not_reported(tmp_path):
    out = tmp_path
    (out / "fidelity").mkdir()
    study = {"arms": ["flame", "raw_only"], "seeds": [0, 1], "steps": 2, "batch_size": 8, "cpu": "x",
             "text_tower": {"layers": 1, "width": 8}, "baselines": {}, "train_config": "c", "overrides": [],
             "train_config_sha256_12": "h", "manifest": "m", "caches": {}, "threads": 1}
    (out / "fidelity" / "study.json").write_text(json.dumps(study))
    rec = {"inputs_hash": "h", "first_loss": 1.0, "final_loss": 0.5, "train_seconds": 1, "eval_seconds": 1,
           "metrics": {"single:x/acc1": 0.5}, "chance": {"single:x/acc1": 0.1}, "task_counts": {}}
    for arm, seed in (("flame", 0), ("flame", 1), ("raw_only", 1)):
        (out / "fidelity" / f"{arm}-s{seed}.json").write_text(json.dumps(rec))
    doc = fidelity.build_document(out)
    assert doc["complete_arms"] == ["flame"] and doc["incomplete_arms"] == {"raw_only": [1]}
    assert doc["arms"]["flame"]["metrics"]["single:x/acc1"]["values"] == [0.5, 0.5] and doc["claims"] == []
    assert "Not reported (seeds unfinished): `raw_only` (1 of 2 seeds)." in fidelity.render_summary(doc)
    assert fidelity.check(out, None) == ["missing fidelity.json, fidelity.md under " + out.name + "/ (run bench/fidelity.py first)"]
    fidelity.write_outputs(doc, out, None, draw=False)
    assert fidelity.check(out, None) == []
    readme = out / "README.md"
    readme.write_text("# no block\n")
    assert fidelity.check(out, readme) == ["README.md has no <!-- fidelity:begin --> ... <!-- fidelity:end --> block"]
    assert fidelity.main(["--check", "--out", str(out), "--readme", str(readme)]) == 1


def _synthetic_study(out: Path, flame: list[float], one_prompt: list[float], reference: str | None = None) -> None:
    """A two-arm study whose names R@5 (multi) per seed are given; every other metric equal."""
    (out / "fidelity").mkdir(parents=True)
    study = {"arms": ["flame", "flame_one_prompt"], "seeds": list(range(len(flame))), "steps": 2, "batch_size": 8,
             "cpu": "x", "text_tower": {"layers": 1, "width": 8}, "baselines": {}, "train_config": "c",
             "overrides": [], "train_config_sha256_12": "h", "manifest": "m", "caches": {}, "threads": 1,
             "reference": reference}
    (out / "fidelity" / "study.json").write_text(json.dumps(study))
    for arm, values in (("flame", flame), ("flame_one_prompt", one_prompt)):
        for seed, v in enumerate(values):
            names_r5, long_r1, cat_mpcr = fidelity.CLAIMS[0][4]  # the prompts claim's primary metrics
            m = {names_r5: v, long_r1: 0.1, cat_mpcr: 0.2}
            rec = {"inputs_hash": "h", "first_loss": 1.0, "final_loss": 0.5, "train_seconds": 1, "eval_seconds": 1,
                   "metrics": m, "chance": dict.fromkeys(m, 0.01), "task_counts": {}}
            (out / "fidelity" / f"{arm}-s{seed}.json").write_text(json.dumps(rec))


def test_reference_study_verdicts_are_compared_per_pre_chosen_metric(tmp_path):
    """The whole-split study names the subset study; each primary metric's verdict is compared (holds in both or
    in neither = same), and the README sentence names the metric that differs."""
    _synthetic_study(tmp_path / "fidelity-subset", [0.3] * 5, [0.2] * 5)      # subset: flame wins every seed
    _synthetic_study(tmp_path, [0.2, 0.3, 0.2, 0.3, 0.2], [0.25] * 5, reference="fidelity-subset")  # mixed
    doc = fidelity.build_document(tmp_path)
    ref = doc["reference"]
    assert ref["name"] == "fidelity-subset" and ref["compared"] == 3 and ref["same"] == 2
    r5 = next(r for r in ref["rows"] if r["metric"] == fidelity.CLAIMS[0][4][0])
    assert r5["reference"]["holds"] and not r5["this"]["holds"] and not r5["same"]
    assert r5["reference"]["mean"] == pytest.approx(0.1) and r5["this"]["mean"] == pytest.approx(-0.01)
    text = fidelity.render_summary(doc)
    assert "gives the same verdict (holds / does not hold) on 2 of 3 pre-chosen metrics, and differs on " \
           "`flame` > `flame_one_prompt` names I→T R@5, multi (here does not hold)." in text
    assert "| `flame` > `flame_one_prompt` | names I→T R@5, multi | -1.0 [" in fidelity.render_markdown(doc)
    fidelity.write_outputs(doc, tmp_path, None, draw=False)
    assert fidelity.check(tmp_path, None) == []


def test_paired_statistics_by_hand():
    assert fidelity.sign_flip_p(np.array([1.0, 1.0, 1.0, 1.0, 1.0])) == 2 / 32
    assert fidelity.sign_flip_p(np.array([3.0, 1.0, 1.0])) == 2 / 8  # only +++ and --- reach |sum| 5
    assert fidelity.sign_flip_p(np.array([1.0, -1.0])) == 1.0
    assert fidelity.bootstrap_ci(np.array([0.1] * 5)) == pytest.approx((0.1, 0.1))
    held = fidelity.paired([0.3, 0.4, 0.3, 0.5, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2])
    assert held["wins"] == 5 and held["p"] == 2 / 32 and held["holds"] and held["mean"] == pytest.approx(0.16)
    assert 0.1 - 1e-12 <= held["ci95"][0] < held["ci95"][1] <= 0.3 + 1e-12  # within the smallest..largest diff
    one_loss = fidelity.paired([0.3, 0.4, 0.3, 0.5, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2])
    assert one_loss["wins"] == 4 and one_loss["p"] > 2 / 32 and not one_loss["holds"]


def test_crops_do_not_depend_on_the_facet_draw():
    """Same sample seed: the same crop whatever P and the facet mask."""
    from stage2_train_vision.config import ImageConfig
    from stage2_train_vision.data.samples import make_sample
    from stage2_train_vision.data.transforms import train_transform

    t = train_transform(ImageConfig(16, crop_scale=(0.3, 1.0)))
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 40, 40), np.uint8))
    vectors = np.random.default_rng(1).normal(size=(11, 4)).astype(np.float32)
    full, one = np.ones(11, bool), np.zeros(11, bool)
    one[0] = True
    samples = [make_sample("k", image, vectors, m, t, p, 1234, 16) for m, p in ((full, 6), (full, 1), (one, 1))]
    assert all(torch.equal(s.image, samples[0].image) for s in samples)
    assert not torch.equal(samples[0].texts[0], samples[1].texts[0]) or not torch.equal(samples[0].texts, samples[2].texts)
    assert not torch.equal(make_sample("k", image, vectors, full, t, 6, 1235, 16).image, samples[0].image)



class _NumpyTorch:
    """Stands in for ``torch`` inside torchvision's ``get_params`` so that it draws from a numpy generator."""

    def __init__(self, rng):
        self.rng = rng

    def tensor(self, x):
        return np.array(x, np.float64)

    log = staticmethod(np.log)

    @staticmethod
    def exp(x):
        return np.array([math.exp(float(x[0]))])

    def empty(self, n):
        outer = self

        class _Uniform:
            def uniform_(self, lo, hi):
                return np.array([outer.rng.uniform(float(lo), float(hi))])

        return _Uniform()

    def randint(self, lo, hi, size):
        return self.rng.integers(lo, hi, size=size)


@pytest.mark.parametrize("shape,scale", [((64, 64), (0.9, 1.0)), ((40, 72), (0.08, 1.0)), ((10, 100), (0.9, 1.0))])
def test_crop_params_equal_torchvision_get_params_on_the_same_draws(monkeypatch, shape, scale):
    import torchvision.transforms.transforms as tvt

    from stage2_train_vision.config import ImageConfig
    from stage2_train_vision.data.transforms import RATIO, train_transform

    t = train_transform(ImageConfig(16, crop_scale=scale))
    ours = [t.crop_params(*shape, np.random.default_rng(s)) for s in range(300)]
    monkeypatch.setattr(tvt, "torch", _NumpyTorch(None))
    theirs = []
    for s in range(300):
        tvt.torch.rng = np.random.default_rng(s)
        theirs.append(tvt.RandomResizedCrop.get_params(torch.empty(3, *shape), list(scale), list(RATIO)))
    assert ours == theirs and len(set(ours)) == (1 if shape == (10, 100) else len(set(ours)))  # fallback: one box
    assert shape == (10, 100) or len(set(ours)) > 50


def test_one_prompt_facets_are_raw_and_facet_1_of_short_and_long():
    assert fidelity.arm_facets(FLAME.facets, fidelity.ONE_PROMPT) == ("raw", FLAME.facets[1], FLAME.facets[4])
    assert FLAME.facets[1].startswith("short.") and FLAME.facets[4].startswith("long.")
    assert fidelity.arm_facets(FLAME.facets, "raw") == ("raw",) and fidelity.arm_facets(FLAME.facets, "cache") is None
    with pytest.raises(KeyError, match="long"):
        fidelity.arm_facets(("raw", "short.a"), fidelity.ONE_PROMPT)


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
    agg = fidelity.aggregate([0.1, 0.3, 0.2])
    assert agg["values"] == [0.1, 0.3, 0.2]
    assert agg["mean"] == pytest.approx(0.2) and agg["std"] == pytest.approx(0.1)
    assert fidelity.aggregate([0.4])["std"] == 0.0


def test_committed_results_match_their_per_run_files_and_the_readme():
    """``bench/fidelity.py --check`` on every committed study: JSON and Markdown are derived from the per-run files;
    the README block from the whole-split round where it is committed (``fidelity-full``), else the subset's."""
    studies = [d for d in (REPO / "bench" / "results" / "fidelity-full", REPO / "bench" / "results")
               if (d / "fidelity" / "study.json").is_file()]
    assert studies, "no committed fidelity study"
    for d in studies:
        assert fidelity.check(d, REPO / "README.md" if d == studies[0] else None) == [], d.name
