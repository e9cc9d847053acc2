"""Stage 2 under ``accelerate launch --multi_gpu --num_processes 2`` on CPU: one gloo process group, every rank the
same number of steps per epoch with uneven manifest parts (7/7/1 rows), export and checkpoint written.

15 training samples, global batch 4 = 2 processes x 2 images: stream mode gives each process 15 // 2 = 7 rows
(3 batches) and memory mode 15 // 4 = 3 global batches, so every epoch has exactly 3 steps in both modes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.stage2_data import key, make_cache, make_manifest, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240  # a hung collective fails the test instead of hanging it

# Runs under `accelerate launch` in each process: several trainings in one process group (train() keeps the
# distributed setup between calls), each rank writing what it saw.
DRIVER = """
import json, sys
from accelerate import PartialState
from stage2_train_vision.config import load_config
from stage2_train_vision.train import train

out, runs = sys.argv[1], json.loads(sys.argv[2])
for name, overrides in runs.items():
    summary = train(load_config(None, overrides))
    state = PartialState()
    summary["distributed_type"] = state.distributed_type.value
    with open(f"{out}/{name}-rank{state.process_index}.json", "w") as f:
        json.dump(summary, f)
"""

# Trainings one after the other in one process group, each `[name, overrides, resume]`.
RESUME_DRIVER = """
import json, sys
from stage2_train_vision.config import load_config
from stage2_train_vision.train import train

for name, overrides, resume in json.loads(sys.argv[1]):
    train(load_config(None, overrides), resume=resume)
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2mp")
    make_manifest(root / "m", n=15, n_test=0, rows_per_part=7)  # parts of 7, 7 and 1 rows
    make_cache(root / "c", [key(i) for i in range(15)])
    (root / "empty.toml").write_text("")
    return root


def _overrides(data: Path, out: Path, **extra: object) -> list[str]:
    return tiny_overrides(data / "m", data / "c", out, **{"train.batch_size": 4, **extra})


def _launch(args: list[str], log: Path) -> int:
    """``accelerate launch`` two CPU processes (CUDA hidden, ``ACCELERATE_USE_CPU`` unset) and wait for them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), *args]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"2-process training did not finish in {TIMEOUT_S} s (hung?); log: {log.read_text()[-3000:]}")


def test_train_py_uses_gloo_across_two_cpu_processes_and_exports(data, tmp_path):
    """The issue's reproduction: stream, seed 0, 5 epochs (a part permutation once gave a rank 0 rows)."""
    out = tmp_path / "run"
    rc = _launch(["stage2_train_vision/train.py", "--config", str(data / "empty.toml"),
                  *_overrides(data, out, **{"data.mode": "stream", "train.epochs": 5})], tmp_path / "log.txt")
    log = (tmp_path / "log.txt").read_text()
    assert rc == 0, log[-3000:]
    assert log.count("15 samples (stream), 2 processes (MULTI_CPU) x 2 images") == 2  # one line per rank
    summary = json.loads((out / "model" / "config.json").read_text())["train"]
    assert (summary["steps"], summary["total_steps"], summary["epochs"], summary["images"], summary["processes"]) == (
        15, 15, 5.0, 60, 2)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000015"]
    ckpt = out / "checkpoints" / "step-0000015"
    assert json.loads((ckpt / "cache_identity.json").read_text())["llm"] == "test-llm"
    assert {"rng-0.json", "rng-0.safetensors", "rng-1.json", "rng-1.safetensors"} <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "checkpoint.json").read_text())["processes"] == 2
    assert not list((out / "checkpoints").glob(".*"))  # published: no partial folder left


def test_resume_under_two_processes_matches_an_uninterrupted_run(data, tmp_path):
    """Each rank restores its own RNG state from the atomically published checkpoint; a kill is simulated by
    train.stop_at_step, and the resumed run's weights equal the uninterrupted run's bit for bit."""
    from safetensors.torch import load_file

    base = {"data.mode": "memory", "train.epochs": 2, "train.save_every": 2}
    runs = [["full", _overrides(data, tmp_path / "full", **base), None],
            ["part", _overrides(data, tmp_path / "part", **base, **{"train.stop_at_step": 4}), None],
            ["resumed", _overrides(data, tmp_path / "part", **base), "latest"]]
    (tmp_path / "driver.py").write_text(RESUME_DRIVER)
    rc = _launch([str(tmp_path / "driver.py"), json.dumps(runs)], tmp_path / "log.txt")
    assert rc == 0, (tmp_path / "log.txt").read_text()[-3000:]
    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(tmp_path / "part" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_multi_cpu_config_that_starts_one_process_is_refused(data, tmp_path):
    """The issue's case: an accelerate config file with distributed_type MULTI_CPU and num_processes 2 starts one
    process (accelerate's simple launcher); training refuses in one line instead of silently running alone."""
    (tmp_path / "multi_cpu.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 2\nnum_machines: 1\n"
        "machine_rank: 0\nmixed_precision: 'no'\nuse_cpu: true\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "multi_cpu.yaml"),
         "stage2_train_vision/train.py", "--config", str(data / "empty.toml"), *_overrides(data, tmp_path / "run")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode != 0
    assert ("train.py: accelerate launch was asked for several processes (it set MASTER_PORT) but started only this "
            "one, without a process group;") in proc.stderr
    assert not (tmp_path / "run").exists()


def test_stream_and_memory_give_every_rank_the_same_steps_for_any_seed_and_epochs(data, tmp_path):
    runs = {
        f"{mode}-s{seed}-e{epochs}": _overrides(data, tmp_path / f"{mode}-s{seed}-e{epochs}", **{
            "data.mode": mode, "train.seed": seed, "train.epochs": epochs})
        for mode, seed, epochs in [("stream", 0, 3), ("stream", 1, 3), ("stream", 1, 5), ("memory", 0, 5),
                                   ("memory", 1, 3)]
    }
    (tmp_path / "driver.py").write_text(DRIVER)
    rc = _launch([str(tmp_path / "driver.py"), str(tmp_path), json.dumps(runs)], tmp_path / "log.txt")
    assert rc == 0, (tmp_path / "log.txt").read_text()[-3000:]
    for name in runs:
        epochs = int(name.rsplit("-e", 1)[1])
        ranks = [json.loads((tmp_path / f"{name}-rank{r}.json").read_text()) for r in range(2)]
        for summary in ranks:
            got = (summary["distributed_type"], summary["processes"], summary["steps"], summary["total_steps"],
                   summary["epochs"], summary["images"], summary["stopped"])
            assert got == ("MULTI_CPU", 2, 3 * epochs, 3 * epochs, float(epochs), 12 * epochs, False), name
        assert ranks[0]["final_loss"] == ranks[1]["final_loss"], name  # the loss is reduced over both ranks
        exported = json.loads((tmp_path / name / "model" / "config.json").read_text())["train"]
        assert exported["steps"] == 3 * epochs, name
        assert (tmp_path / name / "checkpoints" / f"step-{3 * epochs:07d}" / "cache_identity.json").exists(), name
