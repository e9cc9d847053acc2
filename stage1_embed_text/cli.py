"""`flame embed` (and ``python -m stage1_embed_text``): stage 1, captions -> cache (SPEC §2.6, §8).

Runs one process by default; under ``accelerate launch --multi_gpu --num_processes N -m stage1_embed_text ...``
(or ``torchrun``) each process takes every N-th cache shard. Prints the job summary (rank 0) as the last lines.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from pipeline.assets import EMBEDDED_LLMS
from pipeline.errors import run_command
from stage1_embed_text.config import BACKENDS, DTYPE_CHOICES, POSITION_MODES, READOUTS, EmbedConfig, default
from stage1_embed_text.job import run_embed
from stage1_embed_text.plan import plan_job


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `flame embed` (shared by ``python -m stage1_embed_text``); defaults from
    :class:`~stage1_embed_text.config.EmbedConfig`."""
    p.add_argument("--manifest", required=True, help="manifest directory (flame manifest ...)")
    p.add_argument("--out", required=True, help="cache directory to create, or to resume with the same arguments")
    p.add_argument("--llm", default=default("llm"),
                   help=f"embedded name ({', '.join(EMBEDDED_LLMS)}), model folder, .gguf file or hub id")
    p.add_argument("--layer", type=int, default=default("layer"),
                   help="hidden_states index to read (0 = embeddings); default: penultimate block")
    p.add_argument("--readout", choices=READOUTS, default=default("readout"),
                   help="hidden state before or after the final norm (default: the LLM's measured choice, "
                   "post_norm for gemma3-270m; pre_norm otherwise, as in the FLAME recipe)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=default("dtype"))
    p.add_argument("--backend", choices=BACKENDS, default=default("backend"))
    size = p.add_mutually_exclusive_group()
    size.add_argument("--batch-size", type=int, default=default("batch_size"), metavar="N",
                      help="at most N sequences per forward batch (the token budget still applies)")
    size.add_argument("--max-batch-tokens", "--max-tokens", dest="max_batch_tokens", type=int,
                      default=default("max_batch_tokens"), metavar="N",
                      help="padded tokens per forward batch (default %(default)s)")
    p.add_argument("--context-tokens", type=int, default=default("context_tokens"), metavar="N",
                   help="longest packed sequence; longer captions are cut (default %(default)s)")
    p.add_argument("--limit", type=int, default=default("limit"), help="only the first N manifest rows (after --split)")
    p.add_argument("--split", default=default("split"), help="only rows of this split")
    p.add_argument("--position-mode", choices=POSITION_MODES, default=default("position_mode"))
    p.add_argument("--shard-rows", type=int, default=default("shard_rows"), help="cache rows per shard")
    p.add_argument("--chunk-rows", type=int, default=default("chunk_rows"), help="rows per Zarr chunk")
    p.add_argument("--vllm-setting", action="append", default=[], metavar="KEY=VALUE", type=vllm_setting,
                   help="a vLLM engine setting for --backend vllm (repeatable), e.g. gpu_memory_utilization=0.9, "
                   "max_num_seqs=512, tensor_parallel_size=2; VALUE is read as JSON if it parses, else as text")
    p.add_argument("--plan-only", action="store_true",
                   help="only plan the job (dedupe, rows, owners) into OUT/plan and exit; no LLM is loaded. "
                   "A later `flame embed` with the same arguments reuses that plan (e.g. plan once on a CPU "
                   "node, then embed on many GPU nodes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def vllm_setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> ``(key, value)``, the value read as JSON (``0.9``, ``2``, ``true``) or kept as text.

    Raises:
        argparse.ArgumentTypeError: no ``=`` or an empty key.
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `flame embed`."""
    p = sub.add_parser("embed", help="Stage 1: embed captions with a frozen LLM into a cache (SPEC §2)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> EmbedConfig:
    """The :class:`~stage1_embed_text.config.EmbedConfig` of parsed arguments."""
    return EmbedConfig(
        manifest=args.manifest, out=args.out, llm=args.llm, layer=args.layer, readout=args.readout,
        dtype=args.dtype, backend=args.backend, context_tokens=args.context_tokens,
        max_batch_tokens=args.max_batch_tokens, batch_size=args.batch_size, limit=args.limit, split=args.split,
        shard_rows=args.shard_rows, chunk_rows=args.chunk_rows, position_mode=args.position_mode,
        progress=not args.no_progress, vllm_settings=dict(args.vllm_setting),
    )


def run(args: argparse.Namespace) -> int:
    """Run the job; print its summary on rank 0. Returns 0 (errors are raised, see :func:`run_embed`)."""
    if args.plan_only:
        info = plan_job(config_from_args(args))
        print(
            f"flame embed --plan-only: {info.n_samples} samples -> {info.n_keys} keys -> {info.n_rows} rows "
            f"({info.layout.n_shards} shards), {info.n_unique_texts} unique texts to embed; "
            f"{info.n_empty} samples without captions -> {args.out}/plan"
        )
        return 0
    summary = run_embed(config_from_args(args))
    from accelerate import PartialState  # third-party, imports torch: loaded by run_embed already

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
