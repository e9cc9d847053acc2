"""Stage-1 throughput of the ``vllm`` backend vs the ``hf`` backend, same model, same samples, one run (issue 7).

Run it in the vLLM environment (``make setup-vllm``)::

    .venv-vllm/bin/python bench/stage1_vllm.py [MANIFEST] [--llm smollm2-135m] [--n 64] [--rounds 2]

Methods, each on the same samples (synthetic emoji-shaped captions, or the first ``--n`` rows of a manifest):

(a) **hf**: :class:`~stage1_embed_text.encode.encoder.FacetEncoder` (one packed pass per text, facet-decoupled mask,
    length-bucketed batches), the reference backend, in ``--dtype``;
(b) **vllm**: :class:`~stage1_embed_text.backends.vllm_backend.VllmFacetEncoder`: one request per facet, automatic
    prefix caching on (the prefix is computed once per text and its KV blocks reused by the other facets);
(c) **vllm, no prefix cache** (``--no-cache-run``): the same requests with caching off, every facet recomputing
    its prefix (shows what the cache buys).

Rounds alternate the methods (a, b, c, a, b, c, ...) so that load from other processes hits them alike; the
prefix cache is reset before each vLLM round, so no round profits from texts embedded in an earlier one. The
best round of each method is reported: captions/s (texts: a sample's raw, short and long captions are 3),
samples/s, tokens/s (tokens of the packed sequences, the same count for every method), the ratio to ``hf``,
and the engine start-up time (not part of the throughput). Vectors of (b) are compared with (a) (cosine).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline.machine import cpu_summary  # noqa: E402
from stage1_embed_text.config import DEFAULT_CONTEXT_TOKENS  # noqa: E402

log = logging.getLogger("bench.stage1_vllm")


def _samples(manifest: str | None, n: int) -> list[dict]:
    from stage1_throughput import manifest_samples, synthetic_samples

    return manifest_samples(manifest, n) if manifest else synthetic_samples(n)


def _timed(encode, samples) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = encode(samples)
    return time.perf_counter() - t0, out


def _separate_tokens(hf, samples) -> int:
    """Tokens of all ``prefix + facet_i`` requests (prefix counted once per facet) for ``samples``."""
    from stage1_embed_text.encode.packing import pack_samples

    items = pack_samples(hf.llm.tokenizer, hf.templates, hf.prompt_set, samples, hf.context_tokens)
    return sum(len(it.seq.seg_lens) * it.seq.n_prefix + sum(it.seq.seg_lens) for it in items)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("manifest", nargs="?", help="manifest directory (default: synthetic emoji-shaped captions)")
    p.add_argument("--llm", default="smollm2-135m", help="embedded name, folder or hub id (default smollm2-135m)")
    p.add_argument("--layer", type=int, default=None, help="hidden_states index (default: penultimate)")
    p.add_argument("--n", type=int, default=64, help="samples (default 64)")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds per method (default 2)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--context-tokens", type=int, default=DEFAULT_CONTEXT_TOKENS, help="longest packed text")
    p.add_argument("--block-size", type=int, default=None, help="vLLM KV block size (default 32 on CPU)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--kv-cache-gib", type=float, default=None)
    p.add_argument("--eager", action="store_true", help="no torch.compile in vLLM (starts in seconds, runs ~2x slower)")
    p.add_argument("--no-cache-run", action="store_true", help="also time vLLM with prefix caching off")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("vllm", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from stage1_embed_text.backends.llm import load_llm
    from stage1_embed_text.backends.vllm_backend import EngineSettings, VllmFacetEncoder
    from stage1_embed_text.encode.encoder import FacetEncoder

    samples = _samples(args.manifest, args.n)
    warm = _samples(None, 4) if args.manifest else _samples(None, args.n + 4)[args.n :]

    t0 = time.perf_counter()
    hf = FacetEncoder(load_llm(args.llm, dtype=args.dtype, layer=args.layer), context_tokens=args.context_tokens)
    startup = {"hf": time.perf_counter() - t0}

    def vllm_encoder(cache: bool) -> VllmFacetEncoder:
        settings = EngineSettings(
            dtype=args.dtype, enable_prefix_caching=cache, block_size=args.block_size,
            max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_gib=args.kv_cache_gib,
            enforce_eager=args.eager,
        )
        return VllmFacetEncoder(args.llm, layer=args.layer, context_tokens=args.context_tokens, settings=settings)

    t0 = time.perf_counter()
    engines = {"vllm": vllm_encoder(True)}
    startup["vllm"] = time.perf_counter() - t0
    if args.no_cache_run:
        t0 = time.perf_counter()
        engines["vllm_no_cache"] = vllm_encoder(False)
        startup["vllm_no_cache"] = time.perf_counter() - t0

    for enc in [hf, *engines.values()]:  # warm-up on other texts
        enc.encode(warm)
    times: dict[str, list[float]] = {m: [] for m in ["hf", *engines]}
    outs: dict[str, object] = {}
    for r in range(args.rounds):
        dt, outs["hf"] = _timed(hf.encode, samples)
        times["hf"].append(dt)
        for name, enc in engines.items():
            enc.reset_prefix_cache()
            dt, outs[name] = _timed(enc.encode, samples)
            times[name].append(dt)
        log.info("round %d: %s", r + 1, {k: round(v[-1], 2) for k, v in times.items()})

    ref = outs["hf"]
    n_texts = int((ref.tokens > 0).sum())
    n_tokens = int(ref.tokens.sum())
    # tokens that separate passes `prefix + facet_i` process without any sharing (what "effective" counts)
    n_separate = _separate_tokens(hf, samples)
    results = {}
    for name, ts in times.items():
        best = min(ts)
        res = {
            "seconds": best,
            "captions_per_s": n_texts / best,
            "samples_per_s": len(samples) / best,
            "tokens_per_s": n_tokens / best,
            "effective_tokens_per_s": n_separate / best,
            "startup_s": startup.get(name, 0.0),
            "all_rounds_s": ts,
        }
        if name != "hf":
            cos = (outs[name].vectors * ref.vectors).sum(-1)[ref.mask]
            res["min_cosine_vs_hf"] = float(cos.min())
        results[name] = res
    for res in results.values():
        res["speedup_vs_hf"] = results["hf"]["seconds"] / res["seconds"]

    print(f"\nCPU {cpu_summary()}")
    print(f"stage 1, {args.llm}, {args.dtype}, {len(samples)} samples = {n_texts} captions, {n_tokens} packed tokens"
          f" ({'manifest ' + args.manifest if args.manifest else 'synthetic captions'}), best of {args.rounds}")
    print(f"(tokens/s counts packed tokens; effective tok/s counts the {n_separate} tokens of separate "
          f"prefix+facet passes)")
    print(f"{'method':<16}{'captions/s':>12}{'samples/s':>11}{'tokens/s':>10}{'eff. tok/s':>11}{'vs hf':>8}"
          f"{'start s':>9}{'min cos':>10}")
    for name, r in results.items():
        cos = f"{r['min_cosine_vs_hf']:.5f}" if "min_cosine_vs_hf" in r else "-"
        print(f"{name:<16}{r['captions_per_s']:>12.1f}{r['samples_per_s']:>11.2f}{r['tokens_per_s']:>10.0f}"
              f"{r['effective_tokens_per_s']:>11.0f}{r['speedup_vs_hf']:>7.2f}x{r['startup_s']:>9.1f}{cos:>10}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cpu": cpu_summary(), "results": results}, indent=2))
    for enc in engines.values():
        enc.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
