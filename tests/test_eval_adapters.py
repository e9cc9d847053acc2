"""Eval adapters on fixtures laid out like the real downloads, following FLAME's protocol (issue 11, parts 2-3)."""

import hashlib
import io
import json
import logging
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eval.benchmarks import BenchmarkError, load_benchmark
from eval.benchmarks.classfolder import DEFAULT_TEMPLATES, imagenet_classnames, openai_imagenet_templates
from eval.benchmarks.retrieval_sets import dci_text
from eval.metrics import duplicate_text_ceiling, retrieval_metrics
from eval.report import build_results, render_markdown
from eval.tasks import fill_template
from tests.helpers.images import png, write_png


# ---------------------------------------------------------------- ImageNet class names and templates (open_clip's)
def test_imagenet_classnames_and_templates():
    names, templates = imagenet_classnames(), openai_imagenet_templates()
    assert len(names) == 1000 and len(templates) == 80
    assert names[:3] == ["tench", "goldfish", "great white shark"] and names[999] == "toilet paper"
    assert names[21] == "kite (bird of prey)" and names[207] == "Golden Retriever"
    assert templates[0] == "a bad photo of a {}." and templates[-1] == "a tattoo of the {}."
    assert all(t.count("{}") == 1 and t.count("{") == 1 for t in templates)
    # sha256 of the lists joined by "\n", computed from open_clip 3.3.0's zero_shot_metadata
    # (IMAGENET_CLASSNAMES; OPENAI_IMAGENET_TEMPLATES rendered with "{}")
    assert hashlib.sha256("\n".join(names).encode()).hexdigest() == \
        "571ae1c583b4be7da87519494c52bf405a46af05d5815627c7a0dee997068b60"
    assert hashlib.sha256("\n".join(templates).encode()).hexdigest() == \
        "4f976686fb651bb5803d4689dcd849f75efe0ef19a3c801355bc9a6f03c8a5af"


def test_lists_are_open_clips():
    meta = pytest.importorskip("open_clip.zero_shot_metadata")
    assert imagenet_classnames() == list(meta.IMAGENET_CLASSNAMES)
    assert [t.format("cat") for t in openai_imagenet_templates()] == [t("cat") for t in meta.OPENAI_IMAGENET_TEMPLATES]


WNIDS = [f"n{i:08d}" for i in range(1440764, 1440764 + 1000)]  # 1000 ids in sorted order, like ImageNet's


def test_imagenet_val_wnid_folders_get_standard_names_and_80_templates(tmp_path, caplog):
    for w in WNIDS:
        (tmp_path / "val" / w).mkdir(parents=True)
    write_png(tmp_path / "val" / WNIDS[0] / "ILSVRC2012_val_00000293.JPEG")
    write_png(tmp_path / "val" / WNIDS[999] / "ILSVRC2012_val_00002138.JPEG")
    (tmp_path / "train" / WNIDS[0]).mkdir(parents=True)  # ignored without linear_probe
    with caplog.at_level(logging.WARNING):
        b = load_benchmark("imagenet", tmp_path, split="val")
    assert "standard ImageNet-1k class names in sorted-id order (n01440764 = 'tench'" in caplog.text
    (task,) = b.tasks
    assert task.classnames == imagenet_classnames() and task.templates == openai_imagenet_templates()
    assert task.labels.tolist() == [0, 999] and b.counts == {"images": 2, "classes": 1000}
    assert "imagenet images: found 2, the published benchmark has 50000" in caplog.text
    # the same tree read as a generic class folder: the names are recognized, so the templates too
    assert load_benchmark("classfolder", tmp_path, split="val").tasks[0].templates == openai_imagenet_templates()


def test_wnid_folders_without_classnames_refused(tmp_path):
    for w in WNIDS[:10]:
        write_png(tmp_path / "val" / w / "a.JPEG")
    with pytest.raises(BenchmarkError, match=r"10 of 10 class folders are WordNet ids \(e.g. n01440764\) and there "
                                             r"is no classnames.txt"):
        load_benchmark("imagenet", tmp_path, split="val")
    (tmp_path / "classnames.txt").write_text("\n".join(f"class {i}" for i in range(10)) + "\n")
    (task,) = load_benchmark("imagenet", tmp_path, split="val").tasks
    assert task.classnames[9] == "class 9" and len(task.templates) == 80
    (tmp_path / "classnames.txt").unlink()
    for d in ("cat_dog", "zebra"):  # other folder names are the class names; a generic folder: 6 templates
        write_png(tmp_path / "plain" / d / "1.png")
    (task,) = load_benchmark("classfolder", tmp_path / "plain").tasks
    assert task.classnames == ["cat dog", "zebra"] and task.templates == DEFAULT_TEMPLATES


