"""The public API (flame_pipeline) on a real pipeline: SmolLM2-135M embeds a small manifest, a tiny ViT trains, and
the exported folder is loaded, used, published as a Hub repo and searched.

Parity: through the API the cache's captions give the cache's vectors; image vectors equal ``flame eval``'s;
``classify`` gives ``flame eval``'s top-1; a plain-transformers recipe (the README's) gives the same text vectors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import flame_pipeline
from eval.benchmarks import load_benchmark
from eval.embedding import TextEncoder, embed_images
from eval.run import evaluate_benchmark, load_model
from flame_pipeline.cli import main as flame_main
from manifests.schema import ManifestWriter
from pipeline.cache import CacheIdentityError, CacheReader
from pipeline.hub import ModelSourceError
from tests.helpers.images import png
from tests.helpers.stage2_data import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
LLM = "smollm2-135m"
CATEGORIES = ["Animals & Nature", "Food & Drink", "Travel & Places"]
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230)]


def _write_manifest(d: Path) -> None:
    """12 samples: 3 colour classes x 4; 8 train, 4 test; captions name the colour class."""
    w = ManifestWriter(d, source={"name": "emoji", "args": {}})
    for i in range(12):
        c = i % 3
        w.add({"key": f"k{i:02d}", "image_bytes": png(COLOURS[c], size=32), "split": "test" if i >= 8 else "train",
               "raw_caption": f"a {['red', 'green', 'blue'][c]} square number {i}",
               "short_caption": f"A square in {['red', 'green', 'blue'][c]}.",
               "long_caption": f"A flat {['red', 'green', 'blue'][c]} square icon, drawn plainly, number {i}.",
               "labels": {"category": CATEGORIES[c], "subcategory": f"sub-{c}"},
               "names": {"en": f"{['red', 'green', 'blue'][c]} square {i}"}})
    w.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    _write_manifest(root / "m")
    assert flame_main(["embed", "--manifest", str(root / "m"), "--out", str(root / "c"), "--llm", LLM,
                       "--no-progress"]) == 0
    assert flame_main(["train", "--config", str(REPO / "configs" / "demo-cpu.toml"),
                       *tiny_overrides(root / "m", root / "c", root / "t", **{
                           "train.mixed_precision": "no", "train.max_steps": 4, "data.mode": "memory",
                           "data.positives": 3})]) == 0
    return root


@pytest.fixture(scope="module")
def model(run):
    return flame_pipeline.load(str(run / "t" / "model"), device="cpu")


@pytest.fixture(scope="module")
def evaluated(run, model, tmp_path_factory):
    """``flame eval``'s code on the test split: (the benchmark, its task results)."""
    tmp = tmp_path_factory.mktemp("eval")
    vision, config, transform = load_model(run / "t" / "model")
    bench = load_benchmark("emoji", run / "m", linear_probe=False)
    enc = TextEncoder(model.text_side(), config["cache_identity"], tmp / "tc")
    results, _ = evaluate_benchmark(bench, vision, transform, enc, tmp / "o", plots=False, batch_size=4)
    return bench, results


