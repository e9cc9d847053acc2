"""bench/caption_path.py's call tracer on a two-module package built here: what counts as an entry point."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import caption_path  # noqa: E402


@pytest.fixture
def pkg(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text(
        "from pkg import b\n"
        "def root(xs):\n    return [b.clean(x) for x in xs] + [helper()]\n"
        "def helper():\n    return b.clean(' h ')\n"
        "def outside():\n    return b.other()\n")
    (tmp_path / "pkg" / "b.py").write_text(
        "def clean(x):\n    return sorted([x.strip()], key=lambda s: inner(s))[0]\n"
        "def inner(s):\n    return s\n"
        "def other():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(caption_path, "ROOT", tmp_path)
    monkeypatch.setattr(caption_path, "PACKAGES", ("pkg",))
    yield importlib.import_module("pkg.a")
    for name in ("pkg", "pkg.a", "pkg.b"):
        sys.modules.pop(name, None)


def test_entry_points_are_distinct_cross_file_edges_and_the_path_is_under_the_roots(pkg):
    tracer = caption_path.CallTracer({("pkg/a.py", "root")})
    sys.setprofile(tracer)
    try:
        pkg.outside()   # executed, but not under a root: only in the "run" view
        pkg.root(["x ", " y", "z"])
    finally:
        sys.setprofile(None)
    doc = tracer.report()
    path = {f["file"]: f["entry_points"] for f in doc["path"]["order"]}
    run = {f["file"]: f["entry_points"] for f in doc["run"]["order"]}
    # three calls of clean from root's list comprehension and one from helper: two distinct edges; the call to
    # inner through the library's sorted() stays inside b.py (a library frame is transparent), so it is no entry
    assert path == {"pkg/a.py": [], "pkg/b.py": ["pkg/a.py:<listcomp> -> clean", "pkg/a.py:helper -> clean"]} or \
        path == {"pkg/a.py": [], "pkg/b.py": ["pkg/a.py:helper -> clean", "pkg/a.py:root -> clean"]}
    assert "pkg/a.py:outside -> other" in run["pkg/b.py"]
    assert [f["file"] for f in doc["run"]["order"]] == ["pkg/a.py", "pkg/b.py"]
    assert doc["path"]["files"] == 2 and doc["path"]["entered_once"] == 1  # a.py (the root) only
