"""Load a frozen decoder LLM for stage 1, cut to the blocks the readout needs (SPEC §2.3, §2.5, §9).

Sources, tried in this order:

* an embedded name (``gemma3-270m``, ``smollm2-135m``): its GGUF (from :func:`pipeline.assets.llm_gguf`) is
  converted once to a bf16 safetensors folder ``flame_home()/models/<name>-bf16/`` and loaded from there;
* a ``.gguf`` file (transformers' GGUF loader, dequantized);
* a local folder or a Hugging Face hub id (works where the user has a hub or a filled HF cache).

The model returned is the *base* decoder (no LM head, so no vocabulary logits are ever computed) with its
``layers`` truncated to ``layer`` blocks and its final norm replaced by the identity: its
``last_hidden_state`` is Hugging Face's ``hidden_states[layer]`` of the full model. The final norm is kept
aside as :attr:`LoadedLLM.final_norm` for the ``post_norm`` readout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.assets import default_readout  # noqa: F401  (the readout decision lives with the LLM list)
from pipeline.paths import flame_home

log = logging.getLogger(__name__)

EMBEDDED = ("gemma3-270m", "smollm2-135m")
DEFAULT_LLM = "gemma3-270m"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


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
            ``num_hidden_layers - 1``, the penultimate block (SPEC §2.3).
        trust_remote_code: passed to transformers; off unless the user asks.

    Returns:
        :class:`LoadedLLM`.

    Raises:
        ValueError: unknown dtype, or ``layer`` outside ``[0, num_hidden_layers]``.
        FileNotFoundError: a path that does not exist, or an embedded model whose asset is missing.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    t0 = time.perf_counter()
    folder, gguf = _resolve(name_or_path)
    full, tokenizer = _load_model_and_tokenizer(folder, gguf, DTYPES[dtype], trust_remote_code)
    fingerprint = weights_fingerprint(Path(folder) / gguf if gguf else folder)
    llm = _prepare(full, tokenizer, _source_name(name_or_path), fingerprint, layer, dtype)
    log.info(
        "loaded %s (%s, %d/%d blocks, D=%d, %s) in %.1f s",
        llm.name, llm.architecture, llm.layer, llm.num_layers, llm.hidden_size, dtype, time.perf_counter() - t0,
    )
    return llm


def _resolve(name_or_path: str) -> tuple[str, str | None]:
    """``(folder or hub id, gguf file name inside it or None)`` for a source."""
    if name_or_path in EMBEDDED:
        return str(embedded_folder(name_or_path)), None
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        return str(p.parent), p.name
    if p.exists():
        return str(p), None
    if name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path not found: {p}")
    return name_or_path, None


def _source_name(name_or_path: str) -> str:
    """Embedded names and hub ids as given; local paths made absolute (so a cache identity can be reloaded)."""
    p = Path(name_or_path).expanduser()
    if name_or_path not in EMBEDDED and p.exists():
        return str(p.resolve())
    return name_or_path


def embedded_folder(name: str) -> Path:
    """The bf16 safetensors folder of embedded model ``name``, converting its GGUF once if needed (SPEC §9).

    The conversion writes into a temporary directory beside the target and renames it into place, so a killed
    conversion never leaves a half-written folder behind.
    """
    target = flame_home() / "models" / f"{name}-bf16"
    if (target / "config.json").exists():
        return target
    from pipeline.assets import llm_gguf

    gguf = Path(llm_gguf(name))
    log.info("converting %s to a bf16 safetensors folder at %s (once)", gguf, target)
    convert_gguf(gguf, target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint and save it as a bf16 safetensors folder (model + tokenizer) at ``target``.

    If another process finished the same conversion first, its folder is kept and this one discarded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16, **_dequantize_kwargs()
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the converted model is meant to be readable like a download
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
        log.info("%s was converted by another process meanwhile; using it", target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _dequantize_kwargs() -> dict:
    """transformers >= 5 keeps GGUF weights packed (and refuses to save them) unless asked to dequantize;
    older versions always dequantize."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _load_model_and_tokenizer(folder: str, gguf: str | None, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    kw: dict = {"trust_remote_code": trust_remote_code}
    if gguf:
        kw["gguf_file"] = gguf
    tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    if gguf:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw, **_dequantize_kwargs())
    else:
        model = AutoModel.from_pretrained(folder, dtype=dtype, **kw)
    return model, tokenizer


def base_decoder(model: nn.Module) -> nn.Module:
    """The base decoder inside a ``*ForCausalLM`` (or the model itself if it is one): the module with ``layers``."""
    if hasattr(model, "layers"):
        return model
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if inner is None or not hasattr(inner, "layers"):
        raise ValueError(f"{type(model).__name__}: no decoder with `layers` found (not a decoder-only LLM?)")
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
    layer = num_layers - 1 if layer is None else int(layer)
    if not 0 <= layer <= num_layers:
        raise ValueError(f"layer must be in [0, {num_layers}] for {name} ({num_layers} blocks), got {layer}")
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


def weights_fingerprint(source: str | Path) -> str:
    """``sha256:<hex>`` over the weight files of a folder or a single file, cached in ``flame_home()``.

    The digest covers each weight file's name and contents (sorted by name), so it does not depend on the
    dtype the model is loaded in. The cache entry is keyed by the files' paths, sizes and mtimes; a hub id is
    resolved to its local snapshot (the files already downloaded) first.

    Raises:
        FileNotFoundError: no weight files found.
    """
    files = _weight_files(source)
    stat_key = hashlib.sha256(
        json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]).encode()
    ).hexdigest()
    cache = flame_home() / "fingerprints" / f"{stat_key}.json"
    if cache.exists():
        return json.loads(cache.read_text())["fingerprint"]
    total = hashlib.sha256()
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
        total.update(f"{f.name}:{h.hexdigest()}\n".encode())
    fingerprint = "sha256:" + total.hexdigest()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"fingerprint": fingerprint, "files": [str(f) for f in files]}))
    return fingerprint


def _weight_files(source: str | Path) -> list[Path]:
    p = Path(source)
    if p.is_file():
        return [p]
    if not p.is_dir():
        from huggingface_hub import snapshot_download

        p = Path(snapshot_download(str(source), local_files_only=True))  # the files from_pretrained fetched
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in _WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no weight files in {p}")
    return files
