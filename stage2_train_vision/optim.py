"""AdamW with selective weight decay and a cosine schedule with linear warm-up (SPEC §5)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from stage2_train_vision.config import OptimConfig

NO_DECAY_NAMES = ("logit_scale", "logit_bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay on weight matrices/tensors (ndim >= 2), none on biases, norm weights, any other
    1-D or scalar parameter, and the loss's ``logit_scale``/``logit_bias``. Frozen parameters are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY_NAMES
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with ``cfg.lr``, ``cfg.betas``, ``cfg.eps``, ``cfg.weight_decay``."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


# Kept rather than transformers' get_cosine_with_min_lr_schedule_with_warmup: that one trains its first step at
# lr 0 (step / warmup) and rises again past total_steps; ours is open_clip_train's cosine_lr ((step + 1) / warmup,
# clamped at the end) and equals transformers' at every step after warm-up (tests/test_stage2_model.py).
def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): ``(step + 1) / warmup`` during warm-up, then a cosine
    from 1 down to ``min_ratio`` at ``total_steps`` (and ``min_ratio`` after it)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    """Per-optimizer-step :class:`LambdaLR` of :func:`cosine_with_warmup` (warm-up capped at ``total_steps``)."""
    warmup = min(cfg.warmup_steps, total_steps)
    return LambdaLR(optimizer, lambda s: cosine_with_warmup(s, warmup, total_steps, cfg.min_lr_ratio))