# ---------------------------------------------------------------- DCI
def test_dci_flame_text_and_all_splits(tmp_path, caplog):
    root = tmp_path / "densely_captioned_images"
    splits = {"train": ["sa_1.json", "sa_2.json"], "valid": ["sa_3.json"], "test": ["sa_4.json"]}
    (root / "annotations").mkdir(parents=True)
    (root / "splits.json").write_text(json.dumps(splits))
    extra = {1: "A red door.\nIt is old..  Paint peels.</s>", 2: "", 3: "Two dogs</s>run", 4: "\n\n v1.2 ok "}
    for i in range(1, 5):
        ann = {"image": f"sa_{i}.jpg", "short_caption": f"Short {i}.", "extra_caption": extra[i],
               "mask_data": {"0": {"idx": 0, "label": "door", "caption": "x", "parent": -1}}, "mask_keys": ["0"]}
        (root / "annotations" / f"sa_{i}.json").write_text(json.dumps(ann))
        write_png(root / "photos" / f"sa_{i}.jpg")
    with caplog.at_level(logging.WARNING):
        b = load_benchmark("dci", tmp_path)
    assert b.split == "all" and b.counts == {"images": 4, "texts": 4}
    assert b.tasks[0].texts == ["Short 1. A red door. It is old. Paint peels", "Short 2", "Short 3. Two dogs. run",
                                "Short 4. v1. 2 ok"]
    assert [im.name for im in b.images] == ["sa_1.jpg", "sa_2.jpg", "sa_3.jpg", "sa_4.jpg"]
    assert "dci images: found 4, the published benchmark has 7805" in caplog.text  # checked on "all"
    assert load_benchmark("dci", root, split="all").counts["images"] == 4
    valid = load_benchmark("dci", tmp_path, split="valid")
    assert valid.split == "valid" and valid.tasks[0].texts == ["Short 3. Two dogs. run"]
    with pytest.raises(BenchmarkError, match="no split 'val'"):
        load_benchmark("dci", tmp_path, split="val")
    assert dci_text("a.b", "") == "a. b"


# ---------------------------------------------------------------- Crossmodal-3600
def xm_line(key, langs, n_caps=2):
    row = {"image/key": key}
    for lang in langs:
        caps = [f"{lang} {key} caption {j}" for j in range(n_caps)]
        row[lang] = {"caption": caps, "caption/tokenized": [c.lower() for c in caps],
                     "caption/tokenized/lowercase": [c.lower() for c in caps]}
    return json.dumps(row, ensure_ascii=False)


def test_xm3600_first_caption_flat_layout_and_missing_images(tmp_path):
    keys = ["000411001ff7dd4f", "0005e16a4ab8d8c1", "00063ff9d1a5a8b1"]
    (tmp_path / "captions.jsonl").write_text("\n".join(xm_line(k, ["ar", "en", "zh"]) for k in keys) + "\n")
    for k in keys:  # what `tar xzf images.tgz` in DIR gives
        write_png(tmp_path / f"{k}.jpg")
    b = load_benchmark("xm3600", tmp_path)
    assert b.counts == {"images": 3, "languages": 3, "texts_per_language": 3}
    tasks = {t.lang: t for t in b.tasks}
    assert tasks["en"].texts == [f"en {k} caption 0" for k in keys]
    assert tasks["zh"].pairs.tolist() == [[0, 0], [1, 1], [2, 2]]
    assert b.images[1].path == str(tmp_path / f"{keys[1]}.jpg") and b.images[1].open().size == (8, 8)
    assert [t.lang for t in load_benchmark("xm3600", tmp_path, languages=["zh", "ar"]).tasks] == ["zh", "ar"]
    with pytest.raises(BenchmarkError, match=r"no captions in \['xx'\]"):
        load_benchmark("xm3600", tmp_path, languages=["xx"])
    (tmp_path / f"{keys[2]}.jpg").unlink()
    with pytest.raises(BenchmarkError, match=f"1 of 3 images missing \\(first: {keys[2]}.jpg"):
        load_benchmark("xm3600", tmp_path)
    for k in keys:  # the images/ layout
        write_png(tmp_path / "images" / f"{k}.jpg")
    assert load_benchmark("xm3600", tmp_path).images[0].path == str(tmp_path / "images" / f"{keys[0]}.jpg")


