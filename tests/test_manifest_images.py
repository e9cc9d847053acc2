"""``manifests.images``: the one decoder and ``load_image`` for every way a row references its image."""

import io

import numpy as np
import pytest
from PIL import ExifTags, Image

from manifests.images import (
    ImageTooLargeError,
    UndecodableImageError,
    _TarMemberReader,
    decode_image,
    load_image,
)
from manifests.schema import ManifestError
from tests.helpers.images import png_chunks
from tests.helpers.shards import write_tar


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def encode_jpeg(image: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=100, subsampling=0, **params)
    return buf.getvalue()


def solid(rgb, size=(4, 3)) -> bytes:
    return encode(Image.new("RGB", size, rgb))




def test_inline_bytes_and_plain_paths(tmp_path):
    image = load_image({"key": "a", "image_bytes": solid((1, 2, 3))}, tmp_path)
    assert (image.mode, image.size, image.getpixel((3, 2))) == ("RGB", (4, 3), (1, 2, 3))
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "b.png").write_bytes(solid((4, 5, 6)))
    assert load_image({"key": "b", "image_path": "img/b.png"}, tmp_path).getpixel((0, 0)) == (4, 5, 6)
    absolute = str(tmp_path / "img" / "b.png")
    assert load_image({"key": "b", "image_path": absolute}, "/nonexistent").getpixel((0, 0)) == (4, 5, 6)


def test_tar_member_reads_first_copy_of_a_repeated_name(tmp_path):
    write_tar(tmp_path / "s.tar", [("k.png", solid((10, 0, 0))), ("x.png", solid((0, 20, 0))),
                                   ("k.png", solid((0, 0, 30)))])
    row = {"key": "k", "image_path": "s.tar", "image_member": "k.png"}
    assert load_image(row, tmp_path).getpixel((0, 0)) == (10, 0, 0)
    assert load_image(row | {"image_member": "x.png"}, tmp_path).getpixel((0, 0)) == (0, 20, 0)
    with pytest.raises(FileNotFoundError, match="member 'y.png' not found"):
        load_image(row | {"image_member": "y.png"}, tmp_path)
    with pytest.raises(FileNotFoundError):
        load_image(row | {"image_path": "missing.tar"}, tmp_path)


def test_alpha_and_palette_transparency_composite_on_white():
    rgba = Image.new("RGBA", (2, 1), (200, 0, 0, 0))
    rgba.putpixel((1, 0), (200, 0, 0, 255))
    image = decode_image(encode(rgba))
    assert [image.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (200, 0, 0)]
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    image = decode_image(encode(palette))
    assert [image.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (0, 128, 0)]
    assert decode_image(encode(Image.new("L", (1, 1), 77))).getpixel((0, 0)) == (77, 77, 77)


