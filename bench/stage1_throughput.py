"""Stage-1 throughput: ours vs the official FLAME approach re-created vs naive separate passes (SPEC §10).

Same model, same samples, one process, one run::

    python bench/stage1_throughput.py [MANIFEST] [--llm gemma3-270m] [--n 500] [--dtype bfloat16]

(a) **ours**: :class:`~stage1_embed_text.encode.encoder.FacetEncoder`: one packed pass per text with facet-decoupled
    attention, length-bucketed token-budget batches, ``restart`` positions, only the blocks up to the readout
    layer, no vocabulary logits.
(b) **official, re-created**: the same packed sequences, but ``--batch-size`` texts per batch in input order (no
    length bucketing), LEFT padding to the batch maximum, ``continuous`` positions, a per-head 4-D mask
    ``[B, heads, T, T]``, the full ``*ForCausalLM`` run to its last layer with the LM head logits
    (``output_hidden_states=True``, the readout layer taken from ``hidden_states``; ``use_cache=False``).
(c) **naive separate passes**: one sequence ``prefix + facet_i`` per facet (the prefix recomputed for every
    facet), ``--batch-size`` sequences per batch in input order, right padding with a plain 2-D padding mask,
    the same truncated model as (a).

Reported per method: captions/s (texts: a sample's raw, short and long caption are 3), useful tokens/s (tokens of
the packed sequences, the same count for every method), the speed-up of ours over it, and MFU.

MFU = useful model FLOPs / time / peak, with useful FLOPs of one packed text of ``n`` tokens::

    2 * P_blocks * n  +  layers * 4 * heads * head_dim * pairs

``P_blocks`` = parameters of the decoder blocks that run (embedding lookup and logits excluded), ``pairs`` =
(query, key) pairs the facet mask allows (prefix causal + each facet over prefix and itself; the QK^T and AV
products are 2 FLOPs per multiply-add each). Every method is charged the same useful FLOPs, so its padding,
recomputed prefixes and logits only show up as lower MFU. Peak = best of ``torch.matmul`` of two
``--peak-size``-square matrices in the model dtype (also printed for fp32), measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from pipeline.assets import EMBEDDED_LLMS
from pipeline.machine import cpu_summary
from stage1_embed_text.backends.llm import DTYPES, LoadedLLM, load_llm
from stage1_embed_text.backends.model_source import embedded_folder
from stage1_embed_text.config import DEFAULT_CONTEXT_TOKENS
from stage1_embed_text.encode.batching import collate, facet_mask
from stage1_embed_text.encode.encoder import FacetEncoder
from stage1_embed_text.encode.packing import PackedSequence, pack_samples
from stage1_embed_text.encode.prompts import FLAME, GROUPS
from stage1_embed_text.encode.tokenization import group_templates

log = logging.getLogger("bench.stage1_throughput")


def synthetic_samples(n: int) -> list[dict[str, str]]:
    """``n`` deterministic caption sets shaped like the emoji captions (raw ~4, short ~15, long ~90 words)."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    things = ["apple", "dog", "rocket", "flag", "smiling face", "hand", "tree", "car", "house", "fish", "star"]
    out = []
    for i in range(n):
        c, t = colours[i % len(colours)], things[(i // len(colours)) % len(things)]
        name = f"{c} {t} {i}"
        words = ", ".join(f"{w}{i % 7}" for w in ("bright", "shape", "object", "symbol", "nature", "travel"))
        out.append({
            "raw": name,
            "short": f"An emoji showing {name}, from the objects and symbols category.",
            "long": (f"An emoji from a vendor set showing {name}. It belongs to the objects category, in the "
                     f"{t} group. Related words: {words}. It is drawn with rounded shapes, bright colours and "
                     "subtle shading. The image is a small 64 by 64 pixel icon on a white background."),
        })
    return out


def manifest_samples(path: str, n: int) -> list[dict[str, str | None]]:
    """The first ``n`` manifest rows' captions as encoder samples."""
    from manifests.schema import read_manifest

    t = read_manifest(path, columns=["raw_caption", "short_caption", "long_caption"]).slice(0, n)
    cols = [t.column(f"{g}_caption").to_pylist() for g in GROUPS]
    return [dict(zip(GROUPS, row)) for row in zip(*cols)]


def packed_texts(llm: LoadedLLM, samples, context_tokens: int) -> list[PackedSequence]:
    """Every present text of ``samples`` packed exactly as stage 1 packs it (:func:`pack_samples`), in sample
    order, then raw/short/long: the sequences every method runs."""
    items = pack_samples(llm.tokenizer, group_templates(llm.tokenizer, FLAME), FLAME, samples, context_tokens)
    return [item.seq for item in sorted(items, key=lambda item: (item.row, item.group))]


def useful_flops(llm: LoadedLLM, seqs: list[PackedSequence]) -> float:
    """Model FLOPs the packed texts need (formula in the module docstring)."""
    cfg = llm.model.config
    p_blocks = sum(p.numel() for p in llm.model.layers.parameters())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    pairs = sum(s.n_prefix * (s.n_prefix + 1) / 2 + sum(k * s.n_prefix + k * (k + 1) / 2 for k in s.seg_lens)
                for s in seqs)
    tokens = sum(len(s) for s in seqs)
    return 2.0 * p_blocks * tokens + llm.layer * 4.0 * cfg.num_attention_heads * head_dim * pairs


def matmul_peak(dtype: torch.dtype, size: int, reps: int = 5) -> float:
    """Best FLOP/s of ``torch.matmul`` on two ``size x size`` matrices of ``dtype``."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best


def run_ours(llm: LoadedLLM, samples, context_tokens: int, max_batch_tokens: int) -> Callable[[], np.ndarray]:
    enc = FacetEncoder(llm, context_tokens=context_tokens, max_batch_tokens=max_batch_tokens)
    return lambda: enc.encode(samples).vectors


def run_official(full_model, llm: LoadedLLM, seqs: list[PackedSequence], batch_size: int) -> Callable[[], None]:
    """(b): fixed batches in input order, left padding, continuous positions, per-head mask, full model + logits."""
    heads = full_model.config.num_attention_heads
    dtype = next(full_model.parameters()).dtype
    pad = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else 0

    @torch.inference_mode()
    def go() -> None:
        for i in range(0, len(seqs), batch_size):
            b = collate(seqs[i : i + batch_size], pad, "continuous", padding_side="left")
            mask = facet_mask(b.segments, b.position_ids, dtype).expand(-1, heads, -1, -1).contiguous()
            out = full_model(input_ids=b.input_ids, position_ids=b.position_ids, attention_mask=mask,
                             output_hidden_states=True, use_cache=False)
            out.hidden_states[llm.layer][b.readout_rows, b.readout_cols].float()

    return go


def run_naive(llm: LoadedLLM, seqs: list[PackedSequence], batch_size: int) -> Callable[[], np.ndarray]:
    """(c): one ``prefix + facet_i`` sequence per facet, fixed batches in input order, right padding."""
    singles = []
    for s in seqs:
        start = s.n_prefix
        for k in s.seg_lens:
            singles.append(np.concatenate([s.ids[: s.n_prefix], s.ids[start : start + k]]))
            start += k
    pad = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else 0

    @torch.inference_mode()
    def go() -> np.ndarray:
        out = []
        for i in range(0, len(singles), batch_size):
            chunk = singles[i : i + batch_size]
            lens = torch.tensor([len(x) for x in chunk])
            ids = torch.full((len(chunk), int(lens.max())), pad, dtype=torch.int64)
            for r, x in enumerate(chunk):
                ids[r, : len(x)] = torch.from_numpy(x)
            attn = (torch.arange(ids.shape[1])[None] < lens[:, None]).long()
            h = llm.model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
            v = h[torch.arange(len(chunk)), lens - 1].float()
            out.append((v / v.norm(dim=-1, keepdim=True)).numpy())
        return np.concatenate(out)

    return go


def timed(fn: Callable, warmup: Callable | None = None) -> tuple[float, object]:
    if warmup is not None:
        warmup()
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("manifest", nargs="?", help="manifest directory (default: synthetic emoji-like captions)")
    p.add_argument("--llm", default="gemma3-270m")
    p.add_argument("--n", type=int, default=500, help="samples (each up to 3 texts)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--context-tokens", type=int, default=DEFAULT_CONTEXT_TOKENS, help="longest packed text")
    p.add_argument("--max-batch-tokens", type=int, default=1024, help="ours: padded tokens per batch")
    p.add_argument("--batch-size", type=int, default=32, help="(b) and (c): texts/sequences per batch")
    p.add_argument("--peak-size", type=int, default=2048)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    samples = manifest_samples(args.manifest, args.n) if args.manifest else synthetic_samples(args.n)
    llm = load_llm(args.llm, dtype=args.dtype, layer=args.layer)
    seqs = packed_texts(llm, samples, args.context_tokens)
    tokens = sum(len(s) for s in seqs)
    flops = useful_flops(llm, seqs)
    from transformers import AutoModelForCausalLM

    folder = str(embedded_folder(args.llm)) if args.llm in EMBEDDED_LLMS else args.llm
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[args.dtype]).eval()
    log.info("%d samples, %d texts, %d useful tokens, %.3g useful GFLOP; threads=%d",
             len(samples), len(seqs), tokens, flops / 1e9, torch.get_num_threads())

    peaks = {d: matmul_peak(DTYPES[d], args.peak_size) for d in ("bfloat16", "float32")}
    few = samples[:4]
    ours = run_ours(llm, samples, args.context_tokens, args.max_batch_tokens)
    official = run_official(full, llm, seqs, args.batch_size)
    naive = run_naive(llm, seqs, args.batch_size)
    t_a, vec_a = timed(ours, run_ours(llm, few, args.context_tokens, args.max_batch_tokens))
    log.info("ours: %.1f s", t_a)
    t_b, _ = timed(official, run_official(full, llm, seqs[:4], args.batch_size))
    log.info("official: %.1f s", t_b)
    t_c, vec_c = timed(naive, run_naive(llm, seqs[:4], args.batch_size))
    log.info("naive: %.1f s", t_c)

    present = vec_a.reshape(-1, vec_a.shape[-1])[np.linalg.norm(vec_a.reshape(-1, vec_a.shape[-1]), axis=-1) > 0]
    cos = float((present * vec_c).sum(-1).min())
    peak = peaks[args.dtype]
    rows = []
    for name, t in (("(a) ours", t_a), ("(b) official re-created", t_b), ("(c) naive separate passes", t_c)):
        rows.append({"method": name, "seconds": round(t, 2), "captions_per_s": round(len(seqs) / t, 2),
                     "tokens_per_s": round(tokens / t, 1), "ours_speedup": round(t / t_a, 2),
                     "mfu": round(flops / t / peak, 4)})
    result = {
        "llm": llm.name, "dtype": args.dtype, "layer": llm.layer, "samples": len(samples), "texts": len(seqs),
        "cpu": cpu_summary(), "useful_tokens": tokens, "useful_gflop": round(flops / 1e9, 2), "threads": torch.get_num_threads(),
        "matmul_peak_gflops": {d: round(v / 1e9, 1) for d, v in peaks.items()},
        "min_cosine_ours_vs_naive": round(cos, 5), "methods": rows,
    }
    print(f"\nstage-1 throughput: {llm.name} ({args.dtype}, layer {llm.layer}), {len(samples)} samples = "
          f"{len(seqs)} texts, {tokens} useful tokens, {torch.get_num_threads()} threads; CPU {cpu_summary()}")
    print(f"matmul peak: bf16 {result['matmul_peak_gflops']['bfloat16']} GFLOP/s, "
          f"fp32 {result['matmul_peak_gflops']['float32']} GFLOP/s; min cosine ours vs naive {cos:.5f}\n")
    print("| method | s | captions/s | tokens/s | ours is x faster | MFU |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['seconds']} | {r['captions_per_s']} | {r['tokens_per_s']} | "
              f"{r['ours_speedup']} | {100 * r['mfu']:.1f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
