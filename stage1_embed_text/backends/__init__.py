"""The stage-1 encoder of a job: the ``hf`` backend on a loaded LLM, or the ``vllm`` backend (SPEC §2.5).

Importing this module loads torch and transformers (through the encoders); vLLM itself is imported only when a
``vllm`` encoder is built (:mod:`stage1_embed_text.backends.vllm_backend`).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from stage1_embed_text.backends.llm import load_llm
from stage1_embed_text.backends.vllm_backend import VllmFacetEncoder
from stage1_embed_text.backends.vllm_settings import EngineSettings
from stage1_embed_text.config import BACKENDS, EmbedConfig
from stage1_embed_text.encode.encoder import FacetEncoder
from stage1_embed_text.encode.prompts import get_prompt_set


def build_encoder(config: EmbedConfig, device: torch.device) -> FacetEncoder | VllmFacetEncoder:
    """The encoder of ``config``: a :class:`~stage1_embed_text.encode.encoder.FacetEncoder` on the loaded LLM
    (``backend="hf"``) or a :class:`~stage1_embed_text.backends.vllm_backend.VllmFacetEncoder` (``backend="vllm"``).

    Raises:
        stage1_embed_text.backends.vllm_settings.VllmUnavailableError: ``vllm`` requested but not importable here.
        ValueError: unknown backend.
    """
    if config.backend == "vllm":
        return build_vllm_encoder(config, device)
    if config.backend != "hf":
        raise ValueError(f"backend must be one of {BACKENDS}, got {config.backend!r}")
    llm = load_llm(config.llm, dtype=config.dtype, layer=config.layer)
    if device.type != "cpu":
        llm.model.to(device)
        llm.final_norm.to(device)
    kw = {"max_batch_sequences": config.batch_size} if config.batch_size else {}
    return FacetEncoder(
        llm,
        prompt_set=get_prompt_set(config.prompt_set, bos_marker=config.bos_marker),
        readout=config.readout,
        position_mode=config.position_mode,
        context_tokens=config.context_tokens,
        max_batch_tokens=config.max_batch_tokens,
        **kw,
    )


def build_vllm_encoder(config: EmbedConfig, device: torch.device | str | None = None) -> VllmFacetEncoder:
    """A :class:`~stage1_embed_text.backends.vllm_backend.VllmFacetEncoder` for a stage-1 job config.

    Uses ``config.llm``, ``layer``, ``readout``, ``dtype`` (the engine dtype), ``position_mode``,
    ``context_tokens``, ``prompt_set``, ``bos_marker`` and ``vllm_settings``
    (:meth:`~stage1_embed_text.backends.vllm_settings.EngineSettings.from_mapping`); ``device`` (``torch.device`` or str)
    picks CPU/GPU (default: the settings' device, ``auto``).
    """
    settings = EngineSettings.from_mapping(config.vllm_settings)
    dev = getattr(device, "type", device)
    settings = replace(settings, dtype=config.dtype, device=dev if dev in ("cpu", "cuda") else settings.device)
    return VllmFacetEncoder(
        config.llm,
        layer=config.layer,
        prompt_set=get_prompt_set(config.prompt_set, bos_marker=config.bos_marker),
        readout=config.readout,
        position_mode=config.position_mode,
        context_tokens=config.context_tokens,
        settings=settings,
    )
