"""The model card of an exported model folder: ``README.md`` with Hugging Face YAML metadata (SPEC §8).

Every folder :func:`stage2_train_vision.export.export_model` writes is a Hub model repository as it stands:
``config.json``, ``model.safetensors`` and this card. The metadata follows the Hub's model-card schema
(:class:`huggingface_hub.ModelCardData`): ``library_name``, ``license`` (the text-side LLM's terms; the data's
terms are listed in the body), ``base_model`` (the text-side LLM, when it lives on the Hub), ``tags``,
``datasets`` and, when evaluation results are given, ``model-index`` entries made from ``flame eval``'s
``results.json``. The body holds a usage snippet that loads the folder with :func:`flame_pipeline.load`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from pipeline.atomic import atomic_write_bytes
from pipeline.hub import llm_source

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
