"""The arguments of a stage-1 job, their defaults and their choices: :class:`EmbedConfig` is the one owner.

``flame embed`` reads its option defaults from these fields (:func:`default`) and its choices from the tuples
below; the encoders take their defaults and checks from the same constants; the embedded LLM list and default
LLM come from :mod:`pipeline.assets`. This module is light (no torch): the ``flame`` command line imports it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline.assets import DEFAULT_LLM, default_readout
from pipeline.errors import FlameError
from pipeline.machine import fast_bf16

BACKENDS = ("hf", "vllm")
"""Stage-1 backends: ``hf`` (transformers, the reference) and ``vllm`` (SPEC §2.5)."""
DTYPE_CHOICES = ("auto", "bfloat16", "float32")
"""Compute dtypes ``flame embed --dtype`` offers (the loaders accept ``float16`` as well); ``auto`` is resolved by
:func:`compute_dtype` on the job's device and recorded resolved in the cache identity."""
READOUTS = ("pre_norm", "post_norm")
"""Where a facet vector is read: the block output ``hidden_states[L]`` (``pre_norm``, the official recipe) or
that state passed through the model's final norm (``post_norm``)."""
POSITION_MODES = ("restart", "continuous")
"""Position ids of a packed sequence: every facet continues from the prefix end (``restart``, equals separate
passes) or one running count (``continuous``, the official numbering)."""
DEFAULT_CONTEXT_TOKENS = 512
"""Longest packed sequence in tokens; longer captions are cut (SPEC §2.4). Stored as the identity's ``max_tokens``."""
DEFAULT_MAX_BATCH_TOKENS = 1024
"""Padded tokens per forward batch of the ``hf`` backend."""


class EmbedConfigError(FlameError, ValueError):
    """An :class:`EmbedConfig` value that cannot work (a count below 1, chunk rows not dividing shard rows...)."""


@dataclass
class EmbedConfig:
    """Arguments of a stage-1 job.

    Attributes:
        manifest: manifest directory (SPEC §4).
        out: cache directory to create or resume (SPEC §3).
        llm: embedded name (:data:`pipeline.assets.EMBEDDED_LLMS`), local folder, ``.gguf`` file or hub id
            (:func:`stage1_embed_text.backends.llm.load_llm`); default :data:`pipeline.assets.DEFAULT_LLM`.
        layer: ``hidden_states`` index read out; ``None`` = penultimate block.
        readout: ``"pre_norm"`` or ``"post_norm"``; ``None`` = the LLM's default
            (:func:`pipeline.assets.default_readout`).
        dtype: compute dtype, ``"auto"`` (default: :func:`compute_dtype`), ``"bfloat16"`` or ``"float32"``.
        backend: ``"hf"`` (reference, CPU/GPU) or ``"vllm"`` (needs vLLM importable, SPEC §2.5).
        context_tokens: longest packed sequence in tokens; longer captions are cut (SPEC §2.4).
        max_batch_tokens: padded tokens per forward batch (``hf`` backend).
        batch_size: if set, at most this many sequences per batch (on top of the token budget).
        limit: only the first ``limit`` manifest rows (after ``split``).
        split: only rows of this split.
        shard_rows: cache rows per shard (the unit of work, resume and multi-process split).
        chunk_rows: rows per Zarr chunk (must divide ``shard_rows``).
        position_mode: ``"restart"`` (default) or ``"continuous"``.
        prompt_set: prompt set name (``"flame"``).
        bos_marker: the official ``<s>`` marker, ``"drop"`` (default) or ``"keep"``.
        progress: show a tqdm bar (rank 0 only).
        vllm_settings: vLLM engine settings for ``backend="vllm"``, ``{name: value}``: a field of
            :class:`stage1_embed_text.backends.vllm_settings.EngineSettings` (``gpu_memory_utilization``,
            ``max_num_seqs``, ``block_size``, ...) or any other ``vllm.LLM`` keyword argument
            (``tensor_parallel_size``, ...). ``flame embed --vllm-setting KEY=VALUE``.
    """

    manifest: str
    out: str
    llm: str = DEFAULT_LLM
    layer: int | None = None
    readout: str | None = None
    dtype: str = "auto"
    backend: str = "hf"
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    batch_size: int | None = None
    limit: int | None = None
    split: str | None = None
    shard_rows: int = 4096
    chunk_rows: int = 64
    position_mode: str = "restart"
    prompt_set: str = "flame"
    bos_marker: str = "drop"
    progress: bool = True
    vllm_settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Fill the LLM's default readout; raise :class:`EmbedConfigError` for values that cannot work."""
        if self.readout is None:
            self.readout = default_readout(self.llm)
        check_shard_layout(self.shard_rows, self.chunk_rows)
        at_least_one = {"context_tokens": self.context_tokens, "max_batch_tokens": self.max_batch_tokens,
                        "batch_size": self.batch_size, "limit": self.limit}
        bad = [f"{name}={value}" for name, value in at_least_one.items() if value is not None and value < 1]
        if bad:
            raise EmbedConfigError(f"{', '.join(bad)}: must be at least 1")
        if self.layer is not None and self.layer < 0:
            raise EmbedConfigError(f"layer={self.layer}: hidden_states index must be at least 0")


