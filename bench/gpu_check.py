"""GPU readiness check: the GPU path of both stages measured in one command, random weights, no downloads.

::

    python bench/gpu_check.py --tiny --device cuda --json tiny.json   # seconds: the smoke test before the full run
    python bench/gpu_check.py --json gpu_check.json                   # full shapes, ~2-4 min on one H100 / H200
    python bench/gpu_check.py --tiny --json /tmp/tiny.json            # the same code at tiny shapes on the CPU

Without ``--tiny`` the run needs a CUDA device: on a machine without one it stops at once with one line and exit
code 2 (the full shapes would take hours on a CPU), unless ``--device cpu`` forces it. Everything is built in
the process from random weights: nothing is read from a hub or a cache, so the only project dependency beyond
torch / transformers / timm / accelerate / pyarrow / numpy is ``zarr`` (imported by the cache code the encoder
and trainer share; ``bench/README.md`` says which wheels to bring along).

Sections, in this order (the JSON is rewritten after each one, so a run cut short keeps what it measured; each
section records its peak memory: the device's ``max_memory_allocated`` / ``max_memory_reserved`` on CUDA and
the process's peak RSS):

1. **Machine**: CPU model and the matmul-relevant flags (``/proc/cpuinfo``), GPU name/capability/memory, driver,
   CUDA and cuDNN versions, library versions, and the **matmul peak**: best FLOP/s of ``torch.matmul`` on two
   ``peak_size``-square bf16 matrices on the run's device (``2 * size**3`` FLOPs per product), after products
   for ``peak_warmup_s`` (~1 s: a GPU starts at idle clocks); measured again at the end of the run. MFU is
   reported against the better of the two measured peaks (``mfu``) and against the datasheet's dense bf16
   peak of the named GPU (``mfu_spec``, :data:`SPEC_BF16_TFLOPS`; H100 SXM and H200: 989 TFLOP/s).
2. **Stage-1 parity** (always a tiny Mistral-shaped decoder, 4 blocks, read out at layer 3): the same weights run
   by :class:`~stage1_embed_text.encode.encoder.FacetEncoder` on the run's device (eager and SDPA attention) and on the
   CPU (SDPA), in fp32 and in bf16; the smallest cosine per facet vector must be >= 0.999.
3. **Stage-1 throughput**: a decoder with Mistral-Nemo-12B's shape (40 blocks, hidden 5120, 32 heads of 128, 8 KV
   heads, FFN 14336, vocabulary 131072) with random bf16 weights created directly on the device and cut at the
   FLAME readout layer 39 by :func:`~stage1_embed_text.backends.llm.prepare_llm`; a byte-level BPE tokenizer built
   offline (``tests/helpers/stage1_tiny.py``); :class:`FacetEncoder` (packing, facet masks, length buckets, readout) over
   synthetic FLAME-length caption sets (raw 10-40, short 30-80, long 150-300 caption tokens), once with SDPA and
   once with eager attention. Reported: captions/s (texts: a sample's raw, short and long caption are 3),
   useful tokens/s and MFU::

       MFU = useful FLOPs / seconds / peak
       useful FLOPs = sum over packed texts of  2 * P_blocks * n  +  layers * 4 * heads * head_dim * pairs

   (``bench/stage1_throughput.py``'s :func:`useful_flops`: ``P_blocks`` = parameters of the blocks that run,
   ``n`` = tokens of the packed text, ``pairs`` = (query, key) pairs the facet mask allows). The SDPA warm-up
   records the **SDPA kernel** that ran with the encoder's 4-D additive facet mask (the aten ops seen by
   ``torch.profiler``) and, on the arguments of that very call, which kernels run when
   ``torch.nn.attention.sdpa_kernel`` allows only one (flash, efficient, cuDNN, math): the check fails when the
   encoder ran the math kernel, i.e. when no fused kernel takes the mask. The smallest cosine between the SDPA
   and the eager facet vectors must be >= 0.99.
4. **Stage 2**: the recipe ``configs/flame-cc3m-vitb16.toml`` (ViT-B/16 at 224 px, per-token projector with
   H = 5120 into D = 5120, P = 6 positives, sigmoid loss, AdamW with selective decay and its cosine schedule,
   grad clip 1.0, bf16 through Accelerate) at its per-GPU batch (3072 / 8 = 384), built with the project's
   :class:`FlameVisionModel`, :func:`build_optimizer`, :func:`build_scheduler` and :func:`contrastive_loss`, fed
   synthetic images ``float32 [B, 3, 224, 224]`` and unit cache vectors ``float32 [B, P, D]`` from pinned host
   memory (on CUDA) through the training loop's own step (:func:`stage2_train_vision.step.train_step`); then plain
   ``timm`` (the same ViT, timm's defaults) + the same :class:`Projector` with a one-positive sigmoid loss,
   ``torch.optim.AdamW`` and ``torch.autocast``, on the same batch in the same run. Reported: images/s for both,
   ours / plain, and MFU::

       MFU = images/s * 3 * F / peak      (backward = 2 x forward)
       F   = 2 * N * (3 * p * p * w)                                     patch embedding
           + sum over blocks of 2 * T * (weights of its Linear layers)  +  depth * 4 * T**2 * w   (QK^T and AV)
           + 2 * N * (weights of the projector's Linear layers)

   (``N`` patches, ``T = N + prefix tokens``, ``w`` width, ``p`` patch side; norms, GELU, softmax and the loss
   are left out). Two parity checks on the same weights: the **forward** of a few images under the device's
   bf16 autocast against an fp32 copy of the model on the CPU (smallest cosine of the embeddings >= 0.99),
   and the **sigmoid loss** of one batch on the device vs on the CPU from the same fp32 embeddings (relative
   difference <= 1e-5).

The run ends with ``checks`` (each True/False) and exit code 3 when one fails, after everything is written
(1 stays what it is for Python: a crash; 2 is refused input).
``--tiny`` runs all of it with tiny shapes (decoder hidden 128; ViT width 64 at 32 px, batch 16) and a few
samples/steps, on the CPU unless ``--device`` says otherwise. On CUDA, timings are bracketed by
``torch.cuda.synchronize``; on the CPU the synchronisation is a no-op, so ``--tiny`` runs the same code.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Runs from a plain checkout (a GPU machine has the project's files but no editable install); the offline
# tokenizer comes from the stage-1 test helpers.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from gpu_facts import (  # noqa: E402  (bench/ is on sys.path as a script)
    machine_info,
    matmul_peak,
    memory_peak,
    mfu,
    reset_memory_peak,
    sdpa_report,
    sync,
)
from stage1_throughput import packed_texts, useful_flops  # noqa: E402

log = logging.getLogger("bench.gpu_check")

# Mistral-Nemo-Instruct-2407's decoder (its config.json; the Base model has the same shape), read out at
# hidden_states[39] (FLAME's recipe).
NEMO = dict(
    vocab_size=131072, hidden_size=5120, intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=1024000, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, sliding_window=None,
)
TINY_DECODER = dict(
    vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, sliding_window=None,
)
RECIPE = ROOT / "configs" / "flame-cc3m-vitb16.toml"
RECIPE_PROCESSES = 8  # the recipe's global batch 3072 is 8 GPUs x 384
PARITY_MIN_COSINE = 0.999
FULL_SHAPE_MIN_COSINE = 0.99  # SDPA vs eager facet vectors of the Nemo-shaped decoder in bf16
FORWARD_MIN_COSINE = 0.99  # stage-2 embeddings: device bf16 autocast vs CPU fp32
FORWARD_IMAGES = 4
CHECK_FAILED = 3  # exit code of a run that ran through but failed a check (1 is a crash, 2 refused input)
LOSS_RTOL = 1e-5
# Caption lengths in tokens, per group (FLAME: alt-text raw captions, short and long MLLM recaptions).
CAPTION_TOKENS = {"raw": (10, 40), "short": (30, 80), "long": (150, 300)}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Everything ``--tiny`` scales down.

    Attributes:
        decoder: ``MistralConfig`` fields of the stage-1 throughput decoder.
        layer: readout ``hidden_states`` index (blocks that run).
        samples / warmup_samples: caption sets timed / run once before timing, per attention kind.
        max_batch_tokens: the encoder's padded tokens per forward batch.
        peak_size / peak_inner: matmul side and products per timed repetition.
        peak_warmup_s: seconds of products before the peak is timed (GPU clocks ramp up from idle).
        vit: ``ModelConfig`` overrides of the recipe's model (empty = ViT-B/16 at 224 px as in the recipe).
        batch: images per step; ``None`` = the recipe's per-GPU batch.
        steps / warmup_steps: timed / untimed training steps per model.
    """

    decoder: dict
    layer: int
    samples: int
    warmup_samples: int
    max_batch_tokens: int
    peak_size: int
    peak_inner: int
    peak_warmup_s: float
    vit: dict
    batch: int | None
    steps: int
    warmup_steps: int


