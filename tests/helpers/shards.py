"""Tar shards for tests: webdataset-style archives written member by member."""

import io
import tarfile
from pathlib import Path


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """Write ``members`` (``(name, bytes)``, in order) as a plain tar file at ``path``; returns ``path``."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