def _hub_cache(root: Path, folder: Path, commit: str) -> Path:
    """A Hugging Face hub cache at ``root`` holding ``folder`` as ``someone/flame-tiny`` at ``commit`` (main)."""
    repo = root / "models--someone--flame-tiny"
    (repo / "snapshots" / commit).mkdir(parents=True)
    for f in folder.iterdir():
        (repo / "snapshots" / commit / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def test_cache_captions_give_the_cache_vectors(run, model):
    reader = CacheReader(run / "c")
    store = zarr.open_group(str(run / "c" / "store.zarr"), mode="r")["vectors"][:].astype(np.float32)
    keys = [f"k{i:02d}" for i in range(12)]
    import pyarrow.dataset as ds

    index = ds.dataset(str(run / "c" / "index")).to_table().to_pydict()
    row = dict(zip(index["key"], index["row"], strict=True))
    rows = [row[k] for k in keys]
    import pyarrow.parquet as pq

    m = pq.read_table(run / "m" / "data").to_pydict()
    raw = dict(zip(m["key"], m["raw_caption"], strict=True))
    long = dict(zip(m["key"], m["long_caption"], strict=True))
    single = model.encode_text([raw[k] for k in keys], mode="single").numpy()
    cos_single = (single * store[rows, 0]).sum(1)
    assert single.dtype == np.float32 and single.shape == (12, 576)
    assert np.allclose(np.linalg.norm(single, axis=1), 1, atol=1e-5)
    assert cos_single.min() >= 0.999, cos_single
    multi = model.encode_text([long[k] for k in keys], mode="multi").numpy()
    facets = store[rows, 4:11]
    want = facets.mean(1) / np.linalg.norm(facets.mean(1), axis=1, keepdims=True)
    assert (multi * want).sum(1).min() >= 0.999
    del reader


def test_image_vectors_equal_flame_evals(run, model):
    vision, config, transform = load_model(run / "t" / "model")
    bench = load_benchmark("emoji", run / "m")
    ours = embed_images(vision, bench.images, transform, batch_size=3).embeddings
    paths = []
    for i, ref in enumerate(bench.images):
        p = run / f"img{i}.png"
        ref.open().save(p)
        paths.append(p)
    api = model.encode_image(paths, batch_size=2).numpy()
    assert api.shape == ours.shape and np.abs(api - ours).max() < 1e-6
    batch = torch.stack([model.preprocess(ref.open()) for ref in bench.images])
    assert torch.equal(model.encode_image(batch), torch.from_numpy(api))


def test_classify_gives_flame_evals_top1(run, model, evaluated):
    from eval.benchmarks.emoji import TEMPLATES

    bench, results = evaluated
    cat = next(r for r in results if r.name == "classification_category")
    task = next(t for t in bench.tasks if t.name == "classification_category")
    classifier = model.zero_shot_classifier(task.classnames, TEMPLATES)
    assert classifier.shape == (len(task.classnames), model.dim)
    probs = model.classify([bench.images[i].open() for i in task.image_ids], classifier)
    pred = probs.argmax(1).numpy()
    assert np.array_equal(pred, cat.details.predictions)
    assert float(cat.metrics["acc1"]) == pytest.approx(float((pred == np.asarray(task.labels)).mean()))
    t, b = model.logit_scale, model.logit_bias
    emb = model.encode_image([bench.images[task.image_ids[0]].open()])
    assert torch.allclose(probs[0], torch.sigmoid(t * (emb @ classifier.T) + b)[0], atol=1e-6)
    sim = model.similarity([bench.images[0].open()], ["a red square", "a blue square"])
    assert sim.shape == (1, 2) and float(sim.abs().max()) <= 1.0 + 1e-6


def test_plain_transformers_recipe_gives_the_same_vectors(model):
    """The README's recipe: whole prompt, tokenizer's BOS prepended, hidden_states[layer] at the last token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stage1_embed_text.backends.model_source import embedded_folder
    from stage1_embed_text.encode.tokenization import bos_ids

    ident = model.text_identity
    folder = embedded_folder(LLM)
    tok = AutoTokenizer.from_pretrained(folder)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    caption = "a red square number 3"
    prompt = f'Image description : "{caption}." . After thinking step by step , this image description means in just one word:"'
    ids = tok(prompt, return_tensors="pt")
    # the tokenizer's own leading special tokens (none for SmolLM2, <bos> for Gemma), then the prompt's ids
    assert ids.input_ids[0].tolist() == list(bos_ids(tok)) + tok(prompt, add_special_tokens=False).input_ids
    with torch.no_grad():
        h = lm(**ids, output_hidden_states=True).hidden_states[ident["layer"]][0, -1].float()
    ref = torch.nn.functional.normalize(h, dim=0)
    ours = model.encode_text([caption])[0]
    assert float(ours @ ref) >= 0.999


def test_bad_input_is_one_line(run, model, tmp_path):
    from flame_pipeline.model import InputError

    with pytest.raises(InputError, match="at least one text"):
        model.encode_text([])
    with pytest.raises(InputError, match="blank"):
        model.encode_text(["ok", "  "])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="bad.png"):
        model.encode_image([tmp_path / "bad.png"])
    with pytest.raises(ModelSourceError, match="not a flame model folder"):
        flame_pipeline.load(str(tmp_path))
    with pytest.raises(ModelSourceError, match="no such folder"):
        flame_pipeline.load(str(tmp_path / "nope"))
    with pytest.raises(ModelSourceError, match="not in the local hub cache"):
        flame_pipeline.load("nobody/no-such-flame-model")
    # mismatched text-side weights: the fingerprint names both values
    folder = tmp_path / "m2"
    folder.mkdir()
    for name in ("model.safetensors", "README.md"):
        (folder / name).write_bytes((run / "t" / "model" / name).read_bytes())
    cfg = json.loads((run / "t" / "model" / "config.json").read_text())
    cfg["cache_identity"]["llm_fingerprint"] = "sha256:0000"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CacheIdentityError, match="sha256:0000"):
        flame_pipeline.load(str(folder), device="cpu").encode_text(["a cat"])


def test_folder_is_a_hub_model_repo_and_loads_by_hub_id_offline(run, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    folder = run / "t" / "model"
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "flame-pipeline"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
    config = json.loads((folder / "config.json").read_text())
    assert config["text_encoder"]["kind"] == "embedded" and config["text_encoder"]["name"] == LLM
    assert "flame_pipeline.load(" in card.text
    hub = _hub_cache(tmp_path / "hub", folder, "a" * 40)
    code = ("import flame_pipeline, torch; m = flame_pipeline.load('someone/flame-tiny', device='cpu'); "
            "print(m.folder.name, tuple(m.encode_image(torch.zeros(1, 3, 32, 32)).shape))")
    env = dict(os.environ, HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["a" * 40, "(1,", "576)"]


def test_flame_eval_and_init_from_take_a_hub_id(run, tmp_path, monkeypatch):
    hub = _hub_cache(tmp_path / "hub", run / "t" / "model", "b" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    rc = flame_main(["eval", "--model", "someone/flame-tiny", "--benchmark", "emoji", "--data", str(run / "m"),
                     "--out", str(tmp_path / "e"), "--no-plots", "--text-cache", str(tmp_path / "tc")])
    assert rc == 0
    doc = json.loads((tmp_path / "e" / "results.json").read_text())
    assert doc["cache_identity"]["llm"] == LLM
    rc = flame_main(["train", "--config", str(REPO / "configs" / "demo-cpu.toml"),
                     *tiny_overrides(run / "m", run / "c", tmp_path / "t2", **{
                         "train.mixed_precision": "no", "train.max_steps": 1, "data.mode": "memory",
                         "model.init_from": "someone/flame-tiny"})])
    assert rc == 0


def test_index_and_search_find_an_images_name_at_flame_evals_recall(run, model, evaluated, tmp_path, capsys):
    """flame index over the manifest's test split; flame search with each retrieval text: the top-1 hit rate
    equals flame eval's text->image R@1 on the same images and texts."""
    bench, results = evaluated
    r = next(r for r in results if r.name == "retrieval_en_raw")
    task = next(t for t in bench.tasks if t.name == "retrieval_en_raw")
    index = tmp_path / "idx"
    assert flame_main(["index", str(run / "m"), "--split", "test", "--model", str(run / "t" / "model"),
                       "--out", str(index), "--batch-size", "3"]) == 0
    assert "indexed 4 images" in capsys.readouterr().out
    from flame_pipeline.search import search

    hits = search(model, index, list(task.texts), k=1)
    keys = [bench.images[i].name for i in task.image_ids]
    paired = {(t, keys[i]) for i, t in _image_text_pairs(task)}
    found = np.mean([(ti, h[0]["key"]) in paired for ti, h in enumerate(hits)])
    assert found == pytest.approx(r.metrics["image_retrieval_recall@1"])
    assert flame_main(["search", str(index), task.texts[0], "--k", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in doc[0]["results"]] == [1, 2] and doc[0]["results"][0]["score"] <= 1.0


def _image_text_pairs(task):
    """(image position in task.image_ids, text index) pairs of a retrieval task."""
    pairs = np.asarray(task.pairs)
    return [(int(i), int(t)) for i, t in pairs]


def test_index_skips_undecodable_images_and_refuses_empty_inputs(run, model, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(png((200, 10, 10), size=32))
    (folder / "b.png").write_bytes(b"<html>not an image</html>")
    (folder / "sub").mkdir()
    (folder / "sub" / "c.png").write_bytes(png((10, 10, 200), size=32))
    assert flame_main(["index", str(folder), "--model", str(run / "t" / "model"), "--out", str(tmp_path / "i")]) == 0
    assert "indexed 2 images" in capsys.readouterr().out
    doc = json.loads((tmp_path / "i" / "index.json").read_text())
    assert doc["skipped"] == {"undecodable_image": 1} and doc["count"] == 2
    (tmp_path / "empty").mkdir()
    assert flame_main(["index", str(tmp_path / "empty"), "--model", str(run / "t" / "model"),
                       "--out", str(tmp_path / "i2")]) == 2
    assert "no images found" in capsys.readouterr().err
    assert not (tmp_path / "i2").exists()
    assert flame_main(["search", str(tmp_path / "nope"), "x"]) == 2
    assert "not a flame index" in capsys.readouterr().err


def test_push_card_only_adds_eval_metrics_and_refuses_a_local_text_side(run, tmp_path, capsys):
    from huggingface_hub import ModelCard

    folder = tmp_path / "m"
    folder.mkdir()
    for f in (run / "t" / "model").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"benchmark": "emoji", "split": "test", "tasks": {
        "classification_category": {"type": "classification", "text_mode": "single", "metrics": {"acc1": 0.537}}}}))
    assert flame_main(["push", str(folder), "me/flame-tiny", "--results", str(results), "--card-only",
                       "--dataset", "emoji"]) == 0
    card = ModelCard.load(folder / "README.md")
    (res,) = card.data.eval_results
    assert (res.task_name, res.metric_type, res.metric_value) == ("classification_category", "acc1", 53.7)
    assert card.data.datasets == ["emoji"] and 'flame_pipeline.load("me/flame-tiny")' in card.text
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_encoder"] = {"kind": "local", "path": "/home/me/llm"}
    (folder / "config.json").write_text(json.dumps(cfg))
    assert flame_main(["push", str(folder), "me/flame-tiny", "--card-only"]) == 2
    assert "local path /home/me/llm" in capsys.readouterr().err


