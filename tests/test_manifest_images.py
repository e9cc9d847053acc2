"""``manifests.images``: the one decoder and ``load_image`` for every way a row references its image."""

import io
import tarfile

import pytest
from PIL import Image

from manifests.images import UndecodableImageError, _TarMemberReader, decode_image, load_image
from manifests.schema import ManifestError


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def solid(rgb, size=(4, 3)) -> bytes:
    return encode(Image.new("RGB", size, rgb))


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


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
