"""Stage-2 checkpoints under hostile conditions: a kill during a save, a damaged or foreign checkpoint, a pickle
payload, two runs into one folder, and rotation against Accelerate's ``total_limit``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flame_pipeline.cli import main as flame_main
from stage2_train_vision.config import load_config
from stage2_train_vision.run import checkpoint
from stage2_train_vision.run.metrics import read_metrics
from stage2_train_vision.run.run_lock import RunLock
from stage2_train_vision.train import train
from tests.helpers.stage2_data import key, make_cache, make_manifest, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
N = 24  # 20 train + 4 test
# 20 samples, 4 per step: 5 steps per epoch, 10 in all; checkpoints every 2 steps, the newest 2 kept
EXTRA = {"train.batch_size": 4, "train.save_every": 2, "train.keep_checkpoints": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2ckpt")
    make_manifest(root / "m", n=N)
    make_cache(root / "c", [key(i) for i in range(N)], classes=[i % 4 for i in range(N)])
    return root


@pytest.fixture(scope="module")
def full(data, tmp_path_factory):
    """An uninterrupted run of the 10 steps: its exported weights."""
    out = tmp_path_factory.mktemp("full")
    train(_cfg(data, out))
    return load_file(out / "model" / "model.safetensors")


def _cfg(data, out, **kw):
    return load_config(None, tiny_overrides(data / "m", data / "c", out, **{**EXTRA, **kw}))


def _same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_at_any_point_of_a_save_resumes_bit_identically_from_the_last_complete_checkpoint(
        data, full, tmp_path, monkeypatch, caplog):
    """The folder as a kill would leave it at five points of the save of step 4 (copied when the point is
    reached): after this process's RNG state, after the weights (with the optimizer file cut in half, the issue's
    case), after every data file, after checkpoint.json, and after the rename. Each resumes from the newest
    complete checkpoint, naming what it skipped, and ends with the uninterrupted run's weights."""
    out = tmp_path / "run"
    snaps: dict[str, Path] = {}
    points = {"rng-0.safetensors", "model.safetensors", "cache_identity.json", "checkpoint.json", "step-0000004"}

    def snapshot(path):
        if "0000004" in str(path) and path.name in points:
            snaps[path.name] = tmp_path / f"at-{path.name}"
            shutil.copytree(out, snaps[path.name])

    monkeypatch.setattr(checkpoint, "_written", snapshot)
    assert train(_cfg(data, out, **{"train.stop_at_step": 4}))["stopped"]
    monkeypatch.undo()
    assert sorted(snaps) == sorted(points)
    partial = snaps["model.safetensors"] / "checkpoints" / ".step-0000004.partial"
    (partial / "optimizer.safetensors").write_bytes(b"\0" * 100)  # the kill came in the middle of this file
    for point, folder in snaps.items():
        ckpts = folder / "checkpoints"
        if point == "step-0000004":  # published, the older ones not yet rotated
            assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002", "step-0000004"]
        else:
            assert sorted(p.name for p in ckpts.iterdir()) == [".step-0000004.partial", "step-0000002"]
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            resumed = train(_cfg(data, folder), resume="latest")
        assert resumed["steps"] == 10, point
        assert _same_weights(full, load_file(folder / "model" / "model.safetensors")), point
        skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
        assert skipped == ([] if point == "step-0000004" else [
            f"--resume: skipping {ckpts / '.step-0000004.partial'}, a checkpoint whose save was interrupted"]), point
        assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000008", "step-0000010"], point
        assert [r["step"] for r in read_metrics(folder / "metrics.jsonl")] == list(range(1, 11)), point


