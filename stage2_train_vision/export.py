"""Export the trained encoder for eval: ``model.safetensors`` + ``config.json`` (SPEC §5).

The folder is a Hugging Face model repository as it stands: ``config.json``, ``model.safetensors`` and a
``README.md`` model card (:func:`pipeline.hub.render_card`) whose YAML metadata follows the Hub's schema
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.atomic import atomic_file, atomic_write_bytes
from pipeline.errors import FlameError
from pipeline.hub import LIBRARY, text_encoder_record, write_card
from stage2_train_vision.config import ConfigError, DataConfig, ImageConfig, ModelConfig
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
        ExportError: a weight is not finite (NaN or infinite): nothing is written.
    """
    if model_cfg.out_dim is None:
        raise ValueError("export needs the resolved ModelConfig (out_dim set from the cache)")
    out = Path(out_dir)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise ExportError(f"not exporting to {out}: {len(bad)} of {len(state)} weight tensors are not finite "
                          f"(e.g. {bad[0]}); the training diverged")
    out.mkdir(parents=True, exist_ok=True)
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
        ExportError: either file is damaged, ``config.json``'s ``model`` section is missing or cannot build a
            model (no ``out_dim``, not a ViT), or the weights do not fit the config (missing, unexpected or
            differently shaped tensors).
    """
    d = Path(model_dir)
    for name in (WEIGHTS, CONFIG):
        if not (d / name).exists():
            raise FileNotFoundError(f"{d} is not an exported flame model (no {name})")
    try:
        config = json.loads((d / CONFIG).read_text(encoding="utf-8"))
    except ValueError as e:
        raise ExportError(f"{d / CONFIG} is damaged ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ExportError(f"{d / CONFIG} has no model section; export the model with flame train")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        model = FlameVisionModel(ModelConfig(**{k: v for k, v in config["model"].items() if k in names}))
    except ConfigError as e:
        raise ExportError(f"{d / CONFIG}: {e}") from None
    if config.get("text_side"):  # a model with its own text tower (stage2_train_vision.text_tower)
        attach_text_tower(model, TextTowerConfig.from_dict(config["text_side"]), config["text_side"]["out_dim"])
    try:
        weights = load_file(d / WEIGHTS)
    except SafetensorError as e:
        raise ExportError(f"{d / WEIGHTS} is damaged ({e})") from None
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:  # torch lists every missing, unexpected or resized tensor, one per line
        raise ExportError(f"{d / WEIGHTS} does not fit {d / CONFIG} ({' '.join(str(e).split())[:300]})") from None
    return model.to(device).eval(), config
