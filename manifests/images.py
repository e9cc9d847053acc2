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

What decoding normalises (every image ends as 8-bit RGB, upright):

* **EXIF orientation** is applied (:func:`PIL.ImageOps.exif_transpose`): a phone JPEG stored 40x20 with
  orientation 6 decodes as the 20x40 image the camera saw.
* **More than 8 bits per sample** is scaled by the value range of the PIL mode, never by the image's own
  minimum and maximum, so a stored value always maps to the same 8-bit value:

  ====================  ================================================================================
  ``I;16`` (L/B/N)      unsigned 16-bit: ``v8 = round(v / 257)``, so 0..65535 maps onto 0..255 exactly
                        (16-bit grayscale PNG and TIFF)
  ``I`` (int32)         16-bit data when every value lies in 0..65535 (what many TIFF writers and older
                        Pillow releases store there), scaled as ``I;16``; otherwise 32-bit data,
                        ``v8 = round(v * 255 / (2**31 - 1))`` with negative values clipped to 0
  ``F`` (float32)       intensities in [0, 1] (the float-image convention): ``v8 = round(v * 255)`` after
                        clipping to [0, 1]; NaN becomes 0
  ====================  ================================================================================

  16-bit RGB, RGBA and gray+alpha PNGs arrive from Pillow already reduced to 8 bits (it keeps each
  sample's high byte, ``v // 256``, at most 1 below ``round(v / 257)``) and need nothing more.
* **Transparency** (an alpha channel, palette transparency) is composited on white
  (:func:`composite_on_white`).
* **Decompression bombs**: an image over Pillow's pixel limit (``PIL.Image.MAX_IMAGE_PIXELS`` x 2, about
  179 megapixels by default) is refused before its pixels are read, with :class:`ImageTooLargeError`.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
from PIL import Image, ImageOps

from manifests.schema import ManifestError
from pipeline.errors import FlameError

log = logging.getLogger(__name__)

WHITE = (255, 255, 255)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_INT32_MAX = 2**31 - 1


class UndecodableImageError(FlameError, ValueError):
    """Bytes that PIL cannot fully decode: not an image, an unknown format, or truncated data.

    Attributes:
        reason: the skip reason callers count it under (``"undecodable_image"``; subclasses differ).
    """

    reason = "undecodable_image"


class ImageTooLargeError(UndecodableImageError):
    """An image with more pixels than Pillow's decompression-bomb limit; its pixels are never decoded."""

    reason = "image_too_large"


