"""vLLM engine settings and environment for the ``vllm`` stage-1 backend (SPEC §2.5), without importing vLLM.

Engine settings have per-device defaults (:class:`EngineSettings`); on CPU the environment variables vLLM
reads (``VLLM_CPU_KVCACHE_SPACE``, ``VLLM_CPU_NUM_OF_RESERVED_CPU``, ``VLLM_CPU_OMP_THREADS_BIND``) are set
before the engine starts unless the user set them already (:func:`apply_cpu_environment`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.errors import FlameError
from stage1_embed_text.backends.llm import DTYPES
from stage1_embed_text.config import EmbedConfigError


class VllmUnavailableError(FlameError, RuntimeError):
    """vLLM is not importable in this environment (it lives in ``.venv-vllm``: ``make setup-vllm``)."""


def vllm_available() -> tuple[bool, str]:
    """``(True, version)`` if ``import vllm`` works here, else ``(False, reason)`` (the import error text)."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything at import
        return False, f"{type(e).__name__}: {e}"
    return True, str(getattr(vllm, "__version__", "?"))


@dataclass
class EngineSettings:
    """vLLM engine knobs, with ``None`` meaning "the default for the device".

    Attributes:
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA if torch sees a GPU, else CPU).
        dtype: compute dtype; default ``bfloat16``.
        block_size: KV block size in tokens; default 32 on CPU (its attention backend needs it for prefix
            caching to hit), 16 on GPU. Prefix reuse is per whole block.
        enable_prefix_caching: automatic prefix caching (the point of this backend); off only for tests.
        max_num_batched_tokens: tokens per engine step; default 4096 on CPU, 16384 on GPU.
        max_num_seqs: requests per engine step; default 256 on CPU, 1024 on GPU.
        kv_cache_gib: CPU KV-cache space in GiB (``VLLM_CPU_KVCACHE_SPACE``); default 2.
        gpu_memory_utilization: GPU memory fraction vLLM may take; default 0.85.
        enforce_eager: skip torch.compile; default False. Compiling takes minutes once per model/layer/settings
            (vLLM caches it under ``~/.cache/vllm``) and makes the forward faster; tests pass True (an engine
            then starts in seconds).
        omp_threads_bind: ``VLLM_CPU_OMP_THREADS_BIND``; default every CPU this process may run on (vLLM's
            ``auto`` uses one logical CPU per physical core and so may leave cores idle).
        in_process: run the engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``); default True
            on CPU (no extra busy process on a small machine), False on GPU.
        wave_tokens: prefix tokens per wave (texts whose prefixes are kept in the KV cache between the facet-1
            wave and the rest); default half the engine's KV capacity.
        extra: more keyword arguments for ``vllm.LLM`` (e.g. ``{"tensor_parallel_size": 2}``).
    """

    device: str = "auto"
    dtype: str = "bfloat16"
    block_size: int | None = None
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    kv_cache_gib: float | None = None
    gpu_memory_utilization: float | None = None
    enforce_eager: bool | None = None
    omp_threads_bind: str | None = None
    in_process: bool | None = None
    wave_tokens: int | None = None
    extra: dict = field(default_factory=dict)

    def resolved(self) -> EngineSettings:
        """A copy with the device chosen and every ``None`` replaced by that device's default."""
        device = self.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "cuda"):
            raise EmbedConfigError(f"device must be 'cpu', 'cuda' or 'auto', got {self.device!r}")
        if self.dtype not in DTYPES:
            raise EmbedConfigError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        cpu = device == "cpu"
        return replace(
            self,
            device=device,
            block_size=self.block_size or (32 if cpu else 16),
            max_num_batched_tokens=self.max_num_batched_tokens or (4096 if cpu else 16384),
            max_num_seqs=self.max_num_seqs or (256 if cpu else 1024),
            kv_cache_gib=self.kv_cache_gib if self.kv_cache_gib is not None else (2.0 if cpu else None),
            gpu_memory_utilization=self.gpu_memory_utilization or (None if cpu else 0.85),
            enforce_eager=bool(self.enforce_eager),
            omp_threads_bind=self.omp_threads_bind or (_allowed_cpus() if cpu else None),
            in_process=self.in_process if self.in_process is not None else cpu,
        )

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> EngineSettings:
        """Settings from ``{name: value}`` (``EmbedConfig.vllm_settings``, ``flame embed --vllm-setting``).

        A name of a field of this class sets that field; any other name is a ``vllm.LLM`` keyword argument and
        goes to :attr:`extra` (e.g. ``tensor_parallel_size``). An ``extra`` entry that is a mapping is merged.
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in settings.items() if k in names}
        extra = dict(settings.get("extra") or {})
        extra.update({k: v for k, v in settings.items() if k not in names and k != "extra"})
        return cls(**known, extra=extra)


def _allowed_cpus() -> str:
    """The CPUs this process may run on, as vLLM's id list (``"0,1"``)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = list(range(os.cpu_count() or 1))
    return ",".join(str(c) for c in cpus)


def _count_cpus(id_list: str) -> int:
    """Number of CPUs in a vLLM id list such as ``"0,1"`` or ``"0-3,8"`` (the first list if ``|``-separated)."""
    n = 0
    for part in id_list.split("|")[0].split(","):
        lo, _, hi = part.strip().partition("-")
        n += int(hi) - int(lo) + 1 if hi else 1
    return max(n, 1)


def apply_cpu_environment(settings: EngineSettings) -> dict[str, str]:
    """Set the environment vLLM's CPU backend reads, keeping any value the user already set.

    Must run before the engine is created (vLLM reads these when it starts). Returns the variables in effect.
    """
    wanted = {
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(round(settings.kv_cache_gib or 2)))),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_OMP_THREADS_BIND": settings.omp_threads_bind or _allowed_cpus(),
        "OMP_NUM_THREADS": str(_count_cpus(settings.omp_threads_bind or _allowed_cpus())),
    }
    if settings.in_process:
        wanted["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not settings.enforce_eager:
        # vllm-cpu 0.32 + torch 2.13 cannot reload its own AOT artifacts ("'function' object has no attribute
        # 'finalize_loading'") and so recompiles at every start; the plain inductor cache reloads (bench/README.md).
        wanted["VLLM_USE_AOT_COMPILE"] = "0"
    for k, v in wanted.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in wanted}
