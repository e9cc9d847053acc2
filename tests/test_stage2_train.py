"""Stage-2 training end to end on tiny fixtures: CLI, export, learning, exact resume, checkpoint size, refusals."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from flame_pipeline.cli import main as flame_main
from pipeline.cache.store import CacheIdentity, CacheIdentityError
from stage2_train_vision.config import ConfigError, load_config
from stage2_train_vision.data.samples import DataError
from stage2_train_vision.data.transforms import eval_transform
from stage2_train_vision.export import load_exported
from stage2_train_vision.model import FlameVisionModel
from stage2_train_vision.train import main as train_main
from stage2_train_vision.train import resolve_model_config, train
from tests.helpers import stage2_data
from tests.helpers.stage2_data import COLOURS, key, make_cache, make_manifest, png_bytes, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
N = 24  # 20 train + 4 test


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Manifest + cache whose vectors are a fixed random projection of the image's colour class (+ noise)."""
    root = tmp_path_factory.mktemp("s2train")
    make_manifest(root / "m", n=N)
    keys = [key(i) for i in range(N)]
    make_cache(root / "c", keys, classes=[i % len(COLOURS) for i in range(N)])
    return root


def _cfg(data, out, **kw):
    return load_config(None, tiny_overrides(data / "m", data / "c", out, **kw))


def test_flame_train_cli_runs_exports_and_plots(data, tmp_path):
    out = tmp_path / "run"
    rc = flame_main(["train", "--config", str(REPO / "configs" / "demo-cpu.toml"),
                     *tiny_overrides(data / "m", data / "c", out, **{"train.mixed_precision": "no", "train.max_steps": 0})])
    assert rc == 0
    model, config = load_exported(out / "model")
    summary = config["train"]
    assert (summary["steps"], summary["images"], summary["stopped"]) == (4, 32, False)  # 20 // 8 = 2 steps x 2 epochs
    assert summary["final_loss"] < summary["first_loss"]
    assert config["cache_identity"]["llm"] == "test-llm" and config["model"]["out_dim"] == 16
    assert (out / "loss.png").stat().st_size > 1000 and (out / "train_config.json").exists()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 16)


def test_max_steps_fixes_the_run_length_across_epochs(data, tmp_path):
    summary = train(_cfg(data, tmp_path, **{"train.max_steps": 7}))  # 2 steps per epoch
    assert (summary["steps"], summary["total_steps"], summary["epochs"], summary["images"]) == (7, 7, 3.5, 56)


def test_learns_a_synthetic_pairing(data, tmp_path):
    """Images are coloured by class and vectors are a projection of the class: after training, every train image
    retrieves a vector of its own class (a model at init does not)."""
    cfg = _cfg(data, tmp_path, **{"train.epochs": 15, "optim.lr": 3e-3, "optim.warmup_steps": 3, "data.positives": 4})
    summary = train(cfg)
    model, config = load_exported(tmp_path / "model")
    vectors = torch.from_numpy(make_cache(tmp_path / "again", [key(i) for i in range(N)],
                                          classes=[i % len(COLOURS) for i in range(N)])[0])
    centres = F.normalize(vectors[:len(COLOURS)].mean(1), dim=-1)  # class of row r is r % 4

    def accuracy(m):
        tf = eval_transform(config["image"])
        x = torch.stack([tf(Image.open(io.BytesIO(png_bytes(COLOURS[i % 4], i)))) for i in range(N)])
        with torch.no_grad():
            pred = (m(x) @ centres.T).argmax(1)
        return (pred == torch.arange(N) % 4).float().mean().item()

    torch.manual_seed(0)
    untrained = FlameVisionModel(resolve_model_config(cfg.model, 16)).eval()
    assert accuracy(model) == 1.0 and accuracy(untrained) < 1.0
    assert summary["final_loss"] < 0.5 * summary["first_loss"]


