"""The FLAME vision encoder (SPEC §5): timm ViT tokens -> per-token MLP projector -> patch mean -> L2 norm."""

from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from torch import nn

from stage2_train_vision.config import ConfigError, ModelConfig
from stage2_train_vision.text_tower import encode_tokens


def projector_hidden(cfg: ModelConfig, out_dim: int) -> int:
    """H: ``cfg.proj_hidden`` if set, else ``max(D, 4096)`` (the official rule)."""
    return cfg.proj_hidden if cfg.proj_hidden is not None else max(out_dim, 4096)


class Projector(nn.Sequential):
    """``Linear(width -> H) -> GELU -> Linear(H -> D) -> LayerNorm(D)``, applied to every token ``[..., width]``."""

    def __init__(self, width: int, hidden: int, out_dim: int):
        super().__init__(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, out_dim), nn.LayerNorm(out_dim))


class FlameVisionModel(nn.Module):
    """Image encoder trained against frozen-LLM text vectors.

    Args:
        cfg: the model config; ``cfg.out_dim`` must be set (the caller fills it from the cache identity).

    Attributes:
        backbone: the timm ViT (created with ``num_classes=0``, no pooling, final norm per ``cfg.final_norm``).
        projector: :class:`Projector` into D.
        logit_scale: scalar parameter ``s``, the loss temperature is ``t = exp(s)`` (init ``log 10``).
        logit_bias: scalar parameter ``b`` of the sigmoid loss (init ``-10``).

    Raises:
        stage2_train_vision.config.ConfigError: ``cfg.out_dim`` is unset (e.g. an exported ``config.json`` without
            it), or the timm model has no ``num_prefix_tokens`` (not a ViT).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.out_dim is None:
            raise ConfigError("ModelConfig.out_dim (D) is unset: it comes from the cache identity")
        self.cfg = cfg
        overrides = {
            k: v
            for k, v in dict(patch_size=cfg.patch_size, depth=cfg.depth, embed_dim=cfg.width, num_heads=cfg.num_heads).items()
            if v is not None
        }
        self.backbone = timm.create_model(
            cfg.name, pretrained=False, num_classes=0, global_pool="", img_size=cfg.img_size,
            final_norm=cfg.final_norm, **overrides,
        )
        if not hasattr(self.backbone, "num_prefix_tokens"):
            raise ConfigError(f"timm model {cfg.name!r} is not a ViT with prefix tokens")
        self.backbone.set_grad_checkpointing(cfg.grad_checkpointing)
        self.width: int = self.backbone.num_features
        self.projector = Projector(self.width, projector_hidden(cfg, cfg.out_dim), cfg.out_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(cfg.init_logit_bias))

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``[B, N, width]`` of images ``float [B, 3, H, W]`` (prefix/class tokens dropped)."""
        return self.backbone.forward_features(images)[:, self.backbone.num_prefix_tokens :]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Mean-pooled patch tokens before the projector, ``[B, width]`` (linear-probe features, SPEC §6)."""
        return self.tokens(images).mean(dim=1)

    def forward(self, images: torch.Tensor, text: torch.Tensor | None = None):
        """L2-normalised embeddings ``[B, D]`` of images ``float [B, 3, H, W]`` (normalised with the config's mean/std).

        ``text``: token ids ``int64 [n, L]``, only for a model that carries its own text tower
        (:mod:`stage2_train_vision.text_tower`); then returns ``(image embeddings [B, D], text embeddings
        float32 [n, D])``, both through this one forward so data-parallel wrappers see every used parameter.
        """
        pooled = self.projector(self.tokens(images)).mean(dim=1)
        if text is not None:
            return F.normalize(pooled, dim=-1), encode_tokens(self.text_tower, text)
        return F.normalize(pooled, dim=-1)

    def temperature(self) -> torch.Tensor:
        """``t = exp(s)`` clamped to ``cfg.max_logit_scale`` (scalar tensor, differentiable below the clamp)."""
        return self.logit_scale.exp().clamp(max=self.cfg.max_logit_scale)
