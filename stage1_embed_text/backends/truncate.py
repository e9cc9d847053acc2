"""A checkpoint cut to its first ``L`` decoder blocks, for engines that cannot stop early (SPEC §2.5).

vLLM has no "read layer L" switch, and it refuses ``hf_overrides={"num_hidden_layers": L}`` smaller than the
checkpoint's, so the vLLM backend runs a copy of the checkpoint that *has* only ``L`` blocks: the config with
``num_hidden_layers = L`` (and ``layer_types`` cut to match), the tensors of blocks ``< L``, the embeddings and
the final norm. The engine's output is then ``final_norm(hidden_states[L])``; the backend divides the norm's
scale back out for the ``pre_norm`` readout. Everything else (tokenizer files, chat template, generation
config) is copied unchanged. A separate ``lm_head`` is dropped: a pooling engine never computes logits.

The copy is made once under ``$FLAME_HOME/models/truncated/`` and renamed into place when complete
(:func:`pipeline.atomic.atomic_directory`), so a killed run never leaves a half-written folder that looks
finished. :func:`final_norm_scale` reads the final norm's scale from such a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.atomic import atomic_directory
from pipeline.paths import flame_home
from stage1_embed_text.config import EmbedConfigError

log = logging.getLogger(__name__)

TRUNCATED_DIR = "truncated"
_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_LM_HEAD = re.compile(r"(?:^|\.)lm_head\.")
_INDEX = "model.safetensors.index.json"
MARKER = "flame_truncation.json"
_NORM_NAMES = ("model.norm.weight", "norm.weight", "model.language_model.norm.weight", "language_model.model.norm.weight")


def block_of(name: str) -> int | None:
    """Decoder block number of tensor ``name`` (``model.layers.7.mlp...`` -> 7), or ``None`` if not in a block."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def keep_tensor(name: str, n_layers: int) -> bool:
    """Whether tensor ``name`` belongs in a checkpoint cut to ``n_layers`` blocks (no ``lm_head``, blocks ``< L``)."""
    if _LM_HEAD.search(name):
        return False
    b = block_of(name)
    return b is None or b < n_layers


def truncated_config(config: dict, n_layers: int) -> dict:
    """A copy of an HF ``config.json`` dict cut to ``n_layers`` blocks.

    Handles the text config of multimodal wrappers (``text_config``) and per-layer lists (``layer_types``).

    Raises:
        stage1_embed_text.config.EmbedConfigError: ``n_layers`` outside ``[1, num_hidden_layers]``.
    """
    cfg = json.loads(json.dumps(config))
    target = cfg["text_config"] if "num_hidden_layers" not in cfg and "text_config" in cfg else cfg
    total = int(target["num_hidden_layers"])
    if not 1 <= n_layers <= total:
        raise EmbedConfigError(f"cannot cut a {total}-block checkpoint to {n_layers} blocks (need 1..{total})")
    target["num_hidden_layers"] = n_layers
    if isinstance(target.get("layer_types"), list):
        target["layer_types"] = target["layer_types"][:n_layers]
    return cfg


def _source_key(src: Path) -> str:
    """Short digest of the source folder's weight files (names, sizes, mtimes) so a changed source is re-cut."""
    files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json"))
    blob = json.dumps([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def truncated_checkpoint(source: str | Path, n_layers: int, root: str | Path | None = None) -> Path:
    """The folder of ``source`` cut to ``n_layers`` decoder blocks, made once and reused.

    Args:
        source: a local Hugging Face model folder with ``config.json`` and ``*.safetensors`` weights (one file
            or an index + shards), e.g. the bf16 folder stage 1 converts an embedded GGUF model into.
        n_layers: blocks to keep, ``L`` = the Hugging Face ``hidden_states`` index read out, ``1 <= L <= N``.
        root: where truncated copies live; default ``flame_home()/models/truncated``.

    Returns:
        ``<root>/<source name>-L<n_layers>-<source digest>/``, a loadable model folder.

    Raises:
        FileNotFoundError: ``source`` is not a folder with ``config.json`` and safetensors weights.
        ValueError: ``n_layers`` outside ``[1, num_hidden_layers]``.
    """
    src = Path(source).expanduser().resolve()
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is not a model folder (no config.json)")
    weights = sorted(src.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(
            f"{src} has no *.safetensors weights (vLLM needs a safetensors folder; convert GGUF/.bin first)"
        )
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    new_config = truncated_config(config, n_layers)  # validates n_layers
    base = Path(root) if root is not None else flame_home() / "models" / TRUNCATED_DIR
    target = base / f"{src.name}-L{n_layers}-{_source_key(src)}"
    if (target / MARKER).is_file():
        return target

    log.info("cutting %s to %d blocks at %s (once)", src, n_layers, target)
    with atomic_directory(target, keep_existing=True) as tmp:
        kept, dropped = _write_truncated(src, weights, n_layers, new_config, tmp)
    if not (target / MARKER).is_file():
        raise OSError(f"could not publish the truncated checkpoint at {target}")
    log.info("kept %d tensors, dropped %d", kept, dropped)
    return target


def _write_truncated(src: Path, weights: list[Path], n_layers: int, new_config: dict, out: Path) -> tuple[int, int]:
    """Write the checkpoint ``src`` cut to ``n_layers`` blocks into the empty folder ``out`` (files ``0o644``);
    returns ``(tensors kept, tensors dropped)``."""
    weight_map: dict[str, str] = {}
    kept = dropped = 0
    for wf in weights:
        tensors = {}
        with safe_open(str(wf), framework="pt") as f:
            meta = f.metadata() or {}
            for name in f.keys():
                if keep_tensor(name, n_layers):
                    tensors[name] = f.get_tensor(name)
                else:
                    dropped += 1
        if tensors:
            save_file(tensors, str(out / wf.name), metadata=meta or {"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, wf.name))
            kept += len(tensors)
    if (src / _INDEX).is_file():
        index = json.loads((src / _INDEX).read_text(encoding="utf-8"))
        index["weight_map"] = dict(sorted(weight_map.items()))
        index.get("metadata", {}).pop("total_size", None)
        (out / _INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name not in ("config.json", _INDEX):
            shutil.copy2(p, out / p.name)
    (out / "config.json").write_text(json.dumps(new_config, indent=2), encoding="utf-8")
    (out / MARKER).write_text(
        json.dumps({"source": str(src), "num_hidden_layers": n_layers, "kept": kept, "dropped": dropped}),
        encoding="utf-8",
    )
    for p in out.iterdir():
        os.chmod(p, 0o644)
    return kept, dropped


def is_gemma(config: Mapping) -> bool:
    """Whether the model's RMSNorm scales by ``1 + w`` (Gemma families) rather than ``w``."""
    text = config.get("text_config") or config
    return str(text.get("model_type", config.get("model_type", ""))).startswith("gemma")


def final_norm_scale(folder: str | Path) -> np.ndarray:
    """``float32 [D]``: the elementwise factor the final RMSNorm multiplies by (``w``, or ``1 + w`` for Gemma).

    Raises:
        stage1_embed_text.config.EmbedConfigError: no final-norm tensor in the checkpoint (the message lists the
            names looked for and the readout that needs none).
    """
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
        raise EmbedConfigError(f"no final norm weight in {folder} (looked for {', '.join(_NORM_NAMES)}): the "
                               "pre_norm readout needs it; use readout='post_norm'")
    return (1.0 + found if is_gemma(config) else found).astype(np.float32)
