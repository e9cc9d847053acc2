"""Stage 2 on damaged inputs: a cache that fails the cheap part check at open, a non-finite cache vector or loss
(one line, no export), a non-finite model (never exported); and what every run leaves: ``metrics.jsonl`` and the
closing list of where its results are."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from flame_pipeline.cli import main as flame_main
from pipeline.cache.meta import CacheError
from pipeline.cache.store import CacheReader
from pipeline.cache.verify import check_parts
from stage2_train_vision import step as step_module
from stage2_train_vision.config import ModelConfig, load_config
from stage2_train_vision.export import ExportError, export_model, load_exported
from stage2_train_vision.model import FlameVisionModel
from stage2_train_vision.run.metrics import read_metrics
from tests.helpers.stage2_data import key, make_cache, make_manifest, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
N = 40  # 36 train + 4 test; the cache has shards of 16 rows: 0-15, 16-31, 32-39


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2integrity")
    make_manifest(root / "m", n=N)
    make_cache(root / "c", [key(i) for i in range(N)])
    CacheReader(root / "c")  # stores lookup/
    return root


def _train(data: Path, cache: Path, out: Path, capsys, **extra) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = flame_main(["train", "--config", str(REPO / "configs" / "demo-cpu.toml"),
                     *tiny_overrides(data / "m", cache, out, **{"train.mixed_precision": "no", **extra})])
    err = capsys.readouterr().err.replace("\r", "\n").splitlines()  # the progress bar redraws with \r
    return rc, [line[line.index("flame train:"):] for line in err if "flame train:" in line]


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


REDO = (r"; redo only this shard with: rm {c}/done/shard-0000{s}.json && flame embed --manifest MANIFEST --out {c} "
        r"--llm test-llm --layer 3 --readout pre_norm --backend hf --position-mode restart --shard-rows 16 "
        r"--chunk-rows 4 --dtype bfloat16 --context-tokens 1024")
LOOKUP_FIX = r"; delete {c}/lookup \(the next reader rebuilds it from the index parts\)"
DAMAGE = {  # what is done to a copy of the cache -> the one line training stops with (regex)
    "half an index part": (lambda c: _truncate(c / "index/shard-00001.parquet",
                                               (c / "index/shard-00001.parquet").stat().st_size // 2),
                           r"cache {c}: shard 1: index/shard-00001.parquet is damaged \(.+\)" + REDO.replace("{s}", "1")),
    "a mask shard deleted": (lambda c: (c / "store.zarr/mask/c/1/0").unlink(),
                             r"cache {c}: shard 1: store.zarr/mask/c/1/0 is missing" + REDO.replace("{s}", "1")),
    "a vector shard cut to 40 bytes": (lambda c: _truncate(c / "store.zarr/vectors/c/0/0/0", 40),
                                       r"cache {c}: shard 0: store.zarr/vectors/c/0/0/0 is truncated \(40 bytes, its "
                                       r"chunk index alone is 68\)" + REDO.replace("{s}", "0")),
    "a vector shard missing its middle": (
        lambda c: (lambda p, b: p.write_bytes(b[:1000] + b[-68:]))(c / "store.zarr/vectors/c/2/0/0",
                                                                  (c / "store.zarr/vectors/c/2/0/0").read_bytes()),
        r"cache {c}: shard 2: store.zarr/vectors/c/2/0/0 is truncated or damaged \(a chunk lies past its end\)"
        + REDO.replace("{s}", "2")),
    "a flipped byte in a shard's chunk index": (
        lambda c: (lambda p, b: p.write_bytes(b[:-30] + bytes([b[-30] ^ 1]) + b[-29:]))(
            c / "store.zarr/vectors/c/1/0/0", (c / "store.zarr/vectors/c/1/0/0").read_bytes()),
        r"cache {c}: shard 1: store.zarr/vectors/c/1/0/0 has a chunk index that does not match its CRC-32C \(a changed "
        r"byte\)" + REDO.replace("{s}", "1")),
    "a marker with another key count": (
        lambda c: (c / "done/shard-00002.json").write_text(json.dumps({"shard": 2, "rows": [32, 40], "keys": 9})),
        r"cache {c}: shard 2: index/shard-00002.parquet holds 8 keys, its marker recorded 9" + REDO.replace("{s}", "2")),
    "a lookup array cut": (lambda c: _truncate(c / "lookup/rows.npy", 200),
                           r"cache {c}: lookup/rows.npy is damaged \(shape \(40,\), expected \(40,\), complete: False\)"
                           + LOOKUP_FIX),
    "the lookup's keys cut": (lambda c: _truncate(c / "lookup/keys.arrow", 100),
                              r"cache {c}: lookup/keys.arrow is damaged \(.+\)" + LOOKUP_FIX),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_training_refuses_a_cache_that_fails_the_part_check_in_one_line(data, tmp_path, capsys, damage):
    cache = tmp_path / "c"
    shutil.copytree(data / "c", cache)
    do, message = DAMAGE[damage]
    do(cache)
    with pytest.raises(CacheError):
        check_parts(cache)
    rc, err = _train(data, cache, tmp_path / "run", capsys)
    assert rc == 2 and len(err) == 1, err
    assert re.fullmatch("flame train: " + message.format(c=cache), err[0]), err[0]
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_the_part_check_passes_an_intact_cache(data):
    CacheReader(data / "c").check_parts()


def test_a_non_finite_cache_vector_stops_training_naming_its_key(data, tmp_path, capsys):
    cache = tmp_path / "c"
    shutil.copytree(data / "c", cache)
    vectors = zarr.open_group(cache / "store.zarr", mode="r+")["vectors"]
    row = vectors[7]
    row[:, 3] = np.nan  # every facet of k007 (a unit-norm check at write time would have refused this)
    vectors[7] = row
    rc, err = _train(data, cache, tmp_path / "run", capsys, **{"train.save_every": 1})
    assert rc == 2 and len(err) == 1 and err[0].startswith(
        "flame train: the cache vector of key 'k007' is not finite (nan) in the batch of step "), err
    assert err[0].endswith(": the cache is damaged (flame inspect names its bad rows); training stopped, nothing was "
                           "checkpointed or exported at this step")
    step = int(err[0].split("batch of step ")[1].split(":")[0])
    done = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) if step > 1 else []
    assert done == [f"step-{s:07d}" for s in range(max(1, step - 2), step)]  # keep_checkpoints = 2
    assert not (tmp_path / "run" / "model").exists()
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == list(range(1, step))


def test_a_non_finite_loss_stops_at_its_step_and_nothing_is_exported(data, tmp_path, capsys, monkeypatch):
    real, calls = step_module.contrastive_loss, []

    def nan_on_third(*args, **kw):
        calls.append(1)
        loss = real(*args, **kw)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(step_module, "contrastive_loss", nan_on_third)
    rc, err = _train(data, data / "c", tmp_path / "run", capsys, **{"train.save_every": 1})
    assert rc == 2 and err == [
        "flame train: the loss is nan at step 3: training stopped, nothing of this step was saved and no model was "
        "exported; last checkpoint: step-0000002 (lower optim.lr, or check the cache with flame inspect)"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    assert not (tmp_path / "run" / "model").exists()


def test_a_non_finite_model_is_never_exported(tmp_path):
    cfg = ModelConfig(img_size=32, patch_size=8, depth=1, width=32, num_heads=2, proj_hidden=64, out_dim=16)
    model = FlameVisionModel(cfg)
    with torch.no_grad():
        model.projector[0].weight[0, 0] = float("inf")
    with pytest.raises(ExportError, match=r"not exporting to .*: 1 of \d+ weight tensors are not finite \(e.g. "
                                          r"projector.0.weight\); the training diverged"):
        export_model(model, cfg, load_config(None, []).data, {}, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_every_run_writes_metrics_jsonl_and_ends_by_printing_where_its_results_are(data, tmp_path, capsys):
    out = tmp_path / "run"
    rc = flame_main(["train", "--config", str(REPO / "configs" / "demo-cpu.toml"),
                     *tiny_overrides(data / "m", data / "c", out, **{"train.mixed_precision": "no",
                                                                      "train.max_steps": 4})])
    assert rc == 0
    assert capsys.readouterr().out.splitlines()[-5:] == [
        f"metrics:      {out / 'metrics.jsonl'}",
        f"loss plot:    {out / 'loss.png'}",
        f"checkpoint:   {out / 'checkpoints' / 'step-0000004'}",
        "tracker logs: (none: train.log_with is empty)",
        f"model:        {out / 'model'}",
    ]
    records = read_metrics(out / "metrics.jsonl")
    assert [sorted(r) for r in records] == [sorted(["step", "epoch", "images", "loss", "lr", "logit_scale",
                                                    "logit_bias", "images_per_s", "data_wait_s", "step_s"])] * 4
    # 36 train samples, batch 8: 4 steps per epoch; warm-up 2 of 4 steps at lr 1e-3, then the cosine
    assert [(r["step"], r["images"], r["epoch"]) for r in records] == [(1, 8, 0.25), (2, 16, 0.5), (3, 24, 0.75),
                                                                       (4, 32, 1.0)]
    assert [r["lr"] for r in records] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4], rel=1e-12)
    summary = load_exported(out / "model")[1]["train"]
    assert (records[0]["loss"], records[-1]["loss"]) == (summary["first_loss"], summary["final_loss"])
    assert all(abs(r["logit_scale"] - 10) < 0.1 and abs(r["logit_bias"] + 10) < 0.1 for r in records)
    assert all(r["images_per_s"] > 0 and 0 <= r["data_wait_s"] <= r["step_s"] for r in records)


def test_periodic_held_out_recall_is_logged_and_leaves_training_unchanged(data, tmp_path):
    """``train.eval_every = 2`` on the 4 test samples: steps 2 and 4 carry recall@1 equal to a recomputation
    from the exported model, and the weights equal those of the same run without eval, bit for bit."""
    from safetensors.torch import load_file

    from stage2_train_vision.config import ImageConfig
    from stage2_train_vision.run.heldout import HeldOut
    from stage2_train_vision.train import train

    base = {"train.mixed_precision": "no", "train.max_steps": 4}
    train(load_config(None, tiny_overrides(data / "m", data / "c", tmp_path / "plain", **base)))
    cfg = load_config(None, tiny_overrides(data / "m", data / "c", tmp_path / "eval", **base, **{
        "train.eval_every": 2, "train.eval_split": "test"}))
    train(cfg)
    records = read_metrics(tmp_path / "eval" / "metrics.jsonl")
    r1 = [(r["step"], r.get("heldout_r1_image_to_text"), r.get("heldout_r1_text_to_image")) for r in records]
    assert [s for s, a, b in r1 if a is not None and b is not None] == [2, 4]
    held = HeldOut(str(data / "m"), "test", CacheReader(data / "c"), ImageConfig.of(cfg), 512)
    assert held.keys == [key(i) for i in range(36, 40)] and held.texts.shape == (44, 16)  # 4 samples x 11 facets
    model, _ = load_exported(tmp_path / "eval" / "model")
    cpu = types.SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)
    again = held.recall_at_1(model, cpu)
    assert (r1[-1][1], r1[-1][2]) == (again["heldout_r1_image_to_text"], again["heldout_r1_text_to_image"])
    a, b = load_file(tmp_path / "plain" / "model" / "model.safetensors"), load_file(tmp_path / "eval" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trackers_get_the_project_run_name_init_arguments_and_every_log_every_step(data, tmp_path, monkeypatch):
    """Through Accelerate: ``init_trackers(train.project_name, flat config, init_kwargs)`` and ``log(record,
    step)`` every ``train.log_every`` steps (the tracker itself is Accelerate's; here its calls are recorded)."""
    import accelerate.tracking
    from accelerate import Accelerator

    from stage2_train_vision.train import train

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: ["wandb"])
    calls = []
    monkeypatch.setattr(Accelerator, "init_trackers", lambda self, *a, **kw: calls.append(("init", a, kw)))
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, **kw: calls.append(("log", step, values)))
    cfg = load_config(None, tiny_overrides(data / "m", data / "c", tmp_path / "r9", **{
        "train.mixed_precision": "no", "train.max_steps": 4, "train.log_every": 2, "train.log_with": "wandb",
        "train.project_name": "p1", "train.tracker_init": "{wandb = {entity = \"me\"}}"}))
    train(cfg)
    (kind, args, kw), logs = calls[0], calls[1:]
    assert (kind, args, kw["init_kwargs"]) == ("init", ("p1",), {"wandb": {"entity": "me", "name": "r9"}})
    assert kw["config"]["train.project_name"] == "p1" and kw["config"]["optim.lr"] == 1e-3
    records = read_metrics(tmp_path / "r9" / "metrics.jsonl")
    assert [(k, s) for k, s, _ in logs] == [("log", 2), ("log", 4)]
    assert [v for _, _, v in logs] == [{k: v for k, v in records[i].items() if k != "step"} for i in (1, 3)]
