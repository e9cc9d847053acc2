"""pipeline.atomic: the one owner of "write beside, then rename"."""

import os

import pytest

from pipeline.atomic import atomic_directory, atomic_file, atomic_write_bytes


def test_atomic_file_replaces_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.bin"]  # no temporary left behind
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_atomic_directory_publishes_replaces_or_keeps(tmp_path):
    target = tmp_path / "lookup"
    with atomic_directory(target) as tmp:
        (tmp / "x").write_text("1")
    assert (target / "x").read_text() == "1"
    with atomic_directory(target, keep_existing=True) as tmp:  # another process got there first: theirs stays
        (tmp / "x").write_text("2")
    assert (target / "x").read_text() == "1"
    with atomic_directory(target) as tmp:
        (tmp / "x").write_text("3")
    assert (target / "x").read_text() == "3"
    with pytest.raises(OSError), atomic_directory(target) as tmp:
        (tmp / "x").write_text("4")
        raise OSError("disk full")
    assert (target / "x").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lookup"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_directory_replaces_an_existing_folder_that_the_check_rejects(tmp_path):
    target = tmp_path / "lookup"
    target.mkdir()
    (target / "stale").write_text("from another plan")
    with atomic_directory(target, keep_existing=lambda d: (d / "ok").exists()) as tmp:
        (tmp / "ok").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["ok"]
    with atomic_directory(target, keep_existing=lambda d: (d / "ok").exists()) as tmp:
        (tmp / "ok").write_text("newer")
    assert (target / "ok").read_text() == "new"  # a usable one is kept


def test_keep_existing_inside_the_block_drops_the_new_folder_quietly(tmp_path):
    from pipeline.atomic import KeepExisting

    target = tmp_path / "plan"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("first")
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("second")
        raise KeepExisting
    assert (target / "a").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan"]
