"""Load a frozen decoder LLM for stage 1, cut to the blocks the readout needs (SPEC §2.3, §2.5, §9).

Where the files come from (embedded name, ``.gguf`` file, local folder, hub id) is
:mod:`stage1_embed_text.backends.model_source`.

The model returned is the *base* decoder (no LM head, so no vocabulary logits are ever computed) with its
``layers`` truncated to ``layer`` blocks and its final norm replaced by the identity: its
``last_hidden_state`` is Hugging Face's ``hidden_states[layer]`` of the full model. The final norm is kept
aside as :attr:`LoadedLLM.final_norm` for the ``post_norm`` readout.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.assets import DEFAULT_LLM
from stage1_embed_text.backends.model_source import (
    dequantize_kwargs,
    resolve_source,
    weights_fingerprint,
)
from stage1_embed_text.config import EmbedConfigError, default_layer

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
"""Compute dtypes of both backends, by name (the one owner of the list)."""


@dataclass
class LoadedLLM:
    """A frozen base decoder ready for stage 1.

    Attributes:
        model: base decoder (e.g. ``LlamaModel``, ``Gemma3TextModel``) in eval mode, ``layers`` cut to
            ``layer`` blocks, final norm replaced by ``nn.Identity``; ``last_hidden_state`` is
            ``hidden_states[layer]`` of the full model, shape ``[B, T, hidden_size]`` in the model dtype.
        tokenizer: the model's (fast) tokenizer.
        name: the source as resolved (embedded name, path or hub id); recorded in cache identities.
        fingerprint: ``sha256:<hex>`` digest of the weight files loaded (stable across dtypes).
        num_layers: decoder blocks of the full checkpoint.
        hidden_size: D.
        architecture: e.g. ``"Gemma3ForCausalLM"``.
        layer: the ``hidden_states`` index read out (= blocks that run), SPEC §2.3.
        final_norm: the model's final norm (applied by the ``post_norm`` readout).
        dtype: compute dtype name (``"bfloat16"``, ``"float32"``, ``"float16"``).
        sliding_window: attention window of the model's sliding layers, or ``None`` if it has none.
        layer_types: per remaining block, ``"full_attention"`` or ``"sliding_attention"``.
    """

    model: nn.Module
    tokenizer: object
    name: str
    fingerprint: str
    num_layers: int
    hidden_size: int
    architecture: str
    layer: int
    final_norm: nn.Module
    dtype: str
    sliding_window: int | None
    layer_types: tuple[str, ...]


def load_llm(
    name_or_path: str = DEFAULT_LLM,
    dtype: str = "bfloat16",
    layer: int | None = None,
    trust_remote_code: bool = False,
) -> LoadedLLM:
    """Load ``name_or_path`` for stage 1, keeping only the blocks up to the readout ``layer``.

    Args:
        name_or_path: embedded name, ``.gguf`` file, local model folder or hub id.
        dtype: ``"bfloat16"`` (default), ``"float32"`` or ``"float16"``.
        layer: Hugging Face ``hidden_states`` index to read (0 = embedding output); default
            :func:`stage1_embed_text.config.default_layer`, the penultimate block (SPEC §2.3).
        trust_remote_code: passed to transformers; off unless the user asks.

    Returns:
        :class:`LoadedLLM`.

    Raises:
        stage1_embed_text.config.EmbedConfigError: unknown dtype, or ``layer`` outside ``[0, num_hidden_layers]``.
        FileNotFoundError: a path that does not exist, or an embedded model whose asset is missing.
    """
    if dtype not in DTYPES:
        raise EmbedConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    t0 = time.perf_counter()
    source = resolve_source(name_or_path)
    full, tokenizer = _load_model_and_tokenizer(source.location, source.gguf, DTYPES[dtype], trust_remote_code)
    fingerprint = weights_fingerprint(source.fingerprint_path)
    llm = _prepare(full, tokenizer, source.name, fingerprint, layer, dtype)
    log.info(
        "loaded %s (%s, %d/%d blocks, D=%d, %s) in %.1f s",
        llm.name, llm.architecture, llm.layer, llm.num_layers, llm.hidden_size, dtype, time.perf_counter() - t0,
    )
    return llm


def _load_model_and_tokenizer(folder: str, gguf: str | None, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    kw: dict = {"trust_remote_code": trust_remote_code}
    if gguf:
        kw["gguf_file"] = gguf
    tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    if gguf:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw, **dequantize_kwargs())
    else:
        model = AutoModel.from_pretrained(folder, dtype=dtype, **kw)
    return model, tokenizer


def base_decoder(model: nn.Module) -> nn.Module:
    """The base decoder inside a ``*ForCausalLM`` (or the model itself if it is one): the module with ``layers``."""
    if hasattr(model, "layers"):
        return model
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if inner is None or not hasattr(inner, "layers"):
        raise EmbedConfigError(f"{type(model).__name__}: no decoder with `layers` found (not a decoder-only LLM?)")
    return inner


def prepare_llm(
    model: nn.Module, tokenizer, name: str, fingerprint: str, layer: int | None = None, dtype: str | None = None
) -> LoadedLLM:
    """Wrap an already built model (e.g. a tiny test model) as a :class:`LoadedLLM`: truncate, strip the norm.

    Args:
        model: a ``*ForCausalLM`` or base decoder; modified in place (blocks dropped, norm replaced).
        tokenizer: its tokenizer.
        name, fingerprint: recorded in cache identities.
        layer: readout ``hidden_states`` index; default the penultimate.
        dtype: compute dtype name; default the model's parameter dtype.
    """
    if dtype is None:
        dtype = {v: k for k, v in DTYPES.items()}[next(model.parameters()).dtype]
    return _prepare(model, tokenizer, name, fingerprint, layer, dtype)


def _prepare(model, tokenizer, name: str, fingerprint: str, layer: int | None, dtype: str) -> LoadedLLM:
    architecture = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    base = base_decoder(model)
    config = base.config
    num_layers = int(config.num_hidden_layers)
    layer = default_layer(num_layers) if layer is None else int(layer)
    if not 0 <= layer <= num_layers:
        raise EmbedConfigError(f"layer must be in [0, {num_layers}] for {name} ({num_layers} blocks), got {layer}")
    base.layers = base.layers[:layer]
    config.num_hidden_layers = layer
    layer_types = _layer_types(config, num_layers)[:layer]
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(layer_types)
    final_norm = base.norm
    base.norm = nn.Identity()
    base.eval().requires_grad_(False)
    final_norm.eval().requires_grad_(False)
    has_sliding = "sliding_attention" in layer_types
    return LoadedLLM(
        model=base,
        tokenizer=tokenizer,
        name=name,
        fingerprint=fingerprint,
        num_layers=num_layers,
        hidden_size=int(config.hidden_size),
        architecture=architecture,
        layer=layer,
        final_norm=final_norm,
        dtype=dtype,
        sliding_window=int(config.sliding_window) if has_sliding and config.sliding_window else None,
        layer_types=layer_types,
    )


def _layer_types(config, num_layers: int) -> tuple[str, ...]:
    """Attention kind of every block: the config's ``layer_types`` (Gemma-3, Qwen2), else all sliding when the
    config names a window (Mistral), else all full. The SDPA/eager kernels ignore the window, so the encoder's
    own mask applies it (SPEC §2.4)."""
    types = getattr(config, "layer_types", None)
    if types:
        return tuple(types)
    kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return (kind,) * num_layers
