"""A text encoder trained from scratch jointly with the ViT: the CLIP-style alternative to the frozen LLM cache.

Used by the fidelity study (``bench/fidelity.py``, variant ``clip_scratch``) to answer "what would a user do
instead of FLAME": the same ViT and projector, the same images, steps and optimizer, but the text side is
open_clip's :class:`open_clip.transformer.TextTransformer` (random init) fed by the standard CLIP BPE tokenizer
(``open_clip.get_tokenizer``, vocabulary shipped inside the ``open-clip-torch`` wheel), trained with the same
multi-positive sigmoid loss (:func:`stage2_train_vision.loss.sigmoid_loss`) with one positive per image.

Pieces:

- :class:`TextTowerConfig`: the tower's size and which manifest captions it trains on.
- :func:`attach_text_tower`: builds the tower as ``model.text_tower`` (a submodule of
  :class:`stage2_train_vision.model.FlameVisionModel`, so it is optimised, checkpointed and exported with it).
- :class:`CaptionSampler`: per training batch, one caption per image drawn among its raw / short / long
  captions (seeded by the data position), as token ids ``int64 [B, L]``.
- :class:`TowerTextEncoder`: the eval side, ``encode(texts, mode) -> float32 [n, D]`` with the model's own tower.

The exported ``config.json`` of such a model carries ``"text_side": {"kind": "text_tower", ...}`` and
``"cache_identity": null``: eval embeds texts with the tower, never with an LLM.

``open_clip`` (which imports ``transformers``) is imported only when a tower or its tokenizer is built, so the
FLAME training path, which imports this module, never loads it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from manifests.schema import CAPTION_COLUMNS, read_manifest
from stage2_train_vision.data.samples import DataError

TEXT_SIDE_KIND = "text_tower"


@dataclass(frozen=True)
class TextTowerConfig:
    """A from-scratch text transformer (open_clip's ``TextTransformer``) and the captions it learns from.

    Attributes:
        tokenizer: open_clip model name whose tokenizer is used (``"ViT-B-32"``: the CLIP BPE, 49,408 tokens,
            ``<start_of_text>`` / ``<end_of_text>``, zero padding).
        context_length: tokens per text (longer texts are cut, keeping ``<end_of_text>``; CLIP's 77).
        width / heads / layers: transformer size.
        vocab_size: embedding rows (the tokenizer's vocabulary).
        captions: manifest columns drawn from, one per image and step, uniformly among those present.
    """

    tokenizer: str = "ViT-B-32"
    context_length: int = 77
    width: int = 256
    heads: int = 4
    layers: int = 4
    vocab_size: int = 49408
    captions: tuple[str, ...] = CAPTION_COLUMNS

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextTowerConfig:
        """Inverse of :meth:`to_dict`; unknown keys (``kind``, ``out_dim``) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def build_text_tower(cfg: TextTowerConfig, out_dim: int) -> nn.Module:
    """open_clip ``TextTransformer`` (causal, argmax/EOT pooling, linear projection to ``out_dim``), random init."""
    from open_clip.transformer import TextTransformer

    return TextTransformer(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.width,
                           heads=cfg.heads, layers=cfg.layers, output_dim=out_dim)


def get_tokenizer(cfg: TextTowerConfig):
    """open_clip's tokenizer for ``cfg.tokenizer`` at ``cfg.context_length``: ``tok(list[str]) -> int64 [n, L]``."""
    import open_clip

    return open_clip.get_tokenizer(cfg.tokenizer, context_length=cfg.context_length)


def text_side_config(cfg: TextTowerConfig, out_dim: int) -> dict[str, Any]:
    """The ``config.json["text_side"]`` of a model carrying this tower."""
    return {"kind": TEXT_SIDE_KIND, **cfg.to_dict(), "out_dim": out_dim}


def attach_text_tower(model: nn.Module, cfg: TextTowerConfig, out_dim: int) -> nn.Module:
    """Create the tower and register it as ``model.text_tower``; returns it.

    The tower's parameters are then part of ``model.parameters()`` (optimizer, gradient clipping) and of its
    ``state_dict`` (``text_tower.*``: checkpoints and the export).
    """
    model.text_tower = build_text_tower(cfg, out_dim)
    return model.text_tower


def encode_tokens(tower: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """L2-normalised text embeddings ``[n, D]`` (float32) of token ids ``int64 [n, L]``."""
    return F.normalize(tower(tokens).float(), dim=-1)


class CaptionSampler:
    """Captions of the training split by key, tokenised; one caption per image drawn per batch.

    Args:
        cfg: the tower config (tokenizer, caption columns).
        manifest_dir: the training manifest.
        split: its training split.

    Raises:
        stage2_train_vision.data.samples.DataError: a key of the split has none of ``cfg.captions``.
    """

    def __init__(self, cfg: TextTowerConfig, manifest_dir: str | Path, split: str):
        rows = read_manifest(manifest_dir, columns=["key", *cfg.captions], split=split).to_pylist()
        tok = get_tokenizer(cfg)
        self.tokens: dict[str, torch.Tensor] = {}
        for r in rows:
            texts = [r[c] for c in cfg.captions if r.get(c)]
            if not texts:
                raise DataError(f"{manifest_dir}: key {r['key']!r} has none of the captions {cfg.captions}")
            self.tokens[r["key"]] = tok(texts)  # int64 [n_captions, L]

    def __call__(self, keys: Sequence[str], seed: int) -> torch.Tensor:
        """Token ids ``int64 [B, L]``: for each key one of its captions, drawn by ``default_rng(seed)``."""
        rng = np.random.default_rng(seed)
        return torch.stack([t[int(rng.integers(len(t)))] for t in (self.tokens[k] for k in keys)])


class TowerTextEncoder:
    """Eval text side of a model with its own text tower (the interface of :class:`eval.embedding.TextEncoder`).

    Args:
        tower: the trained ``TextTransformer`` (``model.text_tower``).
        cfg: its config (tokenizer and context length).
        batch_size: texts per forward pass.
        device: where the tower runs.

    ``mode`` (``single`` / ``multi``) has no meaning for a trained tower: every text is embedded as it is
    (a long caption in ``multi`` mode is embedded whole, cut at ``context_length`` tokens).
    """

    def __init__(self, tower: nn.Module, cfg: TextTowerConfig, batch_size: int = 256,
                 device: str | torch.device = "cpu"):
        self.tower, self.cfg, self.batch_size, self.device = tower.eval().to(device), cfg, batch_size, device
        self.tokenizer = get_tokenizer(cfg)
        self.identity = {"text_side": TEXT_SIDE_KIND, **cfg.to_dict()}

    @torch.no_grad()
    def encode(self, texts: Sequence[str], mode: str, desc: str = "texts") -> np.ndarray:
        """Unit vectors ``float32 [n, D]`` of ``texts``, in order."""
        del mode, desc
        out = [encode_tokens(self.tower, self.tokenizer(list(texts[i : i + self.batch_size])).to(self.device))
               for i in range(0, len(texts), self.batch_size)]
        if not out:
            return np.zeros((0, self.tower.output_dim), np.float32)
        return torch.cat(out).cpu().numpy().astype(np.float32)