def test_load_an_official_flame_checkpoint_file(tmp_path, monkeypatch):
    """An official-format checkpoint (D = 5120, Mistral-Nemo's) loads directly; it is imported once."""
    from tests.test_import_checkpoint import OfficialFlame

    monkeypatch.setenv("FLAME_HOME", str(tmp_path / "home"))
    official = OfficialFlame(64, 1, 16, 32, 5120)
    ckpt = tmp_path / "epoch_32.pt"
    torch.save(official.checkpoint(), ckpt)
    m = flame_pipeline.load(str(ckpt), device="cpu")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(m.encode_image(x), official.official_embedding(x), atol=1e-5)
    assert m.text_identity["llm"] == "mistralai/Mistral-Nemo-Instruct-2407" and m.dim == 5120
    again = flame_pipeline.load(str(ckpt), device="cpu")
    assert again.folder == m.folder and m.folder.parent == tmp_path / "home" / "models" / "imported"


def test_readme_python_example_runs_as_written(run, tmp_path):
    """The README's "Use a trained model" block, verbatim, in a fresh interpreter, on a demo-shaped run folder."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("<!-- api:begin -->"):text.index("<!-- api:end -->")]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    model = tmp_path / "runs" / "demo-artifacts" / "train-0123" / "model"
    model.parent.mkdir(parents=True)
    model.symlink_to(run / "t" / "model", target_is_directory=True)
    examples = tmp_path / "runs" / "demo-20260101-000000" / "examples"
    examples.mkdir(parents=True)
    for i, c in enumerate(COLOURS):
        (examples / f"test_{i}.png").write_bytes(png(c, size=32))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tensor([" in out.stdout and out.stdout.count("\n") >= 4
