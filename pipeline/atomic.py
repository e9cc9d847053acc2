"""Atomic writes: a reader sees either the old file or folder or the complete new one, never a partial write.

The one owner of "write under a temporary name beside the target, then rename": every module that publishes a
file or a folder goes through :func:`atomic_file`, :func:`atomic_write_bytes` or :func:`atomic_directory`.
The temporary name starts with ``.`` and lies in the target's folder, so the rename never crosses a file
system, and it is removed when the writer fails.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_file(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends normally it becomes ``path`` (``os.replace``).

    The caller writes the temporary file by name (``pq.write_table(table, tmp)``). With ``fsync`` its bytes
    reach the disk before the rename. The file gets the usual permissions (``0o666`` less the umask). On an
    exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_file`, fsynced)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


class KeepExisting(Exception):
    """Raise inside :func:`atomic_directory` to drop the new folder and leave ``path`` as it is.

    The ``with`` block then ends quietly (the exception does not propagate): for a writer that finds, once
    its work is done, that what is already published should stay (e.g. the same content, or content that
    others already depend on).
    """


@contextmanager
def atomic_directory(path: str | Path, *, keep_existing: bool | Callable[[Path], bool] = False) -> Iterator[Path]:
    """Yield a new empty folder beside ``path``; when the block ends normally it is renamed to ``path``.

    Args:
        path: the folder to publish.
        keep_existing: what to do when ``path`` exists by then (another process published the same content
            first): ``True`` keeps that one and drops ours; ``False`` (default) replaces it with ours; a
            function of the existing folder keeps it when it returns ``True`` (it is complete and usable) and
            replaces it otherwise (a stale or broken copy).

    The folder is readable like a download (``0o777`` less the umask, not ``mkdtemp``'s ``0o700``). On an
    exception the temporary folder is removed and ``path`` is untouched; :class:`KeepExisting` does the same
    without propagating.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(mode=0o777 & ~_umask())
    try:
        yield tmp
        try:
            os.rename(tmp, path)
        except OSError:  # path exists and is not empty
            if keep_existing is True or (callable(keep_existing) and keep_existing(path)):
                shutil.rmtree(tmp, ignore_errors=True)
                return
            shutil.rmtree(path, ignore_errors=True)
            os.rename(tmp, path)
    except KeepExisting:
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
