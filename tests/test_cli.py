"""The `flame` command: every subcommand has help; bad input ends in one line and exit code 2, not a traceback."""

import pytest

from flame_pipeline.cli import build_parser, main


@pytest.mark.parametrize("command", ["manifest", "embed", "train", "eval", "inspect", "demo", "import"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: flame" in capsys.readouterr().out


def test_unknown_config_key_is_one_line(capsys):
    assert main(["train", "--config", "configs/demo-cpu.toml", "optim.lrr=1e-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flame train: unknown key optim.lrr") and "Traceback" not in err


def test_missing_config_file_is_one_line(capsys):
    assert main(["train", "--config", "configs/nope.toml"]) == 2
    assert "nope.toml" in capsys.readouterr().err


def test_embed_refuses_a_missing_manifest_before_loading_the_llm(tmp_path, capsys, monkeypatch):
    import stage1_embed_text.backends as backends

    def fail(*a, **k):
        raise AssertionError("the LLM must not be loaded for a missing manifest")

    monkeypatch.setattr(backends, "build_encoder", fail)
    assert main(["embed", "--manifest", str(tmp_path / "none"), "--out", str(tmp_path / "c")]) == 2
    assert "is not a finished manifest" in capsys.readouterr().err


def test_other_errors_keep_their_traceback(monkeypatch):
    import flame_pipeline.inspect_cli as inspect_cli

    def boom(args):
        raise RuntimeError("a bug, not bad input")

    monkeypatch.setattr(inspect_cli, "run", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["inspect", "x"])


def test_every_user_facing_error_is_one_flame_error():
    """One base class: the CLI catches FlameError once, so each module's input error must derive from it."""
    from eval.benchmarks.base import BenchmarkError
    from eval.embedding import EmbedderError
    from eval.ranking import RankingBackendError
    from eval.run import ModelConfigError
    from flame_pipeline.imports.checkpoint import CheckpointImportError
    from manifests.common import DuplicateKeyError
    from manifests.images import ImageTooLargeError, UndecodableImageError
    from manifests.schema import ManifestError
    from pipeline.assets import AssetError
    from pipeline.cache.store import CacheError, CacheIdentityError, CacheKeyError
    from pipeline.errors import FlameError, is_user_error
    from stage1_embed_text.backends.vllm_settings import VllmUnavailableError
    from stage1_embed_text.config import EmbedConfigError
    from stage1_embed_text.encode.tokenization import TokenizerError
    from stage2_train_vision.config import ConfigError
    from stage2_train_vision.data.samples import DataError
    from stage2_train_vision.export import ExportError
    from stage2_train_vision.run.checkpoint import CheckpointError

    classes = [BenchmarkError, ModelConfigError, DuplicateKeyError, ImageTooLargeError, UndecodableImageError,
               ManifestError, AssetError, CacheError, CacheIdentityError, TokenizerError, VllmUnavailableError,
               ConfigError, DataError, CheckpointImportError, CheckpointError, CacheKeyError, EmbedConfigError,
               ExportError, EmbedderError, RankingBackendError]
    assert [c.__name__ for c in classes if not issubclass(c, FlameError)] == []
    assert is_user_error(FileNotFoundError("x")) and not is_user_error(RuntimeError("bug"))


def test_a_refusal_inside_a_subcommand_is_one_line_exit_2(tmp_path, capsys):
    """`flame eval` used to catch its own errors and `flame inspect` returned 1; now main() owns the policy."""
    (tmp_path / "model").mkdir()
    code = main(["eval", "--model", str(tmp_path / "model"), "--benchmark", "emoji", "--data", str(tmp_path),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("flame eval: ") and err.count("\n") == 1
    assert main(["inspect", str(tmp_path / "no-cache")]) == 2
    assert capsys.readouterr().err.startswith("flame inspect: ")


def test_demo_defaults_point_at_real_files_and_help_does_not_load_torch():
    import subprocess
    import sys

    from flame_pipeline.demo.config import DemoConfig
    from pipeline.asset_list import DEFAULT_LLM

    assert DemoConfig().train_config.is_file() and DemoConfig().llm == DEFAULT_LLM
    code = ("import sys; from flame_pipeline.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'timm', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("argv", [
    ["embed", "--manifest", "s3://bucket/cc3m", "--out", "CACHE"],
    ["embed", "--manifest", "MANIFEST", "--out", "gs://bucket/cache", "--plan-only"],
    ["inspect", "s3://bucket/cache"],
])
def test_a_url_for_a_manifest_or_cache_is_refused_in_one_line(argv, tmp_path, capsys, monkeypatch):
    """Manifests and caches are memory-mapped: a URL is refused (not silently created as a local 's3:' folder)."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is a URL" in err and "s3fs/gcsfuse" in err and err.count("\n") == 1
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "gs:").exists()


def test_file_urls_are_paths(tmp_path):
    from pipeline.cache.files import CacheFiles

    assert CacheFiles(f"file://{tmp_path}/c").root == tmp_path / "c"


@pytest.mark.parametrize("extra, message", [
    (["--split", "nosuch"], "has no rows of split 'nosuch'"),
    (["--limit", "0"], "limit=0: must be at least 1"),
    (["--max-batch-tokens", "0"], "max_batch_tokens=0: must be at least 1"),
    (["--shard-rows", "64", "--chunk-rows", "48"], "shard_rows=64, chunk_rows=48: need chunk_rows >= 1 dividing"),
])
def test_embed_refuses_values_that_cannot_work(extra, message, tmp_path, capsys):
    from manifests.schema import ManifestWriter

    w = ManifestWriter(tmp_path / "m", source={"name": "test", "args": {}})
    w.add({"key": "a", "image_path": "a.png", "split": "train", "raw_caption": "a red square"})
    w.close()
    code = main(["embed", "--manifest", str(tmp_path / "m"), "--out", str(tmp_path / "c"), "--plan-only", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_embed_refuses_to_write_into_a_folder_that_is_not_a_cache(tmp_path, capsys):
    from manifests.schema import ManifestWriter

    w = ManifestWriter(tmp_path / "m", source={"name": "test", "args": {}})
    w.add({"key": "a", "image_path": "a.png", "split": "train", "raw_caption": "a red square"})
    w.close()
    code = main(["embed", "--manifest", str(tmp_path / "m"), "--out", str(tmp_path / "m"), "--plan-only"])
    assert code == 2 and "is not empty (data, manifest.json) and is not a flame cache" in capsys.readouterr().err
    assert not (tmp_path / "m" / "plan").exists()


def test_damaged_files_are_one_line_errors(tmp_path, capsys):
    """A truncated meta.json, a config with positives = 0, damaged exported weights, a random .safetensors."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "meta.json").write_text('{"identity": {"llm"')
    assert main(["inspect", str(tmp_path / "cache")]) == 2
    assert "meta.json is damaged" in capsys.readouterr().err
    (tmp_path / "bad.toml").write_text("[data]\npositives = 0\n")
    assert main(["train", "--config", str(tmp_path / "bad.toml")]) == 2
    assert "data.positives = 0: must be at least 1" in capsys.readouterr().err
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model": {"out_dim": 8}}')
    (tmp_path / "model" / "model.safetensors").write_bytes(b"\x00" * 64)
    from stage2_train_vision.export import ExportError, load_exported

    with pytest.raises(ExportError, match="model.safetensors is damaged"):
        load_exported(tmp_path / "model")
    (tmp_path / "random.safetensors").write_bytes(bytes(range(256)) * 4)
    code = main(["import", "checkpoint", str(tmp_path / "random.safetensors"), "--out", str(tmp_path / "m2")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
