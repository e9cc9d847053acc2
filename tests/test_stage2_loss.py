"""Stage-2 losses (SPEC §5): exact values against a naive reference, masks, and 2-process gloo equality."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from stage2_train_vision.loss import contrastive_loss, infonce_loss, sigmoid_loss


def _batch(seed: int = 0, b: int = 4, p: int = 3, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    texts = F.normalize(torch.randn(b, p, d, generator=g), dim=-1)
    valid = torch.ones(b, p, dtype=torch.bool)
    valid[1, 2] = False
    valid[3, 1:] = False
    return img, texts, valid


def _naive_sigmoid(img, texts, valid, t, bias):
    total, n = 0.0, 0
    for j in range(texts.shape[0]):
        for q in range(texts.shape[1]):
            if not valid[j, q]:
                continue
            n += 1
            for i in range(img.shape[0]):
                label = 1.0 if i == j else -1.0
                logit = t * float(img[i] @ texts[j, q]) + bias
                total -= math.log(1 / (1 + math.exp(-label * logit)))
    return total / n


def test_sigmoid_loss_matches_naive_sum_over_texts():
    img, texts, valid = _batch()
    loss = sigmoid_loss(img, texts, valid, torch.tensor(10.0), torch.tensor(-10.0))
    assert loss.item() == pytest.approx(_naive_sigmoid(img, texts, valid, 10.0, -10.0), rel=1e-6)
    # at init (t=10, b=-10) every logit lies in [-20, 0]: the loss of 9 texts x 4 images is bounded accordingly
    assert 0 < loss.item() < 4 * 20.0


def test_sigmoid_invalid_image_drops_its_row_and_its_texts():
    img, texts, valid = _batch()
    image_valid = torch.tensor([True, True, False, True])
    loss = sigmoid_loss(img, texts, valid, torch.tensor(10.0), torch.tensor(-10.0), image_valid)
    keep = [0, 1, 3]
    ref = _naive_sigmoid(img[keep], texts[keep], valid[keep], 10.0, -10.0)
    assert loss.item() == pytest.approx(ref, rel=1e-6)


def test_perfect_alignment_gives_lower_sigmoid_loss():
    img, texts, valid = _batch()
    aligned = img[:, None, :].expand_as(texts)
    t, b = torch.tensor(10.0), torch.tensor(-5.0)
    assert sigmoid_loss(img, aligned, valid, t, b) < sigmoid_loss(img, texts, valid, t, b)


def _naive_infonce(img, texts, valid, t):
    b, p, _ = texts.shape
    flat = [(j, texts[j, q]) for j in range(b) for q in range(p) if valid[j, q]]
    i2t = []
    for i in range(b):
        logits = torch.stack([t * (img[i] @ y) for _, y in flat])
        logp = logits.log_softmax(0)
        pos = [k for k, (j, _) in enumerate(flat) if j == i]
        if pos:
            i2t.append(-logp[pos].mean())
    t2i = []
    for j, y in flat:
        logits = t * img @ y
        t2i.append(-logits.log_softmax(0)[j])
    return 0.5 * (torch.stack(i2t).mean() + torch.stack(t2i).mean())


def test_infonce_matches_naive_reference():
    img, texts, valid = _batch(1)
    loss = infonce_loss(img, texts, valid, torch.tensor(10.0))
    assert loss.item() == pytest.approx(_naive_infonce(img, texts, valid, 10.0).item(), rel=1e-6)


def test_unknown_kind_is_refused():
    img, texts, valid = _batch()
    with pytest.raises(ValueError, match="unknown loss kind 'hinge'"):
        contrastive_loss("hinge", img, texts, valid, torch.tensor(1.0), torch.tensor(0.0))


# ---- two processes on gloo: loss and gradients equal the single-process loss on the same global batch ----

W, B, P, D, IN = 2, 3, 2, 6, 5


def _problem():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(W * B, IN, generator=g)
    texts = F.normalize(torch.randn(W * B, P, D, generator=g), dim=-1)
    valid = torch.ones(W * B, P, dtype=torch.bool)
    valid[4, 1] = False
    weight = torch.randn(D, IN, generator=g)
    return x, texts, valid, weight


def _loss(kind, x, texts, valid, weight, scale, bias):
    emb = F.normalize(x @ weight.T, dim=-1)
    return contrastive_loss(kind, emb, texts, valid, scale.exp(), bias)


def _reference(kind):
    x, texts, valid, w0 = _problem()
    weight = w0.clone().requires_grad_()
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    loss = _loss(kind, x, texts, valid, weight, scale, bias)
    loss.backward()
    return loss.detach(), weight.grad, scale.grad, torch.zeros(()) if bias.grad is None else bias.grad


def _worker(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    try:
        x, texts, valid, w0 = _problem()
        mine = slice(rank * B, (rank + 1) * B)
        results = {}
        for kind in ("sigmoid", "infonce"):
            weight = w0.clone().requires_grad_()
            scale = torch.tensor(math.log(10.0), requires_grad=True)
            bias = torch.tensor(-10.0, requires_grad=True)
            loss = _loss(kind, x[mine], texts[mine], valid[mine], weight, scale, bias)
            loss.backward()
            grads = [loss.detach(), weight.grad, scale.grad, torch.zeros(()) if bias.grad is None else bias.grad]
            for gr in grads:  # what DDP does: average over processes
                dist.all_reduce(gr)
                gr /= W
            results[kind] = grads
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process(tmp_path):
    """Each process holds 3 of 6 images; the averaged loss and gradients (weights, t, b) equal one process's."""
    out = tmp_path / "result.pt"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(out)), nprocs=W, join=True)
    got = torch.load(out)
    for kind in ("sigmoid", "infonce"):
        for name, g, ref in zip(("loss", "weight", "scale", "bias"), got[kind], _reference(kind)):
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7, msg=f"{kind} {name}")