def test_xm3600_full_set_has_3600_texts_per_language(tmp_path, caplog):
    keys = [f"{i:016x}" for i in range(3600)]
    lines = [xm_line(k, ["de", "en"], n_caps=1 + i % 3) for i, k in enumerate(keys)]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines))
    (tmp_path / "images").mkdir()
    for k in keys:
        (tmp_path / "images" / f"{k}.jpg").touch()
    with caplog.at_level(logging.WARNING):
        b = load_benchmark("xm3600", tmp_path)
    assert b.counts == {"images": 3600, "languages": 2, "texts_per_language": 3600}
    assert all(len(t.texts) == 3600 and len(t.pairs) == 3600 for t in b.tasks)
    assert "images: found" not in caplog.text and "xm3600 languages: found 2, the published benchmark has 36" in caplog.text
    row = json.loads(lines[7])
    row["de"]["caption"] = []
    lines[7] = json.dumps(row)
    (tmp_path / "captions.jsonl").write_text("\n".join(lines))
    with pytest.raises(BenchmarkError, match="language de has 3599 first captions for 3600 images"):
        load_benchmark("xm3600", tmp_path)


# ---------------------------------------------------------------- Winoground
WINO_SCHEMA = pa.schema([("id", pa.int64()), ("image_0", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                         ("image_1", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                         ("caption_0", pa.string()), ("caption_1", pa.string()), ("tag", pa.string()),
                         ("secondary_tag", pa.string()), ("num_main_preds", pa.int64()),
                         ("collapsed_tag", pa.string())])


def test_winoground_hf_parquet(tmp_path, caplog):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]
    rows = [{"id": e, "image_0": {"bytes": png(colors[2 * e]), "path": None},
             "image_1": {"bytes": png(colors[2 * e + 1]), "path": None},
             "caption_0": f"an old person kisses a young person {e}", "caption_1": f"a young person kisses an old "
             f"person {e}", "tag": "Object", "secondary_tag": "", "num_main_preds": 1, "collapsed_tag": "Object"}
            for e in range(2)]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=WINO_SCHEMA), tmp_path / "data" / "test-00000-of-00001.parquet")
    with caplog.at_level(logging.WARNING):
        b = load_benchmark("winoground", tmp_path)
    (task,) = b.tasks
    assert b.counts == {"examples": 2, "images": 4} and task.image_ids.tolist() == [[0, 1], [2, 3]]
    assert task.captions[1] == ("an old person kisses a young person 1", "a young person kisses an old person 1")
    assert [im.name for im in b.images] == ["ex_0_img_0", "ex_0_img_1", "ex_1_img_0", "ex_1_img_1"]
    assert b.images[2].open().getpixel((0, 0)) == (0, 0, 255) and task.text_mode == "multi"
    assert "winoground examples: found 2, the published benchmark has 400" in caplog.text
    assert load_benchmark("winoground", tmp_path / "data").counts["examples"] == 2
    with pytest.raises(BenchmarkError, match="no Winoground data"):
        load_benchmark("winoground", tmp_path, split="train")