@pytest.mark.parametrize(("accum", "save_every", "stop", "checkpoints"), [
    # 20 train samples, 4 per micro-batch: 5 steps per epoch, 10 in all; the run stops after step 8 (epoch 2,
    # batch 3 of 5) with checkpoints at 3 and 6, so resuming from step 6 redoes 7-10
    (1, 3, 8, ["step-0000003", "step-0000006"]),
    # 2 micro-batches per step: 5 -> 4 micro-batches per epoch, 2 steps per epoch, 4 in all; stop after step 3
    (2, 1, 3, ["step-0000001", "step-0000002", "step-0000003"]),
])
def test_resume_after_a_kill_mid_epoch_2_matches_an_uninterrupted_run(data, tmp_path, accum, save_every, stop,
                                                                      checkpoints):
    extra = {"train.batch_size": 4 * accum, "train.grad_accum": accum, "train.save_every": save_every,
             "train.keep_checkpoints": 5}
    full = train(_cfg(data, tmp_path / "full", **extra))
    part = train(_cfg(data, tmp_path / "part", **extra, **{"train.stop_at_step": stop}))
    assert part["stopped"] and part["steps"] == stop and not (tmp_path / "part" / "model").exists()
    assert sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir()) == checkpoints
    resumed = train(_cfg(data, tmp_path / "part", **extra), resume="latest")
    assert resumed["steps"] == full["steps"]
    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(tmp_path / "part" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    _, cfg_full = load_exported(tmp_path / "full" / "model")
    _, cfg_part = load_exported(tmp_path / "part" / "model")
    assert cfg_full["train"]["final_loss"] == cfg_part["train"]["final_loss"]


def test_resume_refuses_a_checkpoint_of_another_cache_before_loading_it(data, tmp_path, monkeypatch, capsys):
    """A run stopped on cache A and resumed on cache B: another LLM of the same D, or another D (whose projector
    would not even load), ends in one line naming both values, exit 2, and no export."""
    keys = [key(i) for i in range(N)]
    make_cache(tmp_path / "other-d", keys, dim=32)
    monkeypatch.setattr(stage2_data, "CacheIdentity",
                        lambda **kw: CacheIdentity(**{**kw, "llm": "other-llm", "llm_fingerprint": "f1"}))
    stage2_data.make_cache(tmp_path / "other-llm", keys)
    out = tmp_path / "run"
    part = train(_cfg(data, out, **{"train.save_every": 1, "train.stop_at_step": 2}))
    assert part["stopped"] and part["steps"] == 2
    ckpt = out / "checkpoints" / "step-0000002"
    assert json.loads((ckpt / "cache_identity.json").read_text()) == {
        "llm": "test-llm", "llm_fingerprint": "f0", "layer": 3, "readout": "pre_norm", "dim": 16,
        "prompt_set": "flame", "prompt_set_hash": "h0", "position_mode": "restart", "tokenization": "split-segments"}
    capsys.readouterr()
    rc = flame_main(["train", "--config", str(REPO / "configs" / "demo-cpu.toml"), "--resume",
                     *tiny_overrides(data / "m", tmp_path / "other-llm", out)])
    err = capsys.readouterr().err
    assert rc == 2 and err == (
        f"flame train: --resume: checkpoint {ckpt} was trained against another cache: cache identity mismatch: "
        "llm: cache has 'other-llm', expected 'test-llm'; llm_fingerprint: cache has 'f1', expected 'f0'\n")
    rc = train_main(["--config", str(REPO / "configs" / "demo-cpu.toml"), "--resume",
                     *tiny_overrides(data / "m", tmp_path / "other-d", out)])
    err = capsys.readouterr().err
    assert rc == 2 and err == (
        f"train.py: --resume: checkpoint {ckpt} was trained against another cache: cache identity mismatch: "
        "dim: cache has 32, expected 16\n")
    assert not (out / "model").exists()
    assert train(_cfg(data, out), resume="latest")["steps"] == 4  # the same cache resumes


def test_checkpoints_hold_only_the_vit_and_projector(data, tmp_path):
    summary = train(_cfg(data, tmp_path, **{"train.save_every": 2, "train.epochs": 1}))
    ckpt = tmp_path / "checkpoints" / f"step-{summary['steps']:07d}"
    n_params = sum(p.numel() for p in load_exported(tmp_path / "model")[0].parameters())
    weights = (ckpt / "model.safetensors").stat().st_size
    total = sum(f.stat().st_size for f in ckpt.iterdir())
    assert 4 * n_params <= weights < 4 * n_params + 16_384  # float32 tensors + the safetensors header
    assert total < 3 * 4 * n_params + 64_000  # weights + two AdamW moments + small state files


def test_refusals_name_the_values(data, tmp_path):
    with pytest.raises(CacheIdentityError, match=r"model.out_dim=32 but the cache's D is 16"):
        train(_cfg(data, tmp_path, **{"model.out_dim": 32}))
    with pytest.raises(CacheIdentityError, match=r"layer: cache has 3, expected 17"):
        train(_cfg(data, tmp_path, **{"data.expect": "{layer = 17}"}))
    with pytest.raises(DataError, match=r"no rows in split 'val'"):
        train(_cfg(data, tmp_path, **{"data.split": "val"}))
    with pytest.raises(ConfigError, match=r"train.batch_size=6 is not divisible by processes x grad_accum = 1 x 4"):
        train(_cfg(data, tmp_path, **{"train.batch_size": 6, "train.grad_accum": 4}))
    with pytest.raises(ConfigError, match="data.cache is not set"):
        train(_cfg(data, tmp_path, **{"data.cache": ""}))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint under"):
        train(_cfg(data, tmp_path / "fresh"), resume="latest")


def test_stream_bf16_accumulation_and_checkpointing_run(data, tmp_path):
    summary = train(_cfg(data, tmp_path, **{
        "data.mode": "stream", "train.mixed_precision": "bf16", "train.grad_accum": 2, "train.batch_size": 8,
        "model.grad_checkpointing": True, "loss.kind": "infonce", "train.epochs": 1}))
    assert summary["steps"] == 2 and summary["images"] == 16  # 20 // 4 = 5 micro-batches -> 4 -> 2 steps
    assert torch.isfinite(torch.tensor(summary["final_loss"]))


def test_training_never_imports_transformers():
    code = ("import sys, stage2_train_vision.train, stage2_train_vision.cli, stage2_train_vision.export; "
            "sys.exit(int(any(m.split('.')[0] in ('transformers', 'stage1_embed_text') for m in sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)}).returncode == 0


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_last_complete_checkpoint(data, tmp_path,
                                                                                          monkeypatch, capsys):
    import errno

    from stage2_train_vision.run import checkpoint

    calls = []

    def full_on_second(path):
        if path.name == "model.safetensors":
            calls.append(path)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_written", full_on_second)
    out = tmp_path / "run"
    rc = flame_main(["train", "--config", str(REPO / "configs" / "demo-cpu.toml"),
                     *tiny_overrides(data / "m", data / "c", out, **{"train.save_every": 1, "train.stop_at_step": 3})])
    captured = capsys.readouterr()
    lines = captured.err.replace("\r", "\n").splitlines()  # the progress bar redraws with carriage returns
    err = [line[line.index("flame train:"):] for line in lines if "flame train:" in line]
    assert rc == 2 and err == [
        f"flame train: no space left on the device writing checkpoint {out / 'checkpoints' / 'step-0000002'}: it was "
        "removed; the last complete one is step-0000001; free space and rerun with --resume"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]
    assert not (out / "model").exists()
