"""One training micro-step (SPEC §5): forward, loss, backward, clip, optimizer and scheduler step.

The single definition of the step: :mod:`stage2_train_vision.train` runs it in its loop, and
``bench/train_throughput.py`` and ``bench/gpu_check.py`` time this very function. It touches neither the data
loader nor the checkpoint bookkeeping; :func:`prepare_step` builds what it needs around a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from stage2_train_vision.config import Config
from stage2_train_vision.loss import contrastive_loss
from stage2_train_vision.model import FlameVisionModel
from stage2_train_vision.optim import build_optimizer, build_scheduler
from stage2_train_vision.text_tower import CaptionSampler


@dataclass
class StepParts:
    """What a micro-step works on.

    Attributes:
        accelerator: the run's Accelerator (device, autocast, gradient accumulation and synchronisation).
        model: the model as ``accelerator.prepare`` returned it (wrapped for data parallelism under several
            processes).
        core: the unwrapped :class:`FlameVisionModel` (``temperature()``, ``logit_bias``).
        optimizer: AdamW as prepared (:func:`stage2_train_vision.optim.build_optimizer`).
        scheduler: the per-optimizer-step LR schedule (not prepared; stepped once per optimizer step).
        loss_kind: ``cfg.loss.kind`` (``"sigmoid"`` or ``"infonce"``).
        grad_clip: ``cfg.optim.grad_clip``, the max gradient norm (``<= 0``: no clipping).
        captions: a text-tower run's caption sampler (:mod:`stage2_train_vision.text_tower`); ``None`` for the
            FLAME recipe (texts are the batch's cache vectors).
    """

    accelerator: Accelerator
    model: nn.Module
    core: FlameVisionModel
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    loss_kind: str
    grad_clip: float
    captions: CaptionSampler | None = None


class StepResult(NamedTuple):
    """What :func:`train_step` returns.

    Attributes:
        loss: this process's loss of the micro-batch, a detached float32 scalar on the accelerator's device.
        synced: ``True`` when the micro-step ended an accumulation cycle (the optimizer and the scheduler
            stepped), ``False`` on an accumulation-only micro-step.
    """

    loss: torch.Tensor
    synced: bool


def prepare_step(cfg: Config, accelerator: Accelerator, model: FlameVisionModel, total_steps: int,
                 captions: CaptionSampler | None = None) -> StepParts:
    """Build the optimizer (``cfg.optim``) and the schedule over ``total_steps`` optimizer steps for ``model``,
    pass the model and the optimizer through ``accelerator.prepare`` and return the :class:`StepParts`.

    ``model`` is built and initialised by the caller (its weights, and any ``model.text_tower``, are final).
    """
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    return StepParts(accelerator, prepared, accelerator.unwrap_model(prepared), optimizer, scheduler,
                     cfg.loss.kind, cfg.optim.grad_clip, captions)


def train_step(parts: StepParts, batch: dict[str, Any], caption_seed: int | None = None) -> StepResult:
    """One micro-step on ``batch`` (the model must be in train mode).

    Inside ``accelerator.accumulate``: forward under ``accelerator.autocast()``, the contrastive loss over the
    global batch (:func:`stage2_train_vision.loss.contrastive_loss`), backward, gradient clipping when the
    gradients are synchronised, ``optimizer.step()`` and ``zero_grad`` (Accelerate skips both on accumulation
    micro-steps); then ``scheduler.step()`` once the cycle is complete.

    Args:
        parts: see :class:`StepParts`.
        batch: a :func:`stage2_train_vision.data.pairs.collate` batch: ``images float32 [B, 3, S, S]``, ``texts
            float32 [B, P, D]``, ``text_valid bool [B, P]``, ``image_valid bool [B]`` (host or device
            tensors), and ``keys list[str]`` when ``parts.captions`` is set.
        caption_seed: seed of the caption draw of a text-tower run (one caption per image, P = 1); the
            training loop passes ``sample_seed(seed, epoch, batch index, rank)``. Unused otherwise.

    Returns:
        :class:`StepResult`.
    """
    accelerator, model, core = parts.accelerator, parts.model, parts.core
    images = batch["images"].to(accelerator.device, non_blocking=True)
    with accelerator.accumulate(model):
        texts, text_valid = batch["texts"], batch["text_valid"]
        with accelerator.autocast():
            if parts.captions is None:
                emb = model(images)
            else:  # one caption per image through the tower: P = 1
                tokens = parts.captions(batch["keys"], caption_seed)
                emb, texts = model(images, tokens.to(accelerator.device))
                texts, text_valid = texts[:, None], torch.ones(len(tokens), 1, dtype=torch.bool)
        loss = contrastive_loss(
            parts.loss_kind, emb, texts.to(emb.device), text_valid.to(emb.device),
            core.temperature(), core.logit_bias, batch["image_valid"].to(emb.device),
        )
        accelerator.backward(loss)
        if accelerator.sync_gradients and parts.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), parts.grad_clip)
        parts.optimizer.step()
        parts.optimizer.zero_grad(set_to_none=True)
    synced = accelerator.sync_gradients
    if synced:
        parts.scheduler.step()
    return StepResult(loss.detach(), synced)