def test_winoground_legacy_layout_under_data(tmp_path):
    d = tmp_path / "data"
    rows = [{"id": 0, "image_0": "ex_0_img_0", "image_1": "ex_0_img_1", "caption_0": "a b", "caption_1": "b a",
             "tag": "Relation", "secondary_tag": "", "num_main_preds": 1, "collapsed_tag": "Relation"}]
    d.mkdir()
    (d / "examples.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    write_png(d / "images" / "ex_0_img_0.png")
    with pytest.raises(BenchmarkError, match="Winoground image ex_0_img_1 not found"):
        load_benchmark("winoground", tmp_path)
    write_png(d / "images" / "ex_0_img_1.png")
    b = load_benchmark("winoground", tmp_path)
    assert b.tasks[0].captions == [("a b", "b a")] and b.images[1].path == str(d / "images" / "ex_0_img_1.png")


# ---------------------------------------------------------------- SugarCrepe
def test_sugarcrepe_swap_obj_245_and_val2017_root(tmp_path, caplog):
    items = {str(i): {"filename": f"{i % 7:012d}.jpg", "caption": f"p {i}", "negative_caption": f"n {i}"}
             for i in range(245)}
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "swap_obj.json").write_text(json.dumps(items))
    with pytest.raises(BenchmarkError, match="pass the COCO val2017 folder as image_root"):
        load_benchmark("sugarcrepe", tmp_path)
    (tmp_path / "val2017").mkdir()
    with caplog.at_level(logging.WARNING):
        b = load_benchmark("sugarcrepe", tmp_path, strict=True)  # 245 is the published size now
    (task,) = b.tasks
    assert b.counts == {"swap_obj": 245, "images": 7} and caplog.text == ""
    assert b.images[3].path == str(tmp_path / "val2017" / "000000000003.jpg")
    assert task.positives[244] == "p 244" and task.negatives[0] == "n 0" and task.image_ids[:8].tolist() == [
        0, 1, 2, 3, 4, 5, 6, 0]
    items["245"] = items["0"]
    (tmp_path / "data" / "swap_obj.json").write_text(json.dumps(items))
    with pytest.raises(BenchmarkError, match="sugarcrepe swap_obj: found 246, the published benchmark has 245"):
        load_benchmark("sugarcrepe", tmp_path, strict=True)
    (tmp_path / "images").mkdir()  # DIR/images wins when present
    assert load_benchmark("sugarcrepe", tmp_path).images[0].path == str(tmp_path / "images" / "000000000000.jpg")


# ---------------------------------------------------------------- DOCCI, Urban-1k
def test_docci_newlines_to_spaces(tmp_path):
    rows = [{"example_id": "test_00000", "split": "test", "image_file": "test_00000.jpg",
             "description": "A wide view.\nA red car\n\nparked. "},
            {"example_id": "train_00000", "split": "train", "image_file": "train_00000.jpg", "description": "no"},
            {"example_id": "qual_dev_00000", "split": "qual_dev", "image_file": "qual_dev_00000.jpg",
             "description": "q"}]
    (tmp_path / "docci_descriptions.jsonlines").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    b = load_benchmark("docci", tmp_path)
    assert b.tasks[0].texts == ["A wide view. A red car  parked."] and b.counts == {"images": 1, "texts": 1}
    assert b.images[0].path == str(tmp_path / "images" / "test_00000.jpg")


def test_urban1k_first_line(tmp_path):
    for i in (1, 2):
        write_png(tmp_path / "Urban1k" / "image" / f"{i}.jpg")
        (tmp_path / "Urban1k" / "caption").mkdir(exist_ok=True)
        (tmp_path / "Urban1k" / "caption" / f"{i}.txt").write_text(f"The street {i} at dusk. \nSecond line {i}\n")
    b = load_benchmark("urban1k", tmp_path / "Urban1k")
    assert b.tasks[0].texts == ["The street 1 at dusk.", "The street 2 at dusk."]
    (tmp_path / "Urban1k" / "caption" / "2.txt").write_text("\nonly a second line\n")
    with pytest.raises(BenchmarkError, match="2.txt: the first line"):
        load_benchmark("urban1k", tmp_path / "Urban1k")


# ---------------------------------------------------------------- CLIP_benchmark webdataset: linear probe
def _tar(path, members):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _wds_split(d, split, labels):
    for shard in range(2):
        members = {}
        for j, y in enumerate(labels[shard::2]):
            key = f"s{shard * 100 + j:07d}"
            members[f"{key}.webp"] = png((40 * y, 0, 0))
            members[f"{key}.cls"] = str(y).encode()
        _tar(d / split / f"{shard}.tar", members)
    (d / split / "nshards.txt").write_text("2\n")