def default_layer(num_blocks: int) -> int:
    """The ``hidden_states`` index read out when none is given: the penultimate block's output,
    ``num_blocks - 1`` (SPEC §2.3), for every backend."""
    return num_blocks - 1


def check_encoder_modes(readout: str, position_mode: str) -> None:
    """Raise :class:`EmbedConfigError` unless ``readout`` is one of :data:`READOUTS` and ``position_mode`` one of
    :data:`POSITION_MODES` (checked by every backend's encoder)."""
    if readout not in READOUTS:
        raise EmbedConfigError(f"readout must be one of {READOUTS}, got {readout!r}")
    if position_mode not in POSITION_MODES:
        raise EmbedConfigError(f"position_mode must be one of {POSITION_MODES}, got {position_mode!r}")


def check_shard_layout(shard_rows: int, chunk_rows: int) -> None:
    """Raise :class:`EmbedConfigError` unless ``chunk_rows >= 1`` divides ``shard_rows >= 1`` (a Zarr shard holds
    whole chunks)."""
    if shard_rows < 1 or chunk_rows < 1 or shard_rows % chunk_rows:
        raise EmbedConfigError(
            f"shard_rows={shard_rows}, chunk_rows={chunk_rows}: need chunk_rows >= 1 dividing shard_rows >= 1"
        )


def default(name: str) -> Any:
    """The default of :class:`EmbedConfig` field ``name`` (what ``flame embed`` shows and uses).

    Raises:
        KeyError: no such field, or a field without a default (``manifest``, ``out``).
    """
    for f in dataclasses.fields(EmbedConfig):
        if f.name == name and f.default is not dataclasses.MISSING:
            return f.default
    raise KeyError(f"EmbedConfig has no field {name!r} with a default")


SINGLE = "single"
"""Text mode: the text through the raw single prompt, one vector per text."""
MULTI = "multi"
"""Text mode: the mean of the long group's facet vectors (FLAME's multi-facet prompts)."""
TEXT_MODES = (SINGLE, MULTI)
"""The modes :class:`stage1_embed_text.api.TextEmbedder` embeds texts in (SPEC §6); ``flame eval --text-mode``
lists them in this order."""


def check_text_mode(mode: str) -> str:
    """``mode`` itself if it is one of :data:`TEXT_MODES`.

    Raises:
        EmbedConfigError: any other value, naming the known modes.
    """
    if mode not in TEXT_MODES:
        raise EmbedConfigError(f"unknown text mode {mode!r} ({', '.join(TEXT_MODES)})")
    return mode


def compute_dtype(dtype: str, device_type: str) -> str:
    """The compute dtype a job runs in: ``dtype`` itself unless it is ``"auto"``, which means ``"bfloat16"`` where
    bf16 is native on ``device_type`` (:func:`pipeline.machine.fast_bf16`: a CUDA GPU with bf16, a CPU with
    AVX-512 BF16 or AMX) and ``"float32"`` elsewhere (on an AVX2-only CPU bf16 is emulated, several times slower:
    ``bench/precision.py``)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if fast_bf16(device_type) else "float32"
