"""PNG bytes for tests: small solid colours (Pillow) and chunk-by-chunk PNGs Pillow cannot write."""

import io
import struct
import zlib

from PIL import Image


def png(color=(255, 0, 0), size=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path, color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png(color))


def png_chunks(width: int, height: int, bit_depth: int, color_type: int, pixels: bytes = b"") -> bytes:
    """A PNG written chunk by chunk, for what Pillow cannot save (16-bit RGB, a 20000x20000 header).

    ``pixels`` are the raw big-endian samples, row after row; each row gets filter type 0.
    """
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = len(pixels) // height if pixels else 0
    raw = b"".join(b"\x00" + pixels[i : i + row] for i in range(0, len(pixels), row)) if pixels else b""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
