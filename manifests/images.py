"""The project's one image decoder: bytes -> checked RGB image, and a manifest row -> its image.

Manifest builders use :func:`decode_image` to decide whether an image is decodable; stage 2 and eval use
:func:`load_image` to open a row's image. Both go through the same checks, so an image that passed the
manifest build opens the same way at training time.

A row references its image in one of three ways (SPEC §4, ``manifests.schema``):

=============================  =======================================================================
``image_bytes`` set            decode the bytes
``image_path`` + ``image_member``  read the member from the tar ``image_path`` (the *first* member of that
                               name; tar shards may repeat a name, and manifests keep the first copy)
``image_path`` only            read the file
=============================  =======================================================================

Relative paths are relative to the manifest directory.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from manifests.schema import ManifestError

log = logging.getLogger(__name__)

WHITE = (255, 255, 255)


class UndecodableImageError(ValueError):
    """Bytes that PIL cannot fully decode: not an image, an unknown format, or truncated data."""


def decode_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decode encoded image bytes completely and return an RGB image.

    The bytes are checked twice: ``Image.verify()`` (format structure, PNG checksums) and a full ``load()``
    on a fresh handle (catches truncated data, which ``verify`` lets through for JPEG). Images with an alpha
    channel or palette transparency are composited on white.

    Args:
        data: the encoded file (JPEG, PNG, WebP, ...).
        name: how error messages name the image (a path, a tar member, a key).

    Returns:
        a loaded PIL image in mode ``"RGB"`` (uint8, 3 channels), size as encoded.

    Raises:
        UndecodableImageError: PIL cannot identify or fully decode the bytes.
    """
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # PIL signals bad input with many types (OSError, SyntaxError, struct.error, ...)
        raise UndecodableImageError(f"cannot decode image {name}: {exc}") from exc
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


class _TarMemberReader:
    """Random-access reads of tar members, keeping the last ``max_open`` tar handles open (LRU).

    Each handle carries an index ``member name -> first TarInfo of that name``; a truncated tar is indexed up
    to the damage. Thread-safe; a forked child
    process drops the inherited handles (a shared file offset would corrupt reads) and opens its own.
    """

    def __init__(self, max_open: int = 8):
        self.max_open = max_open
        self._lock = threading.Lock()
        self._open: OrderedDict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = OrderedDict()
        self._pid = os.getpid()

    def read(self, tar_path: Path, member: str) -> bytes:
        """Bytes of ``member`` in ``tar_path``. Raises FileNotFoundError if the tar or the member is absent."""
        with self._lock:
            if os.getpid() != self._pid:
                self._open = OrderedDict()
                self._pid = os.getpid()
            handle, index = self._handle(str(tar_path))
            info = index.get(member)
            if info is None:
                raise FileNotFoundError(f"member {member!r} not found in tar {tar_path}")
            return handle.extractfile(info).read()

    def _handle(self, path: str) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        handle = tarfile.open(path, mode="r:")
        index: dict[str, tarfile.TarInfo] = {}
        try:
            for info in handle:
                if info.isreg():
                    index.setdefault(info.name, info)
        except tarfile.ReadError as exc:
            log.warning("tar %s ends early (%s); the members before the damage stay readable", path, exc)
        self._open[path] = (handle, index)
        if len(self._open) > self.max_open:
            _, (old, _) = self._open.popitem(last=False)
            old.close()
        return handle, index


_TARS = _TarMemberReader()


def read_image_bytes(row: Mapping[str, Any], manifest_dir: str | Path) -> bytes:
    """The encoded image bytes a manifest row references (see the module docstring).

    Raises:
        ManifestError: the row has neither ``image_bytes`` nor ``image_path``.
        FileNotFoundError: the referenced file or tar member does not exist.
    """
    if row.get("image_bytes") is not None:
        return row["image_bytes"]
    path = row.get("image_path")
    if not path:
        raise ManifestError(f"manifest row {row.get('key')!r} has no image reference")
    full = Path(path) if os.path.isabs(path) else Path(manifest_dir) / path
    member = row.get("image_member")
    if member:
        return _TARS.read(full, member)
    return full.read_bytes()


def load_image(row: Mapping[str, Any], manifest_dir: str | Path) -> Image.Image:
    """Open a manifest row's image as a PIL RGB image (uint8, 3 channels, alpha composited on white).

    Args:
        row: a manifest row (``key``, ``image_path``, ``image_member``, ``image_bytes``), e.g. from
            :func:`manifests.schema.iter_rows`.
        manifest_dir: the manifest directory, against which relative ``image_path`` values resolve.

    Raises:
        ManifestError: the row has no image reference.
        FileNotFoundError: the referenced file or tar member does not exist.
        UndecodableImageError: the bytes do not decode (names the key and the reference).
    """
    data = read_image_bytes(row, manifest_dir)
    where = row.get("image_path") or "inline bytes"
    if row.get("image_member"):
        where = f"{where}:{row['image_member']}"
    return decode_image(data, name=f"{row.get('key')!r} ({where})")