def test_a_damaged_published_checkpoint_is_skipped_by_resume_and_refused_by_resume_from(data, full, tmp_path,
                                                                                        caplog, capsys):
    out = tmp_path / "run"
    train(_cfg(data, out, **{"train.stop_at_step": 6, "train.keep_checkpoints": 0}))
    bad = out / "checkpoints" / "step-0000006"
    size = (bad / "optimizer.safetensors").stat().st_size
    with open(bad / "optimizer.safetensors", "r+b") as f:
        f.truncate(size // 2)
    capsys.readouterr()
    rc = flame_main(["train", "--config", str(REPO / "configs" / "demo-cpu.toml"), "--resume-from", str(bad),
                     *tiny_overrides(data / "m", data / "c", out, **EXTRA)])
    assert rc == 2 and capsys.readouterr().err == (
        f"flame train: checkpoint {bad} is incomplete: optimizer.safetensors is {size // 2}, expected {size} bytes\n")
    with caplog.at_level(logging.WARNING):
        assert train(_cfg(data, out), resume="latest")["steps"] == 10
    assert f"--resume: skipping checkpoint {bad} is incomplete: optimizer.safetensors is {size // 2}, expected " \
           f"{size} bytes" in caplog.text
    assert _same_weights(full, load_file(out / "model" / "model.safetensors"))


class _Payload:
    """Unpickling this creates the file ``path`` (harmless stand-in for arbitrary code)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_never_unpickles_a_payload_in_the_checkpoint(data, tmp_path, capsys):
    """A shared checkpoint with Accelerate's ``custom_checkpoint_1.pkl`` holding a ``__reduce__`` payload: resume
    refuses the folder in one line and the payload never runs (torch.load with weights_only=False would run it)."""
    out = tmp_path / "run"
    train(_cfg(data, out, **{"train.stop_at_step": 2}))
    ckpt = out / "checkpoints" / "step-0000002"
    ran = tmp_path / "payload-ran"
    torch.save({"state": _Payload(ran)}, ckpt / "custom_checkpoint_1.pkl")
    for args in (["--resume-from", str(ckpt)], ["--resume"]):
        capsys.readouterr()
        rc = flame_main(["train", "--config", str(REPO / "configs" / "demo-cpu.toml"), *args,
                         *tiny_overrides(data / "m", data / "c", out, **EXTRA)])
        assert rc == 2 and capsys.readouterr().err == (
            f"flame train: checkpoint {ckpt} holds custom_checkpoint_1.pkl, which flame checkpoints never contain "
            "(flame loads only safetensors and JSON, never pickles): refusing to resume from it\n")
        assert not ran.exists()
    assert not (out / "model").exists()
    torch.load(ckpt / "custom_checkpoint_1.pkl", weights_only=False)  # the payload is real: loading it runs it
    assert ran.exists()


def test_checkpoints_hold_no_pickle(data, tmp_path):
    train(_cfg(data, tmp_path, **{"train.stop_at_step": 2}))
    ckpt = tmp_path / "checkpoints" / "step-0000002"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["cache_identity.json", "checkpoint.json", "model.safetensors", "optimizer.json",
                     "optimizer.safetensors", "rng-0.json", "rng-0.safetensors", "scheduler.json", "train_state.json"]
    manifest = json.loads((ckpt / "checkpoint.json").read_text())
    assert (manifest["format"], manifest["step"], manifest["processes"]) == (1, 2, 1)
    assert manifest["files"] == {n: (ckpt / n).stat().st_size for n in names if n != "checkpoint.json"}
    state = json.loads((ckpt / "train_state.json").read_text())
    assert (state["train"]["step"], state["train"]["epoch"], state["train"]["batch"], state["accelerator_step"]) == (
        2, 0, 2, 2)


def test_rotation_keeps_the_same_checkpoints_as_accelerates_total_limit(data, tmp_path):
    """Ours (old ones deleted after the new one is published) and ``ProjectConfiguration(total_limit=2)`` (deleted
    before the new one is written) keep the same two newest of 5 saves."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(
        project_dir=str(tmp_path / "acc"), automatic_checkpoint_naming=True, total_limit=2))
    acc.prepare(torch.nn.Linear(2, 2))
    try:
        for _ in range(5):
            acc.save_state()
    finally:
        AcceleratorState._reset_state()
        GradientState._reset_state()
    theirs = sorted(int(p.name.split("_")[1]) + 1 for p in (tmp_path / "acc" / "checkpoints").iterdir())
    train(_cfg(data, tmp_path / "ours", **{"train.save_every": 1, "train.max_steps": 5}))
    ours = [checkpoint.step_of(p) for p in checkpoint.published(tmp_path / "ours")]
    assert ours == theirs == [4, 5]


