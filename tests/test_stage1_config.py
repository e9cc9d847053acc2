"""Stage-1 job arguments: one owner of the defaults and choices, the CLI names, vLLM engine settings reaching the
engine builder (no vLLM needed: the engine class is replaced)."""

import argparse
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import stage1_embed_text.backends as backends
import stage1_embed_text.backends.vllm_backend as vllm_backend
import stage1_embed_text.job as job
from flame_pipeline.cli import build_parser, main
from manifests.schema import ManifestWriter
from stage1_embed_text.backends.vllm_backend import VllmFacetEncoder
from stage1_embed_text.backends.vllm_settings import EngineSettings
from stage1_embed_text.cli import config_from_args, vllm_setting
from stage1_embed_text.config import EmbedConfig, default
from stage1_embed_text.encode.encoder import FacetEncoder
from stage1_embed_text.plan import make_plan


def _config(*argv: str) -> EmbedConfig:
    return config_from_args(build_parser().parse_args(["embed", "--manifest", "m", "--out", "c", *argv]))


def test_cli_defaults_are_embed_config_defaults():
    assert _config() == EmbedConfig(manifest="m", out="c")


def test_encoders_and_planner_take_their_defaults_from_embed_config():
    for fn, names in [(FacetEncoder, ("context_tokens", "max_batch_tokens", "position_mode")),
                      (VllmFacetEncoder, ("context_tokens", "position_mode")), (make_plan, ("shard_rows", "chunk_rows"))]:
        params = inspect.signature(fn).parameters
        assert {n: params[n].default for n in names} == {n: default(n) for n in names}, fn


def test_max_tokens_flag_is_the_batch_budget_and_context_tokens_the_context_length():
    for flag in ("--max-tokens", "--max-batch-tokens"):
        cfg = _config(flag, "256", "--context-tokens", "300")
        assert (cfg.max_batch_tokens, cfg.context_tokens) == (256, 300)
    with pytest.raises(SystemExit):  # still exclusive with --batch-size
        build_parser().parse_args(["embed", "--manifest", "m", "--out", "c", "--max-tokens", "8", "--batch-size", "2"])


def test_vllm_setting_values():
    assert vllm_setting("gpu_memory_utilization=0.9") == ("gpu_memory_utilization", 0.9)
    assert vllm_setting("enforce_eager=true") == ("enforce_eager", True)
    assert vllm_setting("kv_cache_dtype=fp8") == ("kv_cache_dtype", "fp8")
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        vllm_setting("tensor_parallel_size")


def test_engine_settings_from_mapping_sends_unknown_names_to_extra():
    s = EngineSettings.from_mapping({"max_num_seqs": 64, "tensor_parallel_size": 2, "extra": {"seed": 1}})
    assert s.max_num_seqs == 64 and s.extra == {"seed": 1, "tensor_parallel_size": 2}


class _Built(Exception):
    """Raised by the stand-in engine class once it has recorded its arguments."""


def test_vllm_settings_reach_the_engine_builder(monkeypatch):
    seen = {}

    def fake_encoder(llm, **kw):
        seen.update(kw, llm=llm)
        raise _Built

    monkeypatch.setattr(vllm_backend, "VllmFacetEncoder", fake_encoder)
    monkeypatch.setattr(job, "read_manifest_info", lambda manifest: None)  # no manifest needed to build the encoder
    argv = ["embed", "--manifest", "m", "--out", "c", "--backend", "vllm", "--context-tokens", "300",
            "--vllm-setting", "gpu_memory_utilization=0.5", "--vllm-setting", "max_num_seqs=64",
            "--vllm-setting", "tensor_parallel_size=2", "--dtype", "bfloat16"]
    assert _config(*argv[5:-2]).vllm_settings == {"gpu_memory_utilization": 0.5, "max_num_seqs": 64,
                                                "tensor_parallel_size": 2}
    with pytest.raises(_Built):
        main(argv)
    s = seen["settings"]
    assert (s.gpu_memory_utilization, s.max_num_seqs, s.extra) == (0.5, 64, {"tensor_parallel_size": 2})
    assert (s.dtype, seen["context_tokens"], seen["llm"]) == ("bfloat16", 300, default("llm"))
    seen.clear()
    with pytest.raises(_Built):
        config = EmbedConfig(manifest="m", out="c", backend="vllm", vllm_settings={"block_size": 64})
        backends.build_encoder(backends.EncoderSpec.of_config(config), torch.device("cpu"))
    assert (seen["settings"].block_size, seen["settings"].device) == (64, "cpu")


@pytest.mark.parametrize(("flags", "device", "expected"), [
    (["avx2"], "cpu", "float32"),                      # AVX2-only: bf16 is emulated, ~10x slower than float32
    (["avx2", "avx512f", "avx512_bf16"], "cpu", "bfloat16"),
    (["avx2", "amx_bf16"], torch.device("cpu"), "bfloat16"),
])
def test_auto_dtype_is_resolved_once_for_the_jobs_device(flags, device, expected, monkeypatch):
    """``dtype="auto"`` (the default) becomes the spec's concrete dtype, which the cache identity records;
    an explicit dtype is kept whatever the machine."""
    import pipeline.machine as machine

    monkeypatch.setattr(machine, "cpu_info", lambda: {"model": "x", "flags": flags, "logical_cores": 2})
    assert EmbedConfig(manifest="m", out="c").dtype == "auto"
    assert backends.EncoderSpec.of_config(EmbedConfig(manifest="m", out="c"), device).dtype == expected
    assert backends.EncoderSpec.of_config(EmbedConfig(manifest="m", out="c", dtype="float32"), device).dtype == "float32"


def test_plan_only_and_the_command_line_do_not_import_torch(tmp_path):
    """`flame --help` builds every parser and `flame embed --plan-only` plans: neither needs torch."""
    w = ManifestWriter(tmp_path / "m", {"name": "test", "args": {}})
    for i in range(3):
        w.add({"key": f"k{i}", "raw_caption": f"thing {i % 2}", "short_caption": None, "long_caption": None,
               "split": "train"})
    w.close()
    argv = ["embed", "--manifest", str(tmp_path / "m"), "--out", str(tmp_path / "c"), "--plan-only", "--no-progress"]
    code = (f"import sys; from flame_pipeline.cli import main; rc = main({argv!r}); "
            "heavy = [m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules]; "
            "print('heavy:', heavy); sys.exit(rc or (3 if heavy else 0))")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 samples -> 3 keys -> 2 rows" in done.stdout and (tmp_path / "c" / "plan" / "plan.json").exists()
