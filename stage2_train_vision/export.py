"""Export the trained encoder for eval: ``model.safetensors`` + ``config.json`` (SPEC §5).

The folder is a Hugging Face model repository as it stands: ``config.json``, ``model.safetensors`` and a
``README.md`` model card (:func:`render_card`) whose YAML metadata follows the Hub's schema
(:class:`huggingface_hub.ModelCardData`): ``library_name``, ``license`` (the text-side LLM's terms; the data's are
listed in the body), ``base_model`` (the text-side LLM), ``tags``, ``datasets`` and, given ``flame eval`` results,
``model-index`` entries; the body holds a usage snippet for :func:`flame_pipeline.load`. ``config.json``::

    {"library_name": "flame-pipeline", "architectures": ["FlameVisionModel"], "format_version": 2,
     "model": {ModelConfig fields, out_dim set},
     "image": {"size", "mean", "std", "interpolation", "crop_scale"},
     "cache_identity": {the CacheIdentity the vectors came from},
     "text_encoder": {where any machine gets that LLM: pipeline.hub.llm_source},
     "train": {summary of the run: steps, epochs, loss, ...}}

Weight names are those of :class:`stage2_train_vision.model.FlameVisionModel` (``backbone.*`` = the timm ViT's
own names, ``projector.*``, ``logit_scale``, ``logit_bias``). Folders of format 1 (no ``text_encoder``) load.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.atomic import atomic_file, atomic_write_bytes
from pipeline.errors import FlameError
from pipeline.hub import llm_source
from stage2_train_vision.config import DataConfig, ImageConfig, ModelConfig
from stage2_train_vision.model import FlameVisionModel
from stage2_train_vision.text_tower import TextTowerConfig, attach_text_tower

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT_VERSION = 2


class ExportError(FlameError, ValueError):
    """An exported model folder whose ``config.json`` or ``model.safetensors`` cannot be read."""


def export_model(
    model: FlameVisionModel,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    cache_identity: dict[str, Any],
    out_dir: str | Path,
    train_summary: dict[str, Any] | None = None,
    text_side: dict[str, Any] | None = None,
    datasets: list[str] | None = None,
) -> Path:
    """Write the model's weights (float32, contiguous) and its config to ``out_dir``; returns ``out_dir``.

    Each file is written atomically (:mod:`pipeline.atomic`: weights first, then ``config.json``), so a reader
    never sees a partial file; other files in ``out_dir`` are left alone.

    ``text_side``: for a model that carries its own text tower (``model.text_tower``,
    :func:`stage2_train_vision.text_tower.text_side_config`) the config gets ``"text_side"`` and
    ``"cache_identity": null`` (eval embeds texts with the tower). ``None`` (FLAME models): unchanged format.

    Raises:
        ValueError: ``model_cfg.out_dim`` is unset (export the resolved config the model was built from).
    """
    if model_cfg.out_dim is None:
        raise ValueError("export needs the resolved ModelConfig (out_dim set from the cache)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    with atomic_file(out / WEIGHTS) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    image = ImageConfig(
        model_cfg.img_size, tuple(data_cfg.mean), tuple(data_cfg.std), data_cfg.interpolation, tuple(data_cfg.crop_scale)
    )
    config = {
        "library_name": LIBRARY, "architectures": [type(model).__name__], "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(model_cfg),
        "image": image.to_dict(),
        "cache_identity": dict(cache_identity),
        "train": dict(train_summary or {}),
    }
    if text_side is not None:
        config["cache_identity"] = None
        config["text_side"] = dict(text_side)
    config["text_encoder"] = text_encoder_record(config["cache_identity"])
    atomic_write_bytes(out / CONFIG, json.dumps(config, indent=2, ensure_ascii=False, default=list).encode("utf-8"))
    write_card(out, config, datasets=datasets)
    return out


def load_exported(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[FlameVisionModel, dict[str, Any]]:
    """Rebuild the exported model (eval mode, on ``device``) and return it with the parsed ``config.json``.

    Raises:
        FileNotFoundError: ``model.safetensors`` or ``config.json`` is missing.
        RuntimeError: the weights do not fit the config (missing or unexpected tensors).
    """
    d = Path(model_dir)
    for name in (WEIGHTS, CONFIG):
        if not (d / name).exists():
            raise FileNotFoundError(f"{d} is not an exported flame model (no {name})")
    try:
        config = json.loads((d / CONFIG).read_text(encoding="utf-8"))
    except ValueError as e:
        raise ExportError(f"{d / CONFIG} is damaged ({e})") from None
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    model = FlameVisionModel(ModelConfig(**{k: v for k, v in config["model"].items() if k in names}))
    if config.get("text_side"):  # a model with its own text tower (stage2_train_vision.text_tower)
        attach_text_tower(model, TextTowerConfig.from_dict(config["text_side"]), config["text_side"]["out_dim"])
    try:
        weights = load_file(d / WEIGHTS)
    except SafetensorError as e:
        raise ExportError(f"{d / WEIGHTS} is damaged ({e})") from None
    model.load_state_dict(weights, strict=True)
    return model.to(device).eval(), config


# ---- the model card ----------------------------------------------------------------------------------------
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