HOLDER = """
import sys, time
from stage2_train_vision.run.run_lock import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_run_into_a_folder_in_use_stops_with_one_line_naming_the_holder(data, tmp_path, capsys):
    out = tmp_path / "run"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        args = ["train", "--config", str(REPO / "configs" / "demo-cpu.toml"),
                *tiny_overrides(data / "m", data / "c", out, **{**EXTRA, "train.max_steps": 2})]
        capsys.readouterr()
        rc = flame_main(args)
        started = RunLock(out).holder()["started"]
        assert rc == 2 and capsys.readouterr().err == (
            f"flame train: output folder {out} is in use by process {holder.pid} on {socket.gethostname()} since "
            f"{started} ({out / 'train.lock'}); wait for that run or choose another train.output_dir\n")
        assert sorted(p.name for p in out.iterdir()) == ["train.lock"]  # nothing of the refused run
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: the kernel releases the lock, no stale lock to delete
        holder.wait()
    assert flame_main(args) == 0
    assert RunLock(out).holder()["pid"] == os.getpid()


def test_save_and_load_restore_every_part_exactly_including_an_fp16_scaler(tmp_path):
    """One process, no training loop: weights, AdamW moments and step, schedule, gradient scaler (fp16 runs on
    GPUs), train state, Accelerate's micro-step counter and the Python, NumPy and torch generators come back equal."""
    import random
    import types

    import numpy as np

    def parts(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** (10 + seed))
        acc = types.SimpleNamespace(is_main_process=True, process_index=0, num_processes=1, step=seed,
                                    wait_for_everyone=lambda: None, scaler=scaler)
        return checkpoint.Checkpointed(acc, model, opt, sched, checkpoint.TrainState(step=seed))

    a = parts(1)
    scaler = a.accelerator.scaler
    for _ in range(3):
        scaler.scale(a.model(torch.randn(4, 3)).sum()).backward()
        scaler.step(a.optimizer)
        scaler.update()
        a.optimizer.zero_grad()
        a.scheduler.step()
    scaler.update(new_scale=96.0)
    a.state.history = [[1, 0.5]]
    a.state.step = 7
    path = checkpoint.save_checkpoint(a, tmp_path, keep=0, identity=_identity())
    expect = (random.random(), np.random.rand(), torch.rand(2))
    b = parts(2)
    checkpoint.load_checkpoint(b, path)
    assert (random.random(), np.random.rand()) == expect[:2] and torch.equal(torch.rand(2), expect[2])
    x, y = a.model.state_dict(), b.model.state_dict()
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert json.loads(json.dumps(sa["param_groups"])) == sb["param_groups"]  # betas: a list after JSON
    for pid in sa["state"]:
        assert sa["state"][pid].keys() == sb["state"][pid].keys()
        assert all(torch.equal(sa["state"][pid][k], sb["state"][pid][k]) for k in sa["state"][pid])
    assert a.scheduler.state_dict() == b.scheduler.state_dict()
    assert b.accelerator.scaler.get_scale() == 96.0 and b.accelerator.step == 1
    assert (b.state.step, b.state.history) == (7, [[1, 0.5]])
    assert json.loads((path / "scaler.json").read_text())["scale"] == 96.0
    c = parts(3)
    c.accelerator.num_processes = 2
    with pytest.raises(checkpoint.CheckpointError, match=r"was written by 1 processes and this run has 2: resume "
                                                         r"with the same number of processes"):
        checkpoint.load_checkpoint(c, path)


def _identity():
    from pipeline.cache.store import CacheIdentity

    return CacheIdentity(llm="l", llm_fingerprint="f", tokenizer="t", layer=1, readout="pre_norm", dim=2,
                         prompt_set="flame", prompt_set_hash="h", facets=("a",))


KILLER = """
import json, os, signal, sys
from stage2_train_vision.run import checkpoint
from stage2_train_vision.config import load_config
from stage2_train_vision.train import train

def die(path):  # SIGKILL this process right after the checkpoint of step 4 wrote its weights
    if path.name == "model.safetensors" and path.parent.name == ".step-0000004.partial":
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint._written = die
train(load_config(None, json.loads(sys.argv[1])))
"""


def test_a_real_sigkill_during_a_save_then_resume_matches_an_uninterrupted_run(data, full, tmp_path):
    """The issue's case with a real ``kill -9`` (no cleanup code runs): the weights of step 4 written, its
    optimizer not. The run lock dies with the process, and --resume continues from step 2 bit-identically."""
    out = tmp_path / "run"
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, json.dumps(tiny_overrides(data / "m", data / "c", out,
                                                                                   **EXTRA))],
                          cwd=REPO, env=env, capture_output=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    partial = out / "checkpoints" / ".step-0000004.partial"
    assert sorted(p.name for p in partial.iterdir()) == ["model.safetensors", "rng-0.json", "rng-0.safetensors"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [".step-0000004.partial", "step-0000002"]
    assert train(_cfg(data, out), resume="latest")["steps"] == 10
    assert _same_weights(full, load_file(out / "model" / "model.safetensors"))
