"""Benchmark adapters on tiny fixtures in each published format (issue 5)."""

import io
import json
import logging
import tarfile

import numpy as np
import pytest

from eval.benchmarks import BenchmarkError, load_benchmark
from eval.benchmarks.base import pairs_from_captions
from tests.helpers.eval_fakes import write_emoji_manifest
from tests.helpers.images import png, write_png


def test_pairs_from_captions_dedupe():
    texts, pairs = pairs_from_captions([["a", "b"], ["a"], [None, ""]], dedupe=True)
    assert texts == ["a", "b"] and pairs.tolist() == [[0, 0], [0, 1], [1, 0]]
    texts, pairs = pairs_from_captions([["a", "b"], ["a"]])
    assert texts == ["a", "b", "a"] and pairs.tolist() == [[0, 0], [0, 1], [1, 2]]


def test_karpathy_coco_and_size_warning(tmp_path, caplog):
    imgs = [{"filepath": "val2014", "filename": f"{i}.jpg", "split": s,
             "sentences": [{"raw": f"cap {i} a "}, {"raw": f"cap {i} b"}]} for i, s in enumerate(["test", "test", "train"])]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": imgs}))
    for i in range(3):
        write_png(tmp_path / "val2014" / f"{i}.jpg")
    with caplog.at_level(logging.WARNING):
        b = load_benchmark("coco", tmp_path)
    assert b.counts == {"images": 2, "texts": 4} and b.split == "test"
    task = b.tasks[0]
    assert task.texts[0] == "cap 0 a" and task.pairs.tolist() == [[0, 0], [0, 1], [1, 2], [1, 3]]
    assert task.text_mode == "multi"
    assert b.images[1].open().size == (8, 8)
    assert "published benchmark has 5000" in caplog.text
    with pytest.raises(BenchmarkError, match="strict"):
        load_benchmark("coco", tmp_path, strict=True)