def test_wds_classification_linear_probe_on_train_and_test(tmp_path):
    d = tmp_path / "wds_vtab-cifar10"
    _wds_split(d, "test", [0, 1, 2, 1])
    _wds_split(d, "train", [2, 0, 1, 0, 2, 1])
    (d / "classnames.txt").write_text("airplane\nautomobile\nbird\n")
    (d / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na blurry photo of a {c}.\n")
    b = load_benchmark("wds", d, linear_probe=True)
    zs, lp = b.tasks
    assert zs.labels.tolist() == [0, 2, 1, 1] and zs.templates[1] == "a blurry photo of a {c}."
    assert lp.name == "linear_probe" and lp.test_ids.tolist() == [0, 1, 2, 3] and lp.test_labels.tolist() == [0, 2, 1, 1]
    assert lp.train_ids.tolist() == [4, 5, 6, 7, 8, 9] and lp.train_labels.tolist() == [2, 1, 2, 0, 0, 1]  # shard 0, then 1
    assert b.counts == {"images": 4, "classes": 3, "train_images": 6}
    assert b.images[4].member == "s0000000.webp" and b.images[4].path.endswith("train/0.tar")
    assert b.images[5].open().getpixel((0, 0)) == (40, 0, 0)
    assert len(load_benchmark("wds", d).tasks) == 1  # no probe unless asked
    (d / "classnames.txt").write_text("airplane\nautomobile\n")
    with pytest.raises(BenchmarkError, match="class index 2 outside the 2 class names"):
        load_benchmark("wds", d)


# ---------------------------------------------------------------- part 3: templates, duplicate texts
def test_fill_template_substitutes_once():
    assert fill_template("a photo of a {c}.", "curly {} braces") == "a photo of a curly {} braces."
    assert fill_template("a {} of a {}.", "{c}") == "a {c} of a {c}."
    assert fill_template("itap of a {}.", r"back\1slash") == r"itap of a back\1slash."


def test_duplicate_texts_ceiling_is_what_a_perfect_model_gets():
    texts = ["a dog", "a cat", "a cow", "a cow"]  # images 2 and 3 share one caption text
    pairs = np.array([[0, 0], [1, 1], [2, 2], [3, 3]])
    n_dup, ceiling = duplicate_text_ceiling(texts, pairs)
    assert n_dup == 1 and ceiling == {"text_retrieval_recall@1": 0.75, "image_retrieval_recall@1": 0.75}
    # a perfect model: each image embeds as its caption's vector; identical texts have identical vectors
    vec = {t: v for t, v in zip(["a dog", "a cat", "a cow"], np.eye(3, dtype=np.float32))}
    txt = np.stack([vec[t] for t in texts])
    out = retrieval_metrics(txt.copy(), txt, pairs, ks=(1,), backend="torch")
    assert out.metrics == {"image_retrieval_recall@1": 0.75, "text_retrieval_recall@1": 0.75}
    # several captions per image: image 1 still hits through its unique caption; "x" x3 (2 copies of image 0)
    texts = ["x", "u", "x", "x", "v"]
    pairs = np.array([[0, 0], [1, 1], [1, 2], [0, 3], [2, 4]])
    n_dup, ceiling = duplicate_text_ceiling(texts, pairs)
    assert n_dup == 2 and ceiling == {"text_retrieval_recall@1": 1.0, "image_retrieval_recall@1": 0.8}
    assert duplicate_text_ceiling(["a", "b"], np.array([[0, 0], [1, 1]])) == (
        0, {"text_retrieval_recall@1": 1.0, "image_retrieval_recall@1": 1.0})


def test_duplicate_texts_reported_in_results(tmp_path):
    from eval.benchmarks.base import RetrievalTask
    from eval.embedding import TextEncoder
    from eval.tasks import evaluate_task
    from tests.helpers.eval_fakes import IDENTITY, FakeEmbedder

    task = RetrievalTask("retrieval_en", np.arange(4), ["a dog", "a cat", "a cow", "a cow"],
                         np.array([[0, 0], [1, 1], [2, 2], [3, 3]]), text_mode="single")
    enc = TextEncoder(FakeEmbedder(), IDENTITY, tmp_path / "cache")
    emb = enc.encode(task.texts, "single")  # the perfect image embedding
    r = evaluate_task(task, emb, None, enc, backend="torch")
    assert r.metrics["text_retrieval_recall@1"] == 0.75 and r.metrics["image_retrieval_recall@1"] == 0.75
    doc = build_results("x", "test", "d", {"images": 4}, None, "m", {"cache_identity": IDENTITY}, [r])
    entry = json.loads(json.dumps(doc))["tasks"]["retrieval_en"]
    assert entry["duplicate_texts"] == 1 and entry["r1_ceiling"] == {"text_retrieval_recall@1": 0.75,
                                                                     "image_retrieval_recall@1": 0.75}
    assert entry["counts"]["n_texts"] == 4
    assert ("Duplicate texts: `retrieval_en` has 1 texts identical to an earlier one; they cap R@1 at 75.0 (I→T) "
            "/ 75.0 (T→I) for any model.") in render_markdown(doc)
