"""Where flame-pipeline keeps downloaded assets, converted models and run outputs; which locations it accepts."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.errors import FlameError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # also after Path() has folded "s3://b" into "s3:/b"


class LocationError(FlameError, ValueError):
    """A manifest or cache location that is not a file-system path (e.g. ``s3://...``)."""


def local_dir(location: str | Path, what: str) -> Path:
    """``location`` as a :class:`Path`, refusing URLs.

    Manifests and caches are read through memory maps and random-access Parquet/Zarr reads, so they must be on a
    file system the process can open and map: a local disk or a shared POSIX file system (NFS, Lustre, a FUSE
    mount such as s3fs or gcsfuse). ``file://`` URLs are accepted and turned into their path; image and tar
    shard references *inside* a manifest may be URLs (webdataset's ``pipe:``, fsspec), that is another matter.

    Args:
        location: a path or a ``file://`` URL.
        what: what the location is, for the message (``"cache"``, ``"manifest"``).

    Raises:
        LocationError: any other URL scheme (``s3://``, ``gs://``, ``http://``...).
    """
    text = str(location)
    if text.startswith("file:/"):
        return Path("/" + text.removeprefix("file:").lstrip("/"))
    if _URL.match(text):
        raise LocationError(
            f"{what} location {text!r} is a URL; {what}s are memory-mapped and must be on a file system "
            "(a local disk, NFS/Lustre, or the bucket mounted with s3fs/gcsfuse)"
        )
    return Path(location)


def flame_home() -> Path:
    """The cache root for everything downloaded or converted (SPEC §8).

    Returns ``$FLAME_HOME`` if set, else ``~/.cache/flame-pipeline``. The directory is created if missing.
    """
    root = Path(os.environ.get("FLAME_HOME") or Path.home() / ".cache" / "flame-pipeline").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def confined_path(root: str | Path, name: str | Path) -> Path | None:
    """``root / name`` if that path stays inside ``root``, else ``None`` (the caller refuses and counts it).

    The check is lexical (``os.path.normpath``), so it holds whether or not the file exists: an absolute
    ``name`` outside ``root``, ``..`` components that climb above ``root``, a NUL byte and an empty name are all
    refused. An absolute ``name`` that lies under ``root`` is accepted. Symbolic links *inside* ``root`` are
    followed as the file system does (whoever owns ``root`` put them there); keys and manifest cells never
    choose where they point.

    Args:
        root: the directory names are relative to (need not exist).
        name: a sample key turned path, or an image path read from a captions/CSV file.
    """
    text = os.fspath(name)
    if not text or "\0" in text:
        return None
    base = os.path.normpath(os.path.abspath(os.fspath(root)))
    full = os.path.normpath(os.path.join(base, text))  # join drops base when text is absolute
    if full != base and not full.startswith(base.rstrip(os.sep) + os.sep):
        return None
    return Path(full)