def _tar(path, members: dict[str, bytes]):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_clip_benchmark_wds_retrieval_and_classification(tmp_path):
    r = tmp_path / "flickr"
    _tar(r / "test" / "0.tar", {"s0000000.webp": png(), "s0000000.txt": b"one\ntwo",
                                "s0000001.png": png((0, 255, 0)), "s0000001.txt": b"three"})
    (r / "test" / "nshards.txt").write_text("1\n")
    b = load_benchmark("flickr30k", r)
    assert b.tasks[0].texts == ["one", "two", "three"] and b.tasks[0].pairs.tolist() == [[0, 0], [0, 1], [1, 2]]
    assert b.images[1].open().getpixel((0, 0)) == (0, 255, 0)
    c = tmp_path / "cls"
    _tar(c / "test" / "0.tar", {"a.jpg": png(), "a.cls": b"1", "b.jpg": png(), "b.cls": b"0"})
    (c / "classnames.txt").write_text("cat\ndog\n")
    (c / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    b = load_benchmark("wds", c)
    t = b.tasks[0]
    assert t.classnames == ["cat", "dog"] and t.labels.tolist() == [1, 0] and t.templates == ["a photo of a {c}."]


def test_clip_benchmark_wds_keys_across_shards_and_a_damaged_shard_is_one_line(tmp_path):
    """The shards are read with webdataset's tar iteration: samples in (shard, key) order, a key with a
    directory (``base_plus_ext``), and a truncated shard is a BenchmarkError."""
    from eval.benchmarks.base import BenchmarkError

    r = tmp_path / "coco"
    _tar(r / "test" / "0.tar", {"d/b.png": png((0, 0, 255)), "d/b.txt": b"b", "a.webp": png(), "a.txt": b"a"})
    _tar(r / "test" / "1.tar", {"0.jpg": png((0, 255, 0)), "0.txt": b"first of shard 1"})
    b = load_benchmark("wds", r)
    assert b.tasks[0].texts == ["a", "b", "first of shard 1"]
    assert [i.member for i in b.images] == ["a.webp", "d/b.png", "0.jpg"]
    assert b.images[1].open().getpixel((0, 0)) == (0, 0, 255)
    shard = r / "test" / "1.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(BenchmarkError, match=r"unreadable webdataset shard"):
        load_benchmark("wds", r)


def test_urban1k(tmp_path):
    for i in range(2):
        write_png(tmp_path / "image" / f"{i}.jpg")
        (tmp_path / "caption").mkdir(exist_ok=True)
        (tmp_path / "caption" / f"{i}.txt").write_text(f"long caption {i}\n")
    b = load_benchmark("urban1k", tmp_path)
    assert b.tasks[0].texts == ["long caption 0", "long caption 1"] and b.tasks[0].kind == "long_caption"


def test_sharegpt4v_first_n(tmp_path):
    entries = [{"id": str(i), "image": f"coco/{i}.jpg",
                "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"text {i}"}]}
               for i in range(3)]
    f = tmp_path / "share-captioner_coco_lcs_sam_1246k_1107.json"
    f.write_text(json.dumps(entries))
    from eval.benchmarks.retrieval_sets import sharegpt4v

    b = sharegpt4v(tmp_path, n=2)
    assert b.tasks[0].texts == ["text 0", "text 1"] and b.images[1].path == "coco/1.jpg"


def test_dci(tmp_path):
    root = tmp_path / "densely_captioned_images"
    (root / "annotations").mkdir(parents=True)
    (root / "splits.json").write_text(json.dumps({"train": ["a.json"], "test": ["b.json"]}))
    for n in "ab":
        (root / "annotations" / f"{n}.json").write_text(
            json.dumps({"image": f"{n}.jpg", "short_caption": f"short {n}", "extra_caption": f"extra {n}"}))
        write_png(root / "photos" / f"{n}.jpg")
    b = load_benchmark("dci", tmp_path)
    assert b.tasks[0].texts == ["short a. extra a", "short b. extra b"] and b.split == "all"
    assert b.images[0].open().size == (8, 8)


def test_docci_test_split(tmp_path):
    rows = [{"example_id": "x", "split": "train", "image_file": "x.jpg", "description": "no"},
            {"example_id": "y", "split": "test", "image_file": "y.jpg", "description": "yes "}]
    (tmp_path / "docci_descriptions.jsonlines").write_text("\n".join(json.dumps(r) for r in rows))
    b = load_benchmark("docci", tmp_path)
    assert b.tasks[0].texts == ["yes"] and b.counts["images"] == 1


def test_xm3600_per_language(tmp_path):
    lines = [{"image/key": "k1", "en": {"caption": ["dog", "a dog"]}, "de": {"caption": ["Hund"]}},
             {"image/key": "k2", "en": {"caption": ["cat"]}, "de": {"caption": ["Katze"]}}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    for k in ("k1", "k2"):
        write_png(tmp_path / "images" / f"{k}.jpg")
    b = load_benchmark("xm3600", tmp_path)
    tasks = {t.lang: t for t in b.tasks}
    assert set(tasks) == {"de", "en"} and tasks["de"].texts == ["Hund", "Katze"]
    assert tasks["en"].texts == ["dog", "cat"] and tasks["en"].pairs.tolist() == [[0, 0], [1, 1]]  # first caption
    assert all(t.kind == "multilingual" and t.text_mode == "single" for t in b.tasks)
    assert load_benchmark("xm3600", tmp_path, languages=["de"]).counts["languages"] == 1


def test_class_folder_with_train_probe(tmp_path):
    for split in ("test", "train"):
        for c, col in (("n01_cat", (255, 0, 0)), ("n02_dog", (0, 0, 255))):
            write_png(tmp_path / split / c / "1.png", col)
    (tmp_path / "classnames.txt").write_text("cat\ndog\n")
    assert [t.name for t in load_benchmark("classfolder", tmp_path).tasks] == ["zeroshot_classification"]
    b = load_benchmark("classfolder", tmp_path, linear_probe=True)
    zs, lp = b.tasks
    assert zs.classnames == ["cat", "dog"] and zs.labels.tolist() == [0, 1]
    assert lp.train_ids.tolist() == [2, 3] and lp.test_ids.tolist() == [0, 1]


def test_winoground_and_sugarcrepe(tmp_path):
    w = tmp_path / "wino"
    (w / "images").mkdir(parents=True)
    rows = [{"id": 0, "image_0": "ex_0_img_0", "image_1": "ex_0_img_1", "caption_0": "a b", "caption_1": "b a"}]
    (w / "examples.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for n in ("ex_0_img_0", "ex_0_img_1"):
        write_png(w / "images" / f"{n}.png")
    b = load_benchmark("winoground", w)
    assert b.tasks[0].image_ids.tolist() == [[0, 1]] and b.tasks[0].captions == [("a b", "b a")]
    s = tmp_path / "sugar"
    (s / "images").mkdir(parents=True)
    (s / "swap_obj.json").write_text(json.dumps({"0": {"filename": "x.jpg", "caption": "p", "negative_caption": "n"},
                                                 "1": {"filename": "x.jpg", "caption": "p2", "negative_caption": "n2"}}))
    b = load_benchmark("sugarcrepe", s)
    assert [t.name for t in b.tasks] == ["swap_obj"] and b.tasks[0].image_ids.tolist() == [0, 0]
    assert b.counts == {"swap_obj": 2, "images": 1}


def test_emoji_manifest_tasks(tmp_path):
    write_emoji_manifest(tmp_path / "m")
    b = load_benchmark("emoji", tmp_path / "m", linear_probe=True)
    tasks = {t.name: t for t in b.tasks}
    assert set(tasks) == {"retrieval_en_raw", "retrieval_en_long", "classification_category",
                          "classification_subcategory", "linear_probe_category", "multilingual_de", "multilingual_fr"}
    raw = tasks["retrieval_en_raw"]
    assert raw.texts == ["emoji 0", "emoji 1"] and raw.text_mode == "single"
    assert raw.pairs.tolist() == [[0, 0], [1, 0], [2, 1], [3, 1]]  # both vendors' images match one text
    assert tasks["retrieval_en_long"].text_mode == "multi"
    cat = tasks["classification_category"]
    assert cat.classnames == ["Animals & Nature", "Food & Drink"] and cat.labels.tolist() == [0, 0, 1, 1]
    assert tasks["classification_subcategory"].classnames == ["sub 0", "sub 1"]
    lp = tasks["linear_probe_category"]
    assert len(lp.train_ids) == 4 and b.counts == {"images": 4, "train_images": 4}
    assert np.asarray(b.images[0].open()).shape == (8, 8, 3)
    b = load_benchmark("emoji", tmp_path / "m", languages=["fr"])
    assert [t.name for t in b.tasks if t.name.startswith("multilingual")] == ["multilingual_fr"]
    b = load_benchmark("emoji", tmp_path / "m", languages=["all"])
    assert [t.name for t in b.tasks if t.name.startswith("multilingual")] == ["multilingual_de", "multilingual_fr"]


def test_without_images_keeps_every_task_aligned(caplog):
    from eval.benchmarks.base import (
        Benchmark,
        ClassificationTask,
        ImageRef,
        LinearProbeTask,
        RetrievalTask,
        SugarCrepeTask,
        WinogroundTask,
    )

    # pool 0..5; retrieval gallery = pool 5, 1, 2, 3 at positions 0..3; "x" has no positive (a distractor)
    ret = RetrievalTask("ret", np.array([5, 1, 2, 3]), ["t0", "x", "t2", "t3", "shared"],
                        np.array([[0, 0], [1, 2], [1, 4], [2, 3], [3, 4]]))
    cls = ClassificationTask("cls", np.array([0, 1, 2, 3]), np.array([1, 0, 1, 0]), ["a", "b"], ["{}"])
    wino = WinogroundTask("wino", np.array([[0, 1], [2, 4], [3, 5]]), [("a", "b"), ("c", "d"), ("e", "f")])
    sugar = SugarCrepeTask("sugar", np.array([1, 4, 0]), ["p0", "p1", "p2"], ["n0", "n1", "n2"])
    probe = LinearProbeTask("probe", np.array([4, 5, 2, 3]), np.array([0, 1, 0, 1]), np.array([0, 1]),
                            np.array([1, 0]), ["a", "b"])
    one_class_left = LinearProbeTask("one_class_left", np.array([4, 5]), np.array([0, 1]), np.array([0]),
                                     np.array([0]), ["a", "b"])
    only_1 = ClassificationTask("only_1", np.array([1]), np.array([0]), ["a"], ["{}"])
    bench = Benchmark("b", "test", [ImageRef(name=str(i)) for i in range(6)],
                      [ret, cls, wino, sugar, probe, only_1, one_class_left], counts={"images": 6})
    with caplog.at_level(logging.WARNING):
        kept = bench.without_images({1, 4})
    tasks = {t.name: t for t in kept.tasks}
    assert list(tasks) == ["ret", "cls", "wino", "sugar", "probe"] and kept.counts == {"images": 6}
    assert "b: task only_1 has too few images left after skipping 2; it is not evaluated" in caplog.text
    assert "b: task one_class_left has too few" in caplog.text  # one training class cannot be probed
    r = tasks["ret"]  # pool 1 (position 1) goes with t2; "shared" keeps its pair with pool 3; "x" stays
    assert r.image_ids.tolist() == [5, 2, 3] and r.texts == ["t0", "x", "t3", "shared"]
    assert r.pairs.tolist() == [[0, 0], [1, 2], [2, 3]]
    assert tasks["cls"].image_ids.tolist() == [0, 2, 3] and tasks["cls"].labels.tolist() == [1, 1, 0]
    assert tasks["wino"].image_ids.tolist() == [[3, 5]] and tasks["wino"].captions == [("e", "f")]
    sugar = tasks["sugar"]
    assert (sugar.image_ids.tolist(), sugar.positives, sugar.negatives) == ([0], ["p2"], ["n2"])
    assert tasks["probe"].train_ids.tolist() == [5, 2, 3] and tasks["probe"].train_labels.tolist() == [1, 0, 1]
    assert tasks["probe"].test_ids.tolist() == [0] and tasks["probe"].test_labels.tolist() == [1]
    assert bench.without_images(set()) is bench
    with pytest.raises(BenchmarkError, match="b: no task has images left after skipping 6 of 6 images"):
        bench.without_images(range(6))


def test_a_truncated_annotation_file_is_a_benchmark_error(tmp_path):
    (tmp_path / "dataset_coco.json").write_text('{"images": [{"split": "te')
    (tmp_path / "val2014").mkdir()
    with pytest.raises(BenchmarkError, match="not readable text/JSON"):
        load_benchmark("coco", tmp_path / "dataset_coco.json", image_root=tmp_path)


def test_flame_eval_refuses_a_retrieval_set_without_captions_in_one_line(tmp_path, capsys):
    """Empty captions leave no query: refused when the benchmark loads (exit 2), not by the metrics later."""
    from flame_pipeline.cli import main

    imgs = [{"filename": f"{i}.jpg", "split": "test", "sentences": [{"raw": " "}]} for i in range(2)]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": imgs}))
    for i in range(2):
        write_png(tmp_path / f"{i}.jpg")
    rc = main(["eval", "--model", str(tmp_path / "no-model"), "--benchmark", "coco", "--data", str(tmp_path),
               "--out", str(tmp_path / "out")])
    assert (rc, capsys.readouterr().err) == (
        2, f"flame eval: {tmp_path}/dataset_coco.json: none of the 2 images of split 'test' has a caption\n")
