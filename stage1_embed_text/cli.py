"""`flame embed` (and ``python -m stage1_embed_text``): stage 1, captions -> cache (SPEC §2.6, §8).

Runs one process by default; under ``accelerate launch --multi_gpu --num_processes N -m stage1_embed_text ...``
(or ``torchrun``) each process takes every N-th cache shard. Prints the job summary (rank 0) as the last lines.
"""

from __future__ import annotations

import argparse
import json
import logging

from pipeline.errors import run_command

DEFAULTS = {"llm": "gemma3-270m", "max_tokens": 1024, "context_tokens": 512, "shard_rows": 4096, "chunk_rows": 64}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `flame embed` (shared by ``python -m stage1_embed_text``)."""
    p.add_argument("--manifest", required=True, help="manifest directory (flame manifest ...)")
    p.add_argument("--out", required=True, help="cache directory to create, or to resume with the same arguments")
    p.add_argument("--llm", default=DEFAULTS["llm"],
                   help="embedded name (gemma3-270m, smollm2-135m), model folder, .gguf file or hub id")
    p.add_argument("--layer", type=int, default=None,
                   help="hidden_states index to read (0 = embeddings); default: penultimate block")
    p.add_argument("--readout", choices=("pre_norm", "post_norm"), default=None,
                   help="hidden state before or after the final norm (default: the LLM's measured choice, "
                   "post_norm for gemma3-270m; pre_norm otherwise, as in the FLAME recipe)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--batch-size", type=int, default=None, metavar="N",
                      help="at most N sequences per forward batch (the token budget still applies)")
    size.add_argument("--max-tokens", type=int, default=DEFAULTS["max_tokens"], metavar="N",
                      help="padded tokens per forward batch (default %(default)s)")
    p.add_argument("--context-tokens", type=int, default=DEFAULTS["context_tokens"], metavar="N",
                   help="longest packed sequence; longer captions are cut (default %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="only the first N manifest rows (after --split)")
    p.add_argument("--split", default=None, help="only rows of this split")
    p.add_argument("--position-mode", choices=("restart", "continuous"), default="restart")
    p.add_argument("--shard-rows", type=int, default=DEFAULTS["shard_rows"], help="cache rows per shard")
    p.add_argument("--chunk-rows", type=int, default=DEFAULTS["chunk_rows"], help="rows per Zarr chunk")
    p.add_argument("--plan-only", action="store_true",
                   help="only plan the job (dedupe, rows, owners) into OUT/plan and exit; no LLM is loaded. "
                   "A later `flame embed` with the same arguments reuses that plan (e.g. plan once on a CPU "
                   "node, then embed on many GPU nodes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `flame embed`."""
    p = sub.add_parser("embed", help="Stage 1: embed captions with a frozen LLM into a cache (SPEC §2)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace):
    """The :class:`~stage1_embed_text.job.EmbedConfig` of parsed arguments."""
    from stage1_embed_text.job import EmbedConfig

    return EmbedConfig(
        manifest=args.manifest, out=args.out, llm=args.llm, layer=args.layer, readout=args.readout,
        dtype=args.dtype, backend=args.backend, context_tokens=args.context_tokens,
        max_batch_tokens=args.max_tokens, batch_size=args.batch_size, limit=args.limit, split=args.split,
        shard_rows=args.shard_rows, chunk_rows=args.chunk_rows, position_mode=args.position_mode,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    """Run the job; print its summary on rank 0. Returns 0, or 2 when ``--backend vllm`` cannot run here."""
    from stage1_embed_text.job import plan_job, run_embed

    if args.plan_only:
        info = plan_job(config_from_args(args))
        print(
            f"flame embed --plan-only: {info.n_samples} samples -> {info.n_keys} keys -> {info.n_rows} rows "
            f"({info.layout.n_shards} shards), {info.n_unique_texts} unique texts to embed; "
            f"{info.n_empty} samples without captions -> {args.out}/plan"
        )
        return 0
    summary = run_embed(config_from_args(args))
    from accelerate import PartialState

    if PartialState().is_main_process:
        s = summary
        print(
            f"flame embed: {s.samples} samples -> {s.keys} keys -> {s.rows} rows (dedup {s.dedup_ratio}x, "
            f"{s.unique_texts} unique texts); {s.empty_samples} samples without captions; "
            f"{s.absent_facets} absent facets {s.absent_texts}; {s.truncated_rows} rows truncated"
        )
        print(
            f"flame embed: shards {s.shards_written} written, {s.shards_skipped} already done, of {s.shards}; "
            f"{s.sequences} sequences, {s.tokens} tokens, {s.tokens_per_s} tokens/s; {s.wall_s} s in all, "
            f"{s.world_size} process(es) -> {s.cache}"
        )
        print(json.dumps(s.to_dict()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m stage1_embed_text``: the same options as `flame embed`, plus ``-v``."""
    p = argparse.ArgumentParser(prog="python -m stage1_embed_text", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return run_command("python -m stage1_embed_text", lambda: run(args), verbose=args.verbose)
