"""Stage reuse: same inputs reuse a finished artifact; a failed build leaves nothing marked finished."""

import pytest

from flame_pipeline.demo.artifacts import run_stage


def test_reuse_and_rebuild(tmp_path):
    calls = []

    def build(out):
        calls.append(out)
        (out / "x.txt").write_text("data")
        return {"n": 3}

    first = run_stage(tmp_path, "cache", {"rows": 3}, build)
    again = run_stage(tmp_path, "cache", {"rows": 3}, build)
    other = run_stage(tmp_path, "cache", {"rows": 4}, build)
    assert (first.reused, again.reused, other.reused) == (False, True, False)
    assert again.path == first.path != other.path
    assert again.info == {"n": 3} and len(calls) == 2


def test_failed_build_is_not_marked_finished(tmp_path):
    def broken(out):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_stage(tmp_path, "train", {"a": 1}, broken)
    result = run_stage(tmp_path, "train", {"a": 1}, lambda out: {"ok": True})
    assert result.reused is False and result.info == {"ok": True}
