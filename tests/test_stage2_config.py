"""Stage-2 config checked when it loads (each bad value: one line, exit 2, through the real CLI) and the launcher's
settings winning over the TOML (mixed precision, process count)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

from flame_pipeline.cli import main as flame_main
from stage2_train_vision.config import ConfigError, config_problems, load_config
from stage2_train_vision.run.launch import check_world, resolve_mixed_precision
from stage2_train_vision.train import train
from tests.helpers.stage2_data import key, make_cache, make_manifest, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
MISSING_TRACKER = next((t for t in sorted(LOGGER_TYPE_TO_CLASS) if t not in {str(x) for x in get_available_trackers()}),
                       None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2cfg")
    make_manifest(root / "m", n=12, n_test=4)
    make_cache(root / "c", [key(i) for i in range(12)])
    return root


BAD = [
    ("optim.lr=-1", "optim.lr = -1.0: must be a number >= 0"),
    ("optim.lr=nan", "optim.lr = nan: must be a number >= 0"),
    ("train.grad_accum=0", "train.grad_accum = 0: must be at least 1"),
    ("loss.kind=hinge", "loss.kind = 'hinge': must be one of sigmoid, infonce"),
    ("train.mixed_precision=fp8", "train.mixed_precision = 'fp8': must be one of launcher, auto, no, bf16, fp16"),
    ("train.max_steps=-5", "train.max_steps = -5: must be at least 0 (0 = train.epochs)"),
    ("train.epochs=0", "train.max_steps = 0 and train.epochs = 0: the run would train 0 steps"),
    ("data.expect={lm = \"gemma\"}", "data.expect: 'lm' is not a cache identity field (known: llm, llm_fingerprint, "
     "tokenizer, layer, readout, dim, prompt_set, prompt_set_hash, facets, position_mode, bos_marker, max_tokens, "
     "dtype_compute, dtype_stored, backend, tokenization)"),
    ("data.positives=0", "data.positives = 0: must be at least 1"),
    ("data.mode=fast", "data.mode = 'fast': must be one of auto, memory, stream"),
    ("data.crop_scale=[0.9, 0.5]", "data.crop_scale = [0.9, 0.5]: must be 0 < min <= max <= 1"),
    ("optim.betas=[0.9, 1.0]", "optim.betas = [0.9, 1.0]: must be two numbers in [0, 1)"),
    ("train.seed=-1", "train.seed = -1: must be in [0, 2^32)"),
    ("train.log_every=0", "train.log_every = 0: must be at least 1"),
    ("model.img_size=30", "model.img_size = 30 is not a multiple of model.patch_size = 8"),
    ("model.max_logit_scale=5", "model.max_logit_scale = 5.0: must be at least model.init_logit_scale"),
    ("train.log_with=tensorflowboard", "train.log_with: unknown tracker 'tensorflowboard' (Accelerate knows: aim, "
     "clearml, comet_ml, dvclive, mlflow, swanlab, tensorboard, trackio, wandb)"),
    ("train.eval_every=2", "train.eval_split = '': train.eval_every needs a held-out manifest split other than "
     "data.split = 'train' (e.g. test)"),
    ("train.tracker_init={wandb = {entity = \"me\"}}",
     "train.tracker_init has arguments for wandb, which train.log_with does not name"),
]


@pytest.mark.parametrize(("override", "message"), BAD, ids=[b[0] for b in BAD])
def test_each_bad_value_is_one_line_and_exit_2_through_flame_train(data, tmp_path, capsys, override, message):
    overrides = tiny_overrides(data / "m", data / "c", tmp_path / "run", **{"train.epochs": 1})
    rc = flame_main(["train", "--config", str(REPO / "configs" / "demo-cpu.toml"), *overrides,
                     "train.max_steps=0", override])
    assert (rc, capsys.readouterr().err) == (2, f"flame train: {message}\n")
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_an_unknown_timm_model_and_a_missing_tracker_are_refused(data, tmp_path, capsys):
    overrides = tiny_overrides(data / "m", data / "c", tmp_path / "run")
    rc = flame_main(["train", "--config", str(REPO / "configs" / "demo-cpu.toml"), *overrides,
                     "model.name=vit_nonexistent"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("flame train: model.name = 'vit_nonexistent' is not a timm model (e.g. vit_")
    assert err.endswith("timm.list_models() lists them)\n") and err.count("\n") == 1
    if MISSING_TRACKER is None:
        pytest.skip("every Accelerate tracker is installed")
    rc = flame_main(["train", "--config", str(REPO / "configs" / "demo-cpu.toml"), *overrides,
                     f"train.log_with={MISSING_TRACKER}"])
    hint = "pip install 'flame-pipeline[tensorboard]'" if MISSING_TRACKER == "tensorboard" else f"pip install {MISSING_TRACKER}"
    assert (rc, capsys.readouterr().err) == (
        2, f"flame train: train.log_with names {MISSING_TRACKER!r} but it is not installed: {hint}\n")


def test_an_installed_tracker_is_accepted_with_its_init_arguments(monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: ["tensorboard", "wandb"])
    cfg = load_config(None, ["train.log_with=tensorboard", "train.tracker_init={tensorboard = {flush_secs = 5}}",
                             "train.project_name=p1"])
    assert (cfg.train.log_with, cfg.train.tracker_init, cfg.train.project_name) == (
        ["tensorboard"], {"tensorboard": {"flush_secs": 5}}, "p1")
    from stage2_train_vision.run.launch import tracker_init_kwargs

    cfg = load_config(None, ["train.log_with=[\"wandb\"]", "train.output_dir=runs/r7",
                             "train.tracker_init={wandb = {entity = \"me\"}}"])
    assert tracker_init_kwargs(cfg) == {"wandb": {"entity": "me", "name": "r7"}}
    cfg.train.run_name = "named"
    assert tracker_init_kwargs(cfg) == {"wandb": {"entity": "me", "name": "named"}}


def test_several_bad_values_are_named_together_and_the_shipped_configs_are_valid():
    cfg = load_config(None, [])
    cfg.optim.lr, cfg.train.grad_accum = -1.0, 0
    assert config_problems(cfg) == ["optim.lr = -1.0: must be a number >= 0", "train.grad_accum = 0: must be at least 1"]
    for name in ("demo-cpu.toml", "flame-cc3m-vitb16.toml"):
        assert config_problems(load_config(REPO / "configs" / name)) == [], name


@pytest.mark.parametrize(("toml", "env", "expected"), [
    ("launcher", {}, "no"),  # flame train without a launcher
    ("launcher", {"ACCELERATE_MIXED_PRECISION": "fp16"}, "fp16"),  # accelerate launch --mixed_precision fp16
    ("launcher", {"ACCELERATE_MIXED_PRECISION": "BF16"}, "bf16"),
    ("bf16", {}, "bf16"),
    ("bf16", {"ACCELERATE_MIXED_PRECISION": "bf16"}, "bf16"),
])
def test_mixed_precision_takes_the_launchers_unless_the_toml_agrees(toml, env, expected):
    assert resolve_mixed_precision(toml, env) == expected


@pytest.mark.parametrize(("flags", "env", "expected"), [
    (["avx2"], {}, "no"),                               # AVX2-only CPU: bf16 is emulated, train in float32
    (["avx2", "avx512f", "avx512_bf16"], {}, "bf16"),   # native bf16 dot products
    (["avx2", "amx_bf16", "amx_tile"], {}, "bf16"),
    (["avx2"], {"ACCELERATE_MIXED_PRECISION": "bf16"}, "bf16"),  # a launcher's word wins over auto
])
def test_auto_precision_is_bf16_only_where_it_is_native(flags, env, expected, monkeypatch):
    import pipeline.machine as machine
    import stage2_train_vision.run.launch as launch

    monkeypatch.setattr(machine, "cpu_info", lambda: {"model": "x", "flags": flags, "logical_cores": 2})
    monkeypatch.setattr(launch.torch.cuda, "is_available", lambda: False)
    assert resolve_mixed_precision("auto", env) == expected


def test_a_toml_precision_that_contradicts_the_launcher_is_one_line(data, tmp_path, monkeypatch, capsys):
    """As ``accelerate launch --mixed_precision bf16`` sets it: the default TOML value trains in bf16; an explicit
    ``no`` is refused naming both."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    cfg = load_config(None, tiny_overrides(data / "m", data / "c", tmp_path / "a", **{"train.max_steps": 1}))
    assert cfg.train.mixed_precision == "launcher"
    assert train(cfg)["mixed_precision"] == "bf16"
    capsys.readouterr()
    rc = flame_main(["train", "--config", str(REPO / "configs" / "demo-cpu.toml"),
                     *tiny_overrides(data / "m", data / "c", tmp_path / "b", **{"train.mixed_precision": "no"})])
    assert (rc, capsys.readouterr().err) == (2, (
        "flame train: train.mixed_precision = 'no' but accelerate launch asks for 'bf16' (its --mixed_precision flag "
        "or config file; 'no' when neither sets it): remove train.mixed_precision to take the launcher's, or make "
        "them agree\n"))
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert train(load_config(None, tiny_overrides(data / "m", data / "c", tmp_path / "c", **{
        "train.max_steps": 1})))["mixed_precision"] == "no"