def decode_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decode encoded image bytes completely and return an upright 8-bit RGB image.

    The bytes are checked twice: ``Image.verify()`` (format structure, PNG checksums) and a full ``load()``
    on a fresh handle (catches truncated data, which ``verify`` lets through for JPEG). Then EXIF orientation
    is applied, samples wider than 8 bits are scaled to 8 bits and transparency is composited on white (see
    the module docstring for the exact rules).

    Args:
        data: the encoded file (JPEG, PNG, WebP, TIFF, ...).
        name: how error messages name the image (a path, a tar member, a key).

    Returns:
        a loaded PIL image in mode ``"RGB"`` (uint8, 3 channels); its size is the encoded one, width and
        height swapped when the EXIF orientation says so.

    Raises:
        ImageTooLargeError: more pixels than Pillow's decompression-bomb limit (message: ``exceeds limit of
            ... pixels``).
        UndecodableImageError: PIL cannot identify or fully decode the bytes, or convert their mode to RGB.
    """
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        image = Image.open(io.BytesIO(data))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(_to_8bit(image))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image {name} is too large to decode: {exc}") from exc
    except Exception as exc:  # PIL signals bad input with many types (OSError, SyntaxError, struct.error, ...)
        raise UndecodableImageError(f"cannot decode image {name}: {exc}") from exc


def _to_8bit(image: Image.Image) -> Image.Image:
    """``image`` itself if its samples are 8-bit, else a mode ``L`` image scaled by the module docstring's rules."""
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        return Image.fromarray(np.rint(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8))
    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.asarray(image).astype(np.int64)
        if image.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            scaled = np.clip(values, 0, _INT32_MAX) * (255 / _INT32_MAX)
            return Image.fromarray(np.rint(scaled).astype(np.uint8))
        return Image.fromarray(((values + 128) // 257).astype(np.uint8))  # round(v / 257): 257 is odd, no ties
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    has_alpha = image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)
    return composite_on_white(image) if has_alpha else image.convert("RGB")


def composite_on_white(image: Image.Image) -> Image.Image:
    """The project's one alpha compositing: ``image`` over a white background, as an RGB image.

    Args:
        image: any mode Pillow converts to ``RGBA`` (RGBA, LA, P with transparency; a mode without alpha
            counts as opaque).

    Returns:
        a new mode ``"RGB"`` image (uint8), same size; per channel ``round((c*a + 255*(255-a)) / 255)``
        exactly (Pillow's masked paste rounds this way for every ``c`` and ``a`` in 0..255).

    Raises:
        ValueError: a mode Pillow cannot convert to RGBA.
    """
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
        """Bytes of ``member`` in ``tar_path``.

        Raises:
            FileNotFoundError: the tar or the member is absent.
            OSError: ``tar_path`` is not a tar file.
            UndecodableImageError: the tar ends inside the member (its image data is cut short).
        """
        with self._lock:
            if os.getpid() != self._pid:
                self._open = OrderedDict()
                self._pid = os.getpid()
            try:
                handle, index = self._handle(str(tar_path))
            except tarfile.ReadError as exc:
                raise OSError(f"cannot read tar {tar_path}: {exc}") from exc
            info = index.get(member)
            if info is None:
                raise FileNotFoundError(f"member {member!r} not found in tar {tar_path}")
            try:
                return handle.extractfile(info).read()
            except tarfile.ReadError as exc:
                raise UndecodableImageError(f"cannot read image {member!r} in tar {tar_path}: {exc}") from exc

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
        OSError: the file or tar cannot be read (permissions, not a tar file).
        UndecodableImageError: the tar ends inside the member.
    """
    if row.get("image_bytes") is not None:
        return row["image_bytes"]
    path = row.get("image_path")
    if not path:
        raise ManifestError(f"manifest row {row.get('key')!r} has no image reference")
    member = row.get("image_member")
    if path.startswith("file://"):
        path = url2pathname(urlparse(path).path)
    elif _URL.match(path):  # pipe:, http(s):, s3:... as webdataset opens them: a stream, read up to the member
        return _stream_member(path, member) if member else _read_url(path)
    full = Path(path) if os.path.isabs(path) else Path(manifest_dir) / path
    if member:
        return _TARS.read(full, member)
    return full.read_bytes()


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:(?!\\)")  # a scheme (not a Windows drive such as C:\)


def _read_url(url: str) -> bytes:
    from webdataset.gopen import gopen

    with gopen(url, "rb") as stream:
        return stream.read()


def _stream_member(url: str, member: str) -> bytes:
    """The first member named ``member`` of the tar stream ``url`` (``pipe:cmd``, ``http://...``).

    A stream cannot seek, so this reads the shard up to the member: fine for stage 2's streamed reading of a
    shard's rows in order, slow for random access (use local or ``file://`` shards for that).

    Raises:
        FileNotFoundError: the stream ends without the member.
    """
    from webdataset.gopen import gopen

    with gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if info.name == member and info.isfile():
                return tar.extractfile(info).read()
    raise FileNotFoundError(f"tar stream {url} has no member {member!r}")


def load_image(row: Mapping[str, Any], manifest_dir: str | Path) -> Image.Image:
    """Open a manifest row's image with :func:`decode_image`: upright, 8-bit RGB, alpha composited on white.

    Args:
        row: a manifest row (``key``, ``image_path``, ``image_member``, ``image_bytes``), e.g. from
            :func:`manifests.schema.iter_rows`.
        manifest_dir: the manifest directory, against which relative ``image_path`` values resolve.

    Raises:
        ManifestError: the row has no image reference.
        FileNotFoundError: the referenced file or tar member does not exist.
        OSError: the file or tar cannot be read.
        ImageTooLargeError: the image is over Pillow's decompression-bomb limit.
        UndecodableImageError: the bytes do not decode (names the key and the reference).
    """
    data = read_image_bytes(row, manifest_dir)
    where = row.get("image_path") or "inline bytes"
    if row.get("image_member"):
        where = f"{where}:{row['image_member']}"
    return decode_image(data, name=f"{row.get('key')!r} ({where})")