FULL = Sizes(NEMO, 39, samples=256, warmup_samples=8, max_batch_tokens=16384, peak_size=8192, peak_inner=10,
             peak_warmup_s=1.0, vit={}, batch=None, steps=20, warmup_steps=3)
TINY = Sizes(TINY_DECODER, 3, samples=6, warmup_samples=2, max_batch_tokens=1024, peak_size=512, peak_inner=2,
             peak_warmup_s=0.1, vit=dict(img_size=32, patch_size=8, depth=2, width=64, num_heads=2, proj_hidden=128),
             batch=16, steps=3, warmup_steps=1)


# ---------------------------------------------------------------------------------------------- machine


# ---------------------------------------------------------------------------------------------- stage 1


def caption_sets(tokenizer, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` deterministic caption sets whose captions have :data:`CAPTION_TOKENS` tokens in ``tokenizer``.

    Words are drawn from a fixed descriptive vocabulary until the caption's token count (summed per word:
    the byte-level pre-tokenizer never merges across words) reaches a length drawn uniformly per group.
    """
    words = ("a photo of the red green blue small large wooden metal old young person dog cat street city "
             "building window table chair sky cloud tree grass river mountain road car bicycle light shadow "
             "background foreground left right center standing sitting holding wearing looking near behind "
             "bright dark soft detailed texture pattern colourful scene image shows with and in on at").split()
    cost = {w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in words}
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = {}
        for group, (lo, hi) in CAPTION_TOKENS.items():
            target, text, used = rng.randint(lo, hi), [], 0
            while used < target:
                w = rng.choice(words)
                text.append(w)
                used += cost[w]
                if rng.random() < 0.08:
                    text[-1] += rng.choice((",", "."))
                    used += 1
            s[group] = " ".join(text).capitalize()
        out.append(s)
    return out


def random_decoder(shape: dict, layer: int, device: torch.device, dtype: torch.dtype, attn: str, seed: int = 0):
    """A ``MistralModel`` of ``shape`` with random weights created on ``device`` in ``dtype``, wrapped by
    :func:`prepare_llm` (cut to ``layer`` blocks, final norm kept aside) with the offline test tokenizer."""
    from transformers import AutoModel, MistralConfig

    from stage1_embed_text.backends.llm import prepare_llm
    from tests.helpers.stage1_tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = MistralConfig(**shape, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModel.from_config(cfg, dtype=dtype, attn_implementation=attn)
    p = next(model.parameters())
    if p.device.type != device.type or p.dtype != dtype:  # a transformers version that ignored the context
        model = model.to(device=device, dtype=dtype)
    name = f"random-mistral-h{shape['hidden_size']}-l{shape['num_hidden_layers']}"
    return prepare_llm(model, tok, name=name, fingerprint=f"random:{name}:{seed}", layer=layer)


def set_attention(llm, impl: str) -> None:
    """Switch the decoder between ``"eager"`` and ``"sdpa"`` attention in place."""
    if hasattr(llm.model, "set_attn_implementation"):
        llm.model.set_attn_implementation(impl)
    else:
        llm.model.config._attn_implementation = impl


def unit_rows(vectors: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The present facet vectors ``float32 [R, D]`` of an encoder output (``[n, F, D]``, mask ``[n, F]``)."""
    return vectors[mask]


def stage1_parity(device: torch.device, seed: int = 0) -> dict:
    """Tiny decoder, same weights: the device (eager, SDPA) vs the CPU (SDPA), in fp32 and bf16.

    Returns ``{"pairs": [{dtype, attn, min_cosine}], "min_cosine", "ok"}``; cosines are between unit facet
    vectors of the same caption sets (4 sets = 44 vectors).
    """
    from stage1_embed_text.encode.encoder import FacetEncoder

    pairs = []
    for dtype in (torch.float32, torch.bfloat16):
        ref_llm = random_decoder(TINY_DECODER, TINY.layer, torch.device("cpu"), dtype, "sdpa", seed)
        samples = caption_sets(ref_llm.tokenizer, 4, seed=1)
        ref = FacetEncoder(ref_llm, context_tokens=1024).encode(samples)
        dev_llm = random_decoder(TINY_DECODER, TINY.layer, device, dtype, "sdpa", seed + 1)
        dev_llm.model.load_state_dict(ref_llm.model.state_dict())
        for attn in ("eager", "sdpa"):
            set_attention(dev_llm, attn)
            out = FacetEncoder(dev_llm, context_tokens=1024).encode(samples)
            assert (out.mask == ref.mask).all()
            cos = (unit_rows(out.vectors, out.mask) * unit_rows(ref.vectors, ref.mask)).sum(-1)
            pairs.append({"dtype": str(dtype).removeprefix("torch."), "attn": attn, "vectors": int(cos.size),
                          "min_cosine": round(float(cos.min()), 6)})
    worst = min(p["min_cosine"] for p in pairs)
    return {"device": str(device), "reference": "cpu sdpa, same dtype", "pairs": pairs, "min_cosine": worst,
            "ok": worst >= PARITY_MIN_COSINE}


def stage1_throughput(sizes: Sizes, device: torch.device, peak: float, spec: float | None) -> dict:
    """Nemo-shaped (or tiny) decoder in bf16 through :class:`FacetEncoder`, SDPA and eager attention; MFU against
    the measured ``peak`` (FLOP/s) and the datasheet ``spec`` (TFLOP/s, ``None`` = unknown)."""
    from stage1_embed_text.encode.encoder import FacetEncoder

    t0 = time.perf_counter()
    llm = random_decoder(sizes.decoder, sizes.layer, device, torch.bfloat16, "sdpa")
    sync(device)
    build_s = time.perf_counter() - t0
    samples = caption_sets(llm.tokenizer, sizes.samples)
    warm = caption_sets(llm.tokenizer, sizes.warmup_samples, seed=99)
    enc = FacetEncoder(llm, context_tokens=1024, max_batch_tokens=sizes.max_batch_tokens)
    seqs = packed_texts(llm, samples, enc.context_tokens)
    tokens = sum(len(s) for s in seqs)
    flops = useful_flops(llm, seqs)
    log.info("stage 1: %s built on %s in %.1f s; %d samples = %d texts, %d tokens, %.3g TFLOP",
             llm.name, device, build_s, len(samples), len(seqs), tokens, flops / 1e12)
    runs, vectors, kernel = [], {}, {}
    for attn in ("sdpa", "eager"):
        set_attention(llm, attn)
        if attn == "sdpa":  # the warm-up, profiled: which SDPA kernel the facet mask gets
            kernel = sdpa_report(functools.partial(enc.encode, warm), device)
            log.info("stage 1 SDPA kernel with the facet mask: %s (alone: %s)", kernel.get("used"),
                     ", ".join(f"{r['kernel']} {'ok' if r['works'] else 'no'}" for r in kernel.get("alone", [])))
        else:
            enc.encode(warm)
        sync(device)
        t = time.perf_counter()
        out = enc.encode(samples)
        sync(device)
        sec = time.perf_counter() - t
        if int(out.tokens.sum()) != tokens:
            raise RuntimeError(f"encoder packed {int(out.tokens.sum())} tokens, the FLOP count assumed {tokens}")
        vectors[attn] = unit_rows(out.vectors, out.mask)
        achieved = flops / sec / 1e12
        runs.append({"attn": attn, "seconds": round(sec, 3), "captions_per_s": round(len(seqs) / sec, 2),
                     "samples_per_s": round(len(samples) / sec, 2), "tokens_per_s": round(tokens / sec, 1),
                     "achieved_tflops": float(f"{achieved:.4g}"), "mfu": mfu(achieved, peak / 1e12),
                     "mfu_spec": mfu(achieved, spec)})
        log.info("stage 1 %s: %.2f s, %.0f tokens/s, MFU %.1f%%", attn, sec, tokens / sec, 100 * runs[-1]["mfu"])
    cfg = llm.model.config
    result = {
        "decoder": {"hidden": cfg.hidden_size, "ffn": cfg.intermediate_size, "heads": cfg.num_attention_heads,
                    "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "blocks": llm.num_layers,
                    "readout_layer": llm.layer, "block_params": sum(p.numel() for p in llm.model.layers.parameters()),
                    "dtype": "bfloat16"},
        "build_s": round(build_s, 1), "max_batch_tokens": sizes.max_batch_tokens, "samples": len(samples),
        "texts": len(seqs), "useful_tokens": tokens, "tokens_per_sample": round(tokens / len(samples), 1),
        "useful_tflop": round(flops / 1e12, 3), "runs": runs,
        "sdpa_speedup_vs_eager": round(runs[1]["seconds"] / runs[0]["seconds"], 3),
        "min_cosine_sdpa_vs_eager": round(float((vectors["sdpa"] * vectors["eager"]).sum(-1).min()), 5),
        "sdpa_kernel": kernel,
    }
    del llm, enc
    return result


# ---------------------------------------------------------------------------------------------- stage 2


def forward_flops_per_image(backbone, projector) -> float:
    """``F`` of the module docstring: forward FLOPs of one image through a timm ViT and the projector."""
    n = backbone.patch_embed.num_patches
    t = n + backbone.num_prefix_tokens
    width = backbone.num_features
    blocks = list(backbone.blocks)
    linear = sum(m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear))
    proj = sum(m.weight.numel() for m in projector.modules() if isinstance(m, torch.nn.Linear))
    return (2.0 * n * backbone.patch_embed.proj.weight.numel() + 2.0 * t * linear
            + len(blocks) * 4.0 * t * t * width + 2.0 * n * proj)


def recipe_config(sizes: Sizes, out_dim: int):
    """The recipe's config, its model config with ``out_dim`` (and ``sizes.vit``'s overrides), and the batch."""
    from stage2_train_vision.config import load_config

    cfg = load_config(RECIPE)
    model_cfg = dataclasses.replace(cfg.model, out_dim=out_dim, **sizes.vit)
    batch = sizes.batch or cfg.train.batch_size // RECIPE_PROCESSES
    return cfg, model_cfg, batch


def synthetic_batch(batch: int, positives: int, dim: int, img: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A loader-shaped host batch: ``images float32 [B, 3, img, img]`` (normalised scale), ``texts float32
    [B, P, D]`` unit vectors rounded through float16 (as stored in the cache), ``text_valid bool [B, P]`` (every
    4th image has only P - 2 facets), ``image_valid bool [B]`` (all True)."""
    g = torch.Generator().manual_seed(seed)
    texts = F.normalize(torch.randn(batch, positives, dim, generator=g), dim=-1).half().float()
    valid = torch.ones(batch, positives, dtype=torch.bool)
    valid[::4, -2:] = False
    return {"images": torch.randn(batch, 3, img, img, generator=g), "texts": texts, "text_valid": valid,
            "image_valid": torch.ones(batch, dtype=torch.bool)}


def timed_steps(step: Callable[[dict], None], batch: dict, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` calls of ``step(batch)`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step(batch)
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step(batch)
    sync(device)
    return time.perf_counter() - t


def ours_step(cfg, model_cfg, device: torch.device, total_steps: int):
    """``(step, model, accelerator)``: the recipe's model/optimizer/scheduler under Accelerate
    (:func:`stage2_train_vision.step.prepare_step`), and ``step(batch)`` = the shipped micro-step,
    :func:`stage2_train_vision.step.train_step`, the one ``stage2_train_vision/train.py``'s loop runs (here with
    one process and no accumulation)."""
    from accelerate import Accelerator

    from stage2_train_vision.model import FlameVisionModel
    from stage2_train_vision.step import prepare_step, train_step

    accelerator = Accelerator(mixed_precision="bf16", cpu=device.type == "cpu")
    parts = prepare_step(cfg, accelerator, FlameVisionModel(model_cfg), total_steps)
    parts.model.train()

    def step(b: dict) -> None:
        train_step(parts, b)

    return step, parts.model, accelerator


def plain_step(cfg, model_cfg, device: torch.device):
    """``(step, modules)``: plain timm ViT (timm defaults: final norm kept) + the same :class:`Projector`, mean of
    the patch tokens, a one-positive sigmoid loss (each image's first text), plain AdamW, ``torch.autocast``."""
    import timm

    from stage2_train_vision.model import Projector, projector_hidden

    over = {k: v for k, v in dict(patch_size=model_cfg.patch_size, depth=model_cfg.depth, embed_dim=model_cfg.width,
                                  num_heads=model_cfg.num_heads).items() if v is not None}
    vit = timm.create_model(model_cfg.name, pretrained=False, num_classes=0, global_pool="",
                            img_size=model_cfg.img_size, **over).to(device)
    proj = Projector(vit.num_features, projector_hidden(model_cfg, model_cfg.out_dim), model_cfg.out_dim).to(device)
    scale_bias = torch.nn.Parameter(torch.tensor([math.log(10.0), -10.0], device=device))
    params = [*vit.parameters(), *proj.parameters(), scale_bias]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)
    vit.train()
    proj.train()

    def step(b: dict) -> None:
        images = b["images"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            emb = F.normalize(proj(vit.forward_features(images)[:, vit.num_prefix_tokens :]).mean(1).float(), dim=-1)
        text = b["texts"][:, 0].to(device)
        logits = scale_bias[0].exp() * emb @ text.T + scale_bias[1]
        labels = 2 * torch.eye(len(emb), device=device) - 1
        loss = -F.logsigmoid(labels * logits).sum() / len(emb)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, (vit, proj)


def loss_parity(cfg, model, accelerator, batch: dict) -> dict:
    """The recipe's loss for the same batch on the device and on the CPU (fp32 embeddings from the device model)."""
    from stage2_train_vision.loss import contrastive_loss

    core = accelerator.unwrap_model(model)
    with torch.no_grad(), accelerator.autocast():
        emb = model(batch["images"].to(accelerator.device)).float()
    t, b = core.temperature().detach(), core.logit_bias.detach()
    values = {}
    for label, where in (("device", accelerator.device), ("cpu", torch.device("cpu"))):
        values[label] = float(contrastive_loss(
            cfg.loss.kind, emb.to(where), batch["texts"].to(where), batch["text_valid"].to(where), t.to(where),
            b.to(where), batch["image_valid"].to(where)))
    rel = abs(values["device"] - values["cpu"]) / max(abs(values["cpu"]), 1e-12)
    return {"loss": cfg.loss.kind, "device": values["device"], "cpu": values["cpu"], "relative_difference": rel,
            "rtol": LOSS_RTOL, "ok": rel <= LOSS_RTOL, "fp32_matmul_precision": torch.get_float32_matmul_precision()}


def forward_parity(model_cfg, model, accelerator, images: torch.Tensor) -> dict:
    """Embeddings of ``images`` (``float32 [n, 3, S, S]``, host) from the prepared ``model`` on its device under
    the run's autocast (bf16) vs a fresh :class:`FlameVisionModel` on the CPU in fp32 with the same weights.

    Returns ``{images, min_cosine, mean_cosine, ok}``; ``ok`` when the smallest cosine is >= FORWARD_MIN_COSINE.
    """
    from stage2_train_vision.model import FlameVisionModel

    core = accelerator.unwrap_model(model)
    reference = FlameVisionModel(model_cfg)
    reference.load_state_dict({k: v.detach().float().cpu() for k, v in core.state_dict().items()})
    reference.eval()
    model.eval()
    with torch.no_grad():
        with accelerator.autocast():
            on_device = model(images.to(accelerator.device)).float().cpu()
        on_cpu = reference(images)
    model.train()
    cos = (F.normalize(on_device, dim=-1) * F.normalize(on_cpu, dim=-1)).sum(-1)
    return {"images": len(images), "device": str(accelerator.device), "device_precision": "bf16 autocast",
            "reference": "cpu fp32", "min_cosine": round(float(cos.min()), 6),
            "mean_cosine": round(float(cos.mean()), 6), "min_cosine_needed": FORWARD_MIN_COSINE,
            "ok": float(cos.min()) >= FORWARD_MIN_COSINE}


def stage2(sizes: Sizes, device: torch.device, peak: float, spec: float | None, out_dim: int) -> dict:
    """Recipe step vs plain timm + projector: images/s, MFU (against the measured ``peak`` in FLOP/s and the
    datasheet ``spec`` in TFLOP/s) and the ratio; forward and loss parity on the same batch. On CUDA the host
    batch is pinned, as the training loader's is, so its copies are asynchronous."""
    cfg, model_cfg, batch = recipe_config(sizes, out_dim)
    data = synthetic_batch(batch, cfg.data.positives, out_dim, model_cfg.img_size)
    if device.type == "cuda":
        data = {k: v.pin_memory() for k, v in data.items()}
    pinned = all(v.is_pinned() for v in data.values())
    step, model, accelerator = ours_step(cfg, model_cfg, device, sizes.warmup_steps + sizes.steps)
    core = accelerator.unwrap_model(model)
    fwd = forward_flops_per_image(core.backbone, core.projector)
    shape = {"name": model_cfg.name, "img_size": model_cfg.img_size, "patch": core.backbone.patch_embed.patch_size[0],
             "blocks": len(core.backbone.blocks), "width": core.width, "overrides": sizes.vit,
             "proj_hidden": model_cfg.proj_hidden, "out_dim": out_dim,
             "params": sum(q.numel() for q in core.parameters())}
    forward = forward_parity(model_cfg, model, accelerator, data["images"][:FORWARD_IMAGES])
    parity = loss_parity(cfg, model, accelerator, data)
    rows = {}
    sec = timed_steps(step, data, sizes.warmup_steps, sizes.steps, device)
    rows["ours"] = sec
    log.info("stage 2 ours: %.1f images/s", sizes.steps * batch / sec)
    del step, model, core
    gc.collect()
    plain, _ = plain_step(cfg, model_cfg, device)
    rows["plain timm + projector"] = timed_steps(plain, data, sizes.warmup_steps, sizes.steps, device)
    del plain
    out = {}
    for name, s in rows.items():
        rate = sizes.steps * batch / s
        achieved = rate * 3 * fwd / 1e12
        out[name] = {"seconds": round(s, 3), "images_per_s": round(rate, 1), "achieved_tflops": float(f"{achieved:.4g}"),
                     "mfu": mfu(achieved, peak / 1e12), "mfu_spec": mfu(achieved, spec)}
    return {
        "model": shape,
        "batch": batch, "pinned_host_batch": pinned, "positives": cfg.data.positives, "steps": sizes.steps, "warmup_steps": sizes.warmup_steps,
        "mixed_precision": "bf16", "optimizer": {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas),
                                                 "weight_decay": cfg.optim.weight_decay, "grad_clip": cfg.optim.grad_clip},
        "forward_gflop_per_image": round(fwd / 1e9, 3), "runs": out,
        "ours_vs_plain": round(rows["plain timm + projector"] / rows["ours"], 3),  # same steps x batch
        "forward_parity": forward,
        "loss_parity": parity,
    }


# ---------------------------------------------------------------------------------------------- report


def pct(value: float | None) -> str:
    """``0.4123`` -> ``"41.2%"``; ``None`` -> ``"-"``."""
    return "-" if value is None else f"{100 * value:.1f}%"


def markdown(result: dict) -> str:
    """The printed summary: machine line, stage-1 and stage-2 tables, kernel, parity, memory and check lines."""
    m = result["machine"]
    gpu = m.get("gpu", {})
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items() if v)
    lines = [f"\ngpu_check{' --tiny' if result['tiny'] else ''}: {gpu.get('name', 'CPU')} ({m['device']}); "
             f"driver {gpu.get('driver', '-')}, CUDA {gpu.get('cuda', '-')}, cuDNN {gpu.get('cudnn', '-')}; "
             f"CPU {m['cpu']['model']} [{' '.join(m['cpu']['flags']) or 'no avx2/avx512/amx'}], "
             f"{m['cpu']['logical_cores']} cores; Python {m['python']}, torch {m['torch']}, {libs}",
             f"matmul peak bf16 ({result['peak_size']}^2): {result['matmul_peak_tflops']} TFLOP/s at the start, "
             f"{result.get('matmul_peak_end_tflops', '?')} at the end; MFU below against "
             f"{result.get('mfu_peak_tflops', result['matmul_peak_tflops'])} (measured) and "
             f"{m['spec_peak_tflops'] or '-'} (datasheet); total {result.get('elapsed_s', '?')} s", ""]
    if "stage1_parity" in result:
        p = result["stage1_parity"]
        lines.append(f"stage-1 parity (tiny decoder, {p['device']} vs cpu): min cosine {p['min_cosine']} "
                     f"({'ok' if p['ok'] else 'FAILED'}, need >= {PARITY_MIN_COSINE}); "
                     + ", ".join(f"{q['dtype']}/{q['attn']} {q['min_cosine']}" for q in p["pairs"]))
    if "stage1" in result:
        s = result["stage1"]
        d = s["decoder"]
        k = s["sdpa_kernel"]
        alone = ", ".join(f"{r['kernel']} {'runs' if r['works'] else 'refuses'}" for r in k.get("alone", []))
        lines += ["", f"stage 1: decoder hidden {d['hidden']}, FFN {d['ffn']}, {d['heads']}/{d['kv_heads']} heads, "
                  f"{d['readout_layer']} of {d['blocks']} blocks, bf16; {s['samples']} caption sets = {s['texts']} "
                  f"texts, {s['useful_tokens']} tokens ({s['tokens_per_sample']}/set); sdpa vs eager min cosine "
                  f"{s['min_cosine_sdpa_vs_eager']} (need >= {FULL_SHAPE_MIN_COSINE})",
                  f"SDPA kernel with the 4-D facet mask {k.get('call', {}).get('mask')}: "
                  f"{', '.join(k.get('used', [])) or 'none seen'} ({'ok' if k.get('ok') else 'FAILED'}); alone: {alone}",
                  "", "| attention | s | captions/s | tokens/s | TFLOP/s | MFU measured | MFU datasheet |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['attn']} | {r['seconds']} | {r['captions_per_s']} | {r['tokens_per_s']} | "
                  f"{r['achieved_tflops']} | {pct(r['mfu'])} | {pct(r['mfu_spec'])} |" for r in s["runs"]]
    if "stage2" in result:
        s = result["stage2"]
        lp, fp = s["loss_parity"], s["forward_parity"]
        lines += ["", f"stage 2: {s['model']['name']} at {s['model']['img_size']} px, projector {s['model']['proj_hidden']}"
                  f" -> {s['model']['out_dim']}, batch {s['batch']} ({'pinned' if s['pinned_host_batch'] else 'not pinned'}),"
                  f" P={s['positives']}, bf16, {s['steps']} steps; {s['forward_gflop_per_image']} GFLOP/image forward",
                  "", "| step | s | images/s | TFLOP/s | MFU measured | MFU datasheet | vs plain |",
                  "|---|---|---|---|---|---|---|"]
        plain = s["runs"]["plain timm + projector"]["seconds"]
        lines += [f"| {k} | {r['seconds']} | {r['images_per_s']} | {r['achieved_tflops']} | {pct(r['mfu'])} | "
                  f"{pct(r['mfu_spec'])} | {plain / r['seconds']:.2f} |" for k, r in s["runs"].items()]
        lines.append(f"\nforward, {fp['images']} images, {fp['device']} bf16 autocast vs cpu fp32: min cosine "
                     f"{fp['min_cosine']} ({'ok' if fp['ok'] else 'FAILED'}, need >= {FORWARD_MIN_COSINE})")
        lines.append(f"sigmoid loss device vs cpu: {lp['device']:.7g} vs {lp['cpu']:.7g}, relative difference "
                     f"{lp['relative_difference']:.2e} ({'ok' if lp['ok'] else 'FAILED'}, rtol {LOSS_RTOL})")
    if result.get("memory"):
        lines.append("\npeak memory: " + "; ".join(
            f"{name} " + ", ".join(f"{k.removesuffix('_gib').removesuffix('_mib')} {v}"
                                   f"{' GiB' if k.endswith('_gib') else ' MiB'}" for k, v in mem.items())
            for name, mem in result["memory"].items()))
    if result.get("targets"):
        lines.append("targets: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in result["targets"].items()))
    lines.append("checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in result.get("checks", {}).items()))
    return "\n".join(lines)


def resolve_device(requested: str | None, tiny: bool) -> torch.device:
    """The run's device: ``requested``, else the CPU with ``tiny``, else CUDA.

    Raises:
        SystemExit(2): with a one-line message on stderr when CUDA is wanted (explicitly, or by a full-size run
            without ``--device``) but not available: the full shapes on a CPU would spend hours.
    """
    if requested is None and tiny:
        return torch.device("cpu")
    device = torch.device(requested or "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        why = ("--device cuda, but" if requested else "the full-size run needs a GPU and") + " torch sees no CUDA device"
        print(f"gpu_check: {why} (torch {torch.__version__}); use --tiny alone for the CPU smoke test, or --device cpu "
              "to force the full shapes on the CPU", file=sys.stderr)
        raise SystemExit(2)
    return device


def _tflops(flops_per_s: float) -> float:
    """FLOP/s as TFLOP/s with 4 significant figures (a fixed 3 decimals rounds an emulated-bf16 CPU peak,
    ~0.01 TFLOP/s or less under load, to 0)."""
    return float(f"{flops_per_s / 1e12:.4g}")


def finish(result: dict, peak_end: float) -> None:
    """Recompute every MFU against the better of the two measured peaks, then fill ``targets`` and ``checks``."""
    best = max(result["matmul_peak_tflops"], _tflops(peak_end))
    spec = result["machine"]["spec_peak_tflops"]
    result.update(matmul_peak_end_tflops=_tflops(peak_end), mfu_peak_tflops=best)
    runs = [*result.get("stage1", {}).get("runs", []), *result.get("stage2", {}).get("runs", {}).values()]
    for run in runs:
        run.update(mfu=mfu(run["achieved_tflops"], best), mfu_spec=mfu(run["achieved_tflops"], spec))
    targets, checks = {}, {"stage-1 parity": result["stage1_parity"]["ok"]}
    if "stage1" in result:
        s1 = result["stage1"]
        checks["SDPA fused kernel with the facet mask"] = bool(s1["sdpa_kernel"].get("ok"))
        checks["stage-1 SDPA vs eager cosine"] = s1["min_cosine_sdpa_vs_eager"] >= FULL_SHAPE_MIN_COSINE
        if not result["tiny"]:  # the targets are for the full shapes; --tiny numbers say nothing about them
            key = "mfu_spec" if spec else "mfu"
            targets[f"stage-1 MFU >= 50 % of the {'datasheet' if spec else 'measured'} peak"] = max(
                r[key] for r in s1["runs"]) >= 0.5
    if "stage2" in result:
        s2 = result["stage2"]
        checks["stage-2 forward, device vs cpu fp32"] = s2["forward_parity"]["ok"]
        checks["stage-2 loss, device vs cpu"] = s2["loss_parity"]["ok"]
        if result["machine"]["device"].startswith("cuda"):
            checks["stage-2 batch pinned"] = s2["pinned_host_batch"]
        if not result["tiny"]:
            targets["stage-2 ours >= 0.6 x plain timm"] = s2["ours_vs_plain"] >= 0.6
    result.update(targets=targets, checks=checks, ok=all(checks.values()))


def main(argv: list[str] | None = None) -> dict:
    """Run the sections (module docstring), write ``--json`` after each, print the summary; returns the result.

    Raises:
        SystemExit(2): no CUDA device for a run that needs one (:func:`resolve_device`).
        SystemExit(3): after everything is written and printed, when one of ``checks`` failed (:data:`CHECK_FAILED`).
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes, a few samples/steps (seconds; CPU unless --device)")
    p.add_argument("--device", default=None,
                   help="cpu or cuda[:N] (default: cpu with --tiny, else cuda; without CUDA a full run stops at once)")
    p.add_argument("--json", required=True, help="write the results here (rewritten after every section)")
    p.add_argument("--skip", nargs="*", default=[], choices=("stage1", "stage2"), help="sections to leave out")
    args = p.parse_args(argv)
    device = resolve_device(args.device, args.tiny)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t_start = time.perf_counter()
    sizes = TINY if args.tiny else FULL
    out_path = Path(args.json)
    result: dict = {"tiny": args.tiny, "machine": machine_info(device), "sizes": dataclasses.asdict(sizes),
                    "memory": {}}
    spec = result["machine"]["spec_peak_tflops"]

    def save(section: str) -> None:
        result["memory"][section] = memory_peak(device)
        result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        result.setdefault("section_s", {})[section] = result["elapsed_s"]
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2))
        reset_memory_peak(device)

    log.info("%s", result["machine"])
    reset_memory_peak(device)
    peak, warm = matmul_peak(device, torch.bfloat16, sizes.peak_size, sizes.peak_inner, sizes.peak_warmup_s)
    result.update(peak_size=sizes.peak_size, matmul_peak_tflops=_tflops(peak), peak_warmup_products=warm)
    save("matmul_peak")
    result["stage1_parity"] = stage1_parity(device)
    save("stage1_parity")
    if "stage1" not in args.skip:
        result["stage1"] = stage1_throughput(sizes, device, peak, spec)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save("stage1")
    if "stage2" not in args.skip:
        result["stage2"] = stage2(sizes, device, peak, spec, sizes.decoder["hidden_size"])
        save("stage2")
    peak_end, _ = matmul_peak(device, torch.bfloat16, sizes.peak_size, sizes.peak_inner, sizes.peak_warmup_s)
    finish(result, peak_end)
    save("done")
    print(markdown(result))
    if not result["ok"]:
        raise SystemExit(CHECK_FAILED)
    return result


if __name__ == "__main__":
    main()
