"""The stage-1 backends: one :class:`TextEncoder` protocol, a registry, and the one place an encoder is built.

A backend module registers a builder under its name (like :mod:`manifests.registry` and
:mod:`eval.benchmarks.registry`)::

    @register_backend("mybackend")
    def _build(spec: EncoderSpec, device: str) -> TextEncoder:
        return MyEncoder(spec.llm, layer=spec.layer, ...)

:func:`build_encoder` is the only caller of the builders: the batch job builds its encoder from an
:class:`~stage1_embed_text.config.EmbedConfig` (:meth:`EncoderSpec.of_config`), evaluation from a cache identity
(:meth:`EncoderSpec.of_identity`). The backend names ``flame embed --backend`` offers are
:data:`stage1_embed_text.config.BACKENDS` (the command line must not import the backends, which load torch);
:mod:`stage1_embed_text.backends` imports every backend module, so that each name there is registered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from pipeline.cache.store import CacheIdentity
from stage1_embed_text.config import (
    BACKENDS,
    DEFAULT_MAX_BATCH_TOKENS,
    EmbedConfig,
    EmbedConfigError,
    compute_dtype,
)
from stage1_embed_text.encode.encoded import EncodedSamples
from stage1_embed_text.encode.prompts import PromptSet, get_prompt_set


@runtime_checkable
class TextEncoder(Protocol):
    """What the job, evaluation and the cache writer need of a stage-1 encoder, whatever its backend.

    Attributes:
        prompt_set: the prompt set; its facets are the output columns (11 for FLAME).
        facets: ``prompt_set.facets``.
        dim: D, the width of every vector.
    """

    prompt_set: PromptSet
    facets: tuple[str, ...]
    dim: int

    def identity(self) -> CacheIdentity:
        """The cache identity of the vectors this encoder produces (SPEC §3)."""
        ...

    def encode(
        self, samples: Sequence[Mapping[str, str | None]], progress: Callable[[int, int], None] | None = None
    ) -> EncodedSamples:
        """Facet vectors of ``samples`` (``{"raw"|"short"|"long": caption or None}``): ``vectors float32
        [n, F, D]`` unit-norm where present, ``mask bool [n, F]``, ``tokens int32 [n, 3]``, ``truncated bool
        [n, 3]``. ``progress(n_sequences_done, n_tokens_done)`` is called as work finishes."""
        ...


@dataclass(frozen=True)
class EncoderSpec:
    """Everything a backend needs to build an encoder (the encoder part of an :class:`EmbedConfig`).

    Attributes:
        llm: embedded name, model folder, ``.gguf`` file or hub id.
        layer: ``hidden_states`` index read out; ``None`` = :func:`stage1_embed_text.config.default_layer`.
        readout: ``"pre_norm"`` or ``"post_norm"``.
        dtype: compute dtype name.
        position_mode: ``"restart"`` or ``"continuous"``.
        context_tokens: longest packed sequence in tokens.
        prompt_set: the prompt set (with its ``<s>`` marker choice).
        backend: a registered backend name.
        max_batch_tokens: padded tokens per forward batch (``hf``).
        batch_size: at most this many sequences per batch (``hf``), or ``None``.
        vllm_settings: engine settings (``vllm``), ``{name: value}``.
    """

    llm: str
    layer: int | None
    readout: str
    dtype: str
    position_mode: str
    context_tokens: int
    prompt_set: PromptSet
    backend: str = "hf"
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    batch_size: int | None = None
    vllm_settings: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of_config(cls, config: EmbedConfig, device: Any = None) -> EncoderSpec:
        """The encoder of a stage-1 job on ``device`` (a ``torch.device`` or its type; ``None``: CUDA if available,
        else CPU), with ``dtype="auto"`` resolved for it (:func:`stage1_embed_text.config.compute_dtype`)."""
        return cls(
            llm=config.llm, layer=config.layer, readout=config.readout,
            dtype=compute_dtype(config.dtype, _device_type(device)),
            position_mode=config.position_mode, context_tokens=config.context_tokens,
            prompt_set=get_prompt_set(config.prompt_set, bos_marker=config.bos_marker), backend=config.backend,
            max_batch_tokens=config.max_batch_tokens, batch_size=config.batch_size,
            vllm_settings=dict(config.vllm_settings),
        )

    @classmethod
    def of_identity(cls, identity: CacheIdentity, dtype: str | None = None) -> EncoderSpec:
        """The encoder that embeds free texts into the space of a cache of ``identity`` with the reference
        ``hf`` backend (the ``vllm`` backend's vectors equal it within float tolerance, SPEC §2.5).

        Args:
            identity: the cache identity; its prompt set is rebuilt by name and ``<s>`` marker.
            dtype: compute dtype; default the identity's ``dtype_compute``.
        """
        return cls(
            llm=identity.llm, layer=identity.layer, readout=identity.readout, dtype=dtype or identity.dtype_compute,
            position_mode=identity.position_mode, context_tokens=identity.max_tokens,
            prompt_set=get_prompt_set(identity.prompt_set, bos_marker=identity.bos_marker),
        )


def _device_type(device: Any) -> str:
    if device is None:
        import torch  # third-party, heavy: only when the caller did not say

        return "cuda" if torch.cuda.is_available() else "cpu"
    return getattr(device, "type", None) or str(device).split(":")[0]


Builder = Callable[[EncoderSpec, "str | None"], TextEncoder]
"""``(spec, device type: "cpu", "cuda" or None = the backend's default) -> encoder``."""

_BACKENDS: dict[str, Builder] = {}


def register_backend(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register the decorated ``(spec, device) -> TextEncoder`` as the builder of backend ``name``.

    Raises:
        ValueError: ``name`` is not one of :data:`stage1_embed_text.config.BACKENDS` (add it there, so that
            ``flame embed --backend`` offers it), or another function registered it already.
    """

    def register(build: Builder) -> Builder:
        if name not in BACKENDS:
            raise ValueError(f"backend {name!r} is not in stage1_embed_text.config.BACKENDS {BACKENDS}")
        old = _BACKENDS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (build.__module__, build.__qualname__):
            raise ValueError(f"backend {name!r} is registered twice")
        _BACKENDS[name] = build
        return build

    return register


def build_encoder(spec: EncoderSpec, device: Any = None) -> TextEncoder:
    """The encoder ``spec`` describes, on ``device`` (a ``torch.device``, ``"cpu"``/``"cuda"``, or ``None``: the
    backend's default, CPU for ``hf``).

    Raises:
        stage1_embed_text.config.EmbedConfigError: no backend of that name is registered.
        stage1_embed_text.backends.vllm_settings.VllmUnavailableError: ``vllm`` asked for but not importable here.
    """
    try:
        build = _BACKENDS[spec.backend]
    except KeyError:
        raise EmbedConfigError(f"backend must be one of {sorted(_BACKENDS)}, got {spec.backend!r}") from None
    return build(spec, getattr(device, "type", device))