def test_undecodable_images_raise_clear_errors(tmp_path):
    jpeg = encode(Image.effect_noise((128, 128), 50).convert("RGB"), "JPEG")
    with pytest.raises(UndecodableImageError, match=r"cannot decode image 'cut' \(inline bytes\)"):
        load_image({"key": "cut", "image_bytes": jpeg[: len(jpeg) // 2]}, tmp_path)
    (tmp_path / "page.jpg").write_bytes(b"<html><body>Not Found</body></html>")
    with pytest.raises(UndecodableImageError, match=r"'page' \(page.jpg\)"):
        load_image({"key": "page", "image_path": "page.jpg"}, tmp_path)
    with pytest.raises(ManifestError, match="'none' has no image reference"):
        load_image({"key": "none"}, tmp_path)


def test_tar_handles_are_an_lru_and_not_shared_after_fork(tmp_path):
    reader = _TarMemberReader(max_open=2)
    tars = [write_tar(tmp_path / f"{i}.tar", [("m.png", solid((i, i, i)))]) for i in range(3)]
    first = [decode_image(reader.read(t, "m.png")).getpixel((0, 0)) for t in tars]
    assert first == [(0, 0, 0), (1, 1, 1), (2, 2, 2)]
    assert list(reader._open) == [str(tars[1]), str(tars[2])]
    assert decode_image(reader.read(tars[0], "m.png")).getpixel((0, 0)) == (0, 0, 0)
    assert list(reader._open) == [str(tars[2]), str(tars[0])]
    reader._pid = -1  # as seen from a forked child
    reader.read(tars[1], "m.png")
    assert list(reader._open) == [str(tars[1])]


def gray_values(image: Image.Image) -> list[list[int]]:
    pixels = np.asarray(image)
    assert (pixels == pixels[..., :1]).all()  # gray: R = G = B
    return pixels[..., 0].tolist()


def test_16_bit_gray_png_scales_to_8_bit_by_257():
    gradient = np.arange(0, 65536, 4369)  # 16 steps of 17 * 257: 0, 4369, ..., 65535
    rounding = [0, 128, 129, 257, 385, 386, 32767, 32768, 32896, 65406, 65407, 65534, 65535, 1, 2, 3]
    stored = np.array([gradient, rounding], dtype=np.uint16)
    image = Image.fromarray(stored)
    assert image.mode == "I;16"
    decoded = decode_image(encode(image))
    assert decoded.mode == "RGB" and decoded.size == (16, 2)
    assert gray_values(decoded) == [list(range(0, 256, 17)),
                                    [0, 0, 1, 1, 1, 2, 127, 128, 128, 254, 255, 255, 255, 0, 0, 0]]


def test_16_bit_big_endian_int32_and_float_modes():
    big_endian = Image.fromarray(np.array([[0, 129, 65535]], dtype=">u2"))
    assert big_endian.mode == "I;16B"
    assert gray_values(decode_image(encode(big_endian, "TIFF"))) == [[0, 1, 255]]
    sixteen_in_int32 = Image.fromarray(np.array([[0, 386, 65535]], dtype=np.int32))
    assert sixteen_in_int32.mode == "I"
    assert gray_values(decode_image(encode(sixteen_in_int32, "TIFF"))) == [[0, 2, 255]]
    full_int32 = Image.fromarray(np.array([[-5, 65536, 2**30, 2**31 - 1]], dtype=np.int32))
    assert gray_values(decode_image(encode(full_int32, "TIFF"))) == [[0, 0, 128, 255]]
    floats = Image.fromarray(np.array([[-0.5, 0.0, 0.1, 0.5, 1.0, 7.0, np.nan]], dtype=np.float32))
    assert floats.mode == "F"
    assert gray_values(decode_image(encode(floats, "TIFF"))) == [[0, 0, 26, 128, 255, 255, 0]]


def test_16_bit_rgb_and_rgba_pngs_keep_pillows_high_byte():
    samples = np.array([0x80FF, 0x7FFF, 0xFFFF, 0x0081, 0x0100, 0x1234], dtype=">u2")
    rgb = decode_image(png_chunks(2, 1, 16, 2, samples.tobytes()))
    assert [rgb.getpixel((x, 0)) for x in range(2)] == [(128, 127, 255), (0, 1, 18)]
    rgba = np.array([0x1234, 0x5678, 0x9ABC, 0xFFFF], dtype=">u2")
    assert decode_image(png_chunks(1, 1, 16, 6, rgba.tobytes())).getpixel((0, 0)) == (0x12, 0x56, 0x9A)


def test_exif_orientation_6_jpeg_is_rotated_clockwise():
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 16, 8))  # red top-left block, on JPEG 8x8 block edges
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    oriented = decode_image(encode_jpeg(stored, exif=exif))
    plain = decode_image(encode_jpeg(stored))
    assert plain.size == (40, 20) and oriented.size == (20, 40)
    # orientation 6: the stored image is turned 90 degrees clockwise for display, stored (x, y) -> (19 - y, x)
    assert np.array_equal(np.asarray(oriented), np.rot90(np.asarray(plain), k=-1))
    assert plain.getpixel((4, 4)) == oriented.getpixel((15, 4)) == (254, 0, 0)
    assert plain.getpixel((4, 17)) == oriented.getpixel((2, 4)) == (0, 0, 254)


def test_decompression_bomb_is_its_own_reason(tmp_path):
    bomb = png_chunks(20000, 20000, 8, 0)  # a 20000x20000 header; Pillow refuses it before reading pixels
    with pytest.raises(ImageTooLargeError, match=rf"image 'big' \(inline bytes\) is too large to decode: Image "
                                                 rf"size \(400000000 pixels\) exceeds limit of "
                                                 rf"{2 * Image.MAX_IMAGE_PIXELS} pixels"):
        load_image({"key": "big", "image_bytes": bomb}, tmp_path)
    assert ImageTooLargeError.reason == "image_too_large" and UndecodableImageError.reason == "undecodable_image"
    assert issubclass(ImageTooLargeError, UndecodableImageError)  # callers that skip undecodable images skip it


def test_tar_cut_inside_a_member_or_not_a_tar(tmp_path):
    a = solid((1, 1, 1))
    tar = write_tar(tmp_path / "s.tar", [("a.png", a), ("b.png", encode(Image.effect_noise((64, 64), 50)))])
    a_end = 512 + -(-len(a) // 512) * 512  # a's header block and its data blocks
    (tmp_path / "cut.tar").write_bytes(tar.read_bytes()[: a_end + 512 + 100])  # b's header and 100 bytes of b
    row = {"key": "b", "image_path": "cut.tar", "image_member": "b.png"}
    with pytest.raises(UndecodableImageError, match=r"cannot read image 'b.png' in tar .*cut.tar: unexpected end"):
        load_image(row, tmp_path)
    assert load_image(row | {"image_member": "a.png"}, tmp_path).getpixel((0, 0)) == (1, 1, 1)
    (tmp_path / "page.tar").write_bytes(b"<html>Not Found</html>" * 40)
    with pytest.raises(OSError, match=r"cannot read tar .*page.tar"):
        load_image(row | {"image_path": "page.tar"}, tmp_path)