def _acc(n: int):
    return types.SimpleNamespace(num_processes=n, distributed_type=types.SimpleNamespace(value="MULTI_CPU"))


def test_a_launch_that_started_fewer_processes_than_asked_is_refused():
    # what `accelerate launch --config_file multi_cpu.yaml` (distributed_type MULTI_CPU, num_processes 2) sets
    # in the one process it starts: MASTER_ADDR/PORT, no WORLD_SIZE
    simple = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": "29500"}
    with pytest.raises(ConfigError, match=r"^accelerate launch was asked for several processes \(it set MASTER_PORT\) "
                                          r"but started only this one"):
        check_world(_acc(1), simple)
    check_world(_acc(2), simple | {"WORLD_SIZE": "2", "RANK": "0"})  # torchrun (--multi_gpu): fine
    check_world(_acc(1), {"ACCELERATE_MIXED_PRECISION": "no"})  # accelerate launch of one process: fine
    check_world(_acc(1), {"MASTER_PORT": "29500"})  # no launcher (a stray variable): fine
    with pytest.raises(ConfigError, match=r"launched as 2 processes \(WORLD_SIZE\) but Accelerate set up 1"):
        check_world(_acc(1), {"WORLD_SIZE": "2"})


def test_a_toml_is_fully_checked_when_it_loads(data, tmp_path, capsys):
    """An unknown loss.kind in the file itself is refused by load_config, not at the first training step."""
    toml = tmp_path / "bad.toml"
    shipped = (REPO / "configs" / "demo-cpu.toml").read_text(encoding="utf-8")
    assert '[loss]\nkind = "sigmoid"\n' in shipped
    toml.write_text(shipped.replace('[loss]\nkind = "sigmoid"\n', '[loss]\nkind = "hinge"\n'), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^loss.kind = 'hinge': must be one of sigmoid, infonce$"):
        load_config(toml)
    rc = flame_main(["train", "--config", str(toml), *tiny_overrides(data / "m", data / "c", tmp_path / "run")])
    assert (rc, capsys.readouterr().err) == (2, "flame train: loss.kind = 'hinge': must be one of sigmoid, infonce\n")
    assert not (tmp_path / "run").exists()
