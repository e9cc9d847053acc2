"""The `flame` command: every subcommand has help; bad input ends in one line and exit code 2, not a traceback."""

import pytest

from pipeline.cli import build_parser, main


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
    import stage1_embed_text.job as job

    def fail(*a, **k):
        raise AssertionError("the LLM must not be loaded for a missing manifest")

    monkeypatch.setattr(job, "build_encoder", fail)
    assert main(["embed", "--manifest", str(tmp_path / "none"), "--out", str(tmp_path / "c")]) == 2
    assert "is not a finished manifest" in capsys.readouterr().err


def test_other_errors_keep_their_traceback(monkeypatch):
    import pipeline.inspect_cli as inspect_cli

    def boom(args):
        raise RuntimeError("a bug, not bad input")

    monkeypatch.setattr(inspect_cli, "run", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["inspect", "x"])
