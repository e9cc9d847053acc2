"""Multi-positive contrastive losses against cached text vectors (SPEC §5), exact under data parallelism.

Batch layout: each process holds ``B`` images and, per image, ``P`` text slots (``texts [B, P, D]``,
``text_valid [B, P]``; an image with fewer than P present facets has padded, invalid slots). The global batch
is the concatenation over processes in rank order, so image ``i`` of rank ``r`` is global image ``r * B + i``.

Each process returns ``world * L_r`` where ``L = sum_r L_r`` is the loss of the global batch. Hence the mean of
the returned values over processes is ``L``, and gradients averaged over processes (what DDP / Accelerate do)
are exactly ``dL/dθ``: the same loss and gradients as one process holding the whole global batch.
Texts (and, for InfoNCE, images) of other processes are gathered with a gradient-preserving all-gather
(``torch.distributed.nn.functional.all_gather``, as open_clip gathers features).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F

from stage2_train_vision.config import ConfigError


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# open_clip's gather_features uses the same autograd all-gather (its backward sums every process's gradient of
# the gathered tensor and returns this process's slice). torch >= 2.6 marks it deprecated in favour of the private
# torch.distributed._functional_collectives; it is still the public API, so its FutureWarning is silenced here.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
                        category=FutureWarning)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` ``[n, ...]`` of every process along dim 0 in rank order, keeping gradients
    (``torch.distributed.nn.functional.all_gather``: backward sums the gradients of all processes into each
    one's input). A tensor without gradient (masks) goes through the plain ``all_gather``. Identity with one
    process."""
    _, world = _world()
    if world == 1:
        return x
    x = x.contiguous()
    if x.requires_grad:
        return torch.cat(dist_nn.all_gather(x))
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def sigmoid_loss(
    image_emb: torch.Tensor,
    texts: torch.Tensor,
    text_valid: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    image_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-positive sigmoid loss: ``-sum log sigmoid(label * (t <x_i, y_j> + b)) / (number of texts)``.

    Args:
        image_emb: ``[B, D]`` L2-normalised image embeddings (any float dtype; computed in float32).
        texts: ``[B, P, D]`` unit text vectors, slot ``(i, p)`` belongs to image ``i``.
        text_valid: ``[B, P]`` bool, which slots hold a text.
        logit_scale: scalar ``t`` (already exponentiated and clamped).
        logit_bias: scalar ``b``.
        image_valid: ``[B]`` bool; an invalid image (failed decode) adds no terms and its texts are dropped.

    Returns:
        Scalar ``world * L_r`` (see the module docstring); the label is +1 for pairs of the same image.
    """
    rank, world = _world()
    b, p, d = texts.shape
    if image_valid is None:
        image_valid = torch.ones(b, dtype=torch.bool, device=texts.device)
    text_valid = text_valid & image_valid[:, None]
    all_texts = gather(texts.float()).reshape(-1, d)  # [W*B*P, D]
    all_valid = gather(text_valid).reshape(-1)  # [W*B*P]
    owner = torch.arange(world * b, device=texts.device).repeat_interleave(p)
    mine = torch.arange(b, device=texts.device) + rank * b
    labels = (owner[None, :] == mine[:, None]).float() * 2 - 1  # [B, W*B*P]
    logits = logit_scale.float() * image_emb.float() @ all_texts.T + logit_bias.float()
    weight = (image_valid[:, None] & all_valid[None, :]).float()
    n_texts = all_valid.sum().clamp(min=1)
    return -(F.logsigmoid(labels * logits) * weight).sum() / n_texts * world


def infonce_loss(
    image_emb: torch.Tensor,
    texts: torch.Tensor,
    text_valid: torch.Tensor,
    logit_scale: torch.Tensor,
    image_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-positive InfoNCE: ``(L_image->text + L_text->image) / 2`` over the global batch.

    Image->text: for each image, the mean over its positives of ``-log softmax_j(t <x_i, y_j>)`` over all valid
    texts (SupCon "out" form), averaged over images with at least one text. Text->image: cross-entropy of each
    text over all valid images, averaged over texts. Arguments and return value as :func:`sigmoid_loss`.
    """
    rank, world = _world()
    b, p, d = texts.shape
    dev = texts.device
    if image_valid is None:
        image_valid = torch.ones(b, dtype=torch.bool, device=dev)
    text_valid = text_valid & image_valid[:, None]
    t = logit_scale.float()
    img = image_emb.float()
    all_images = gather(img)  # [W*B, D]
    all_img_valid = gather(image_valid)
    all_texts = gather(texts.float()).reshape(-1, d)
    all_valid = gather(text_valid).reshape(-1)
    owner = torch.arange(world * b, device=dev).repeat_interleave(p)
    mine = torch.arange(b, device=dev) + rank * b
    neg_inf = torch.finfo(torch.float32).min

    i2t = (t * img @ all_texts.T).masked_fill(~all_valid[None, :], neg_inf).log_softmax(dim=-1)
    positive = (owner[None, :] == mine[:, None]) & all_valid[None, :]
    n_pos = positive.sum(dim=1)
    has_pos = n_pos > 0
    per_image = -(i2t * positive).sum(dim=1) / n_pos.clamp(min=1)
    n_images = gather(has_pos).sum().clamp(min=1)

    local_texts = texts.float().reshape(-1, d)
    t2i = (t * local_texts @ all_images.T).masked_fill(~all_img_valid[None, :], neg_inf).log_softmax(dim=-1)
    target = mine.repeat_interleave(p)
    per_text = -t2i.gather(1, target[:, None]).squeeze(1)
    local_valid = text_valid.reshape(-1)
    n_texts = all_valid.sum().clamp(min=1)

    loss = (per_image * has_pos).sum() / n_images + (per_text * local_valid).sum() / n_texts
    return 0.5 * loss * world


def contrastive_loss(kind: str, image_emb, texts, text_valid, logit_scale, logit_bias, image_valid=None) -> torch.Tensor:
    """Dispatch on ``kind`` (``"sigmoid"`` | ``"infonce"``). Raises ``ValueError`` for another kind."""
    if kind == "sigmoid":
        return sigmoid_loss(image_emb, texts, text_valid, logit_scale, logit_bias, image_valid)
    if kind == "infonce":
        return infonce_loss(image_emb, texts, text_valid, logit_scale, image_valid)
    raise ConfigError(f"unknown loss kind {kind!r} (known: sigmoid, infonce)")
