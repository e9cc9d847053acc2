"""`flame import`: bring what FLAME's authors released into this pipeline.

Examples::

    flame import checkpoint caj/FLAME-Mistral-Nemo-ViT-B-16 --out models/flame-official
    flame import checkpoint epoch_32.pt --out models/flame-cc3m
    flame import cache /data/cc3m_nemo_pth --manifest data/cc3m --out caches/cc3m-official

``checkpoint`` writes an exported model directory (``flame eval --model DIR``, ``flame train ...
model.init_from=DIR``); ``cache`` writes a cache (SPEC §3) from the official one-``.pth``-per-sample tree.
Heavy imports happen only when a subcommand runs.
"""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `flame import checkpoint|cache`."""
    p = sub.add_parser("import", help="Import FLAME's released checkpoints and .pth caches", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_subparsers(dest="what", required=True, metavar="WHAT")

    ck = what.add_parser("checkpoint", help="an official checkpoint -> an exported model directory")
    ck.add_argument("src", help="a .pt/.pth/.bin/.safetensors file, a folder holding one, or a hub model id")
    ck.add_argument("--out", required=True, help="exported model directory to write")
    ck.add_argument("--file", default=None, help="which file of a folder or hub repository (when there are several)")
    ck.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    ck.add_argument("--quick-gelu", action="store_true",
                    help="the ViT uses open_clip's QuickGELU (a *-quickgelu model config); default GELU")
    _identity_args(ck)
    ck.set_defaults(func=run_checkpoint)

    ca = what.add_parser("cache", help="an official per-sample .pth tree -> a cache")
    ca.add_argument("src", help="root of the .pth tree (<root>/<key[:5]>/<key>.pth or <root>/<key-prefix>/<key>.pth)")
    ca.add_argument("--manifest", required=True, help="manifest whose keys to import (its order gives the rows)")
    ca.add_argument("--out", required=True, help="cache directory to create (or finish, with the same arguments)")
    ca.add_argument("--layout", choices=("auto", "prefix5", "underscore"), default="auto",
                    help="prefix5: <key[:5]>/<key>.pth (CC3M); underscore: <key.split('_')[0]>/<key>.pth (YFCC15M)")
    ca.add_argument("--split", default=None, help="only the manifest rows of this split")
    ca.add_argument("--shard-rows", type=int, default=1024, help="cache rows per shard (one shard is held in memory)")
    ca.add_argument("--chunk-rows", type=int, default=8, help="rows per Zarr chunk")
    ca.add_argument("--threads", type=int, default=8, help="files read at once")
    _identity_args(ca)
    ca.set_defaults(func=run_cache)
    return p


def _identity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--identity", default="official-nemo",
                   help="text side of the weights/vectors: official-nemo (Mistral-Nemo-Instruct-2407, layer 39, "
                        "pre-norm, continuous positions), or a JSON file / cache / exported model holding one")
    p.add_argument("--llm-fingerprint", default=None,
                   help="sha256 digest of the LLM weights to record ('auto': hash the local copy); by default "
                        "recorded as unknown, and flame eval then names the digest it finds")


def run_checkpoint(args: argparse.Namespace) -> int:
    """Run `flame import checkpoint`; prints the imported architecture."""
    # torch and open_clip load only when an import runs, not for `flame --help`
    from flame_pipeline.imports.cache import resolve_identity
    from flame_pipeline.imports.checkpoint import import_checkpoint

    identity = resolve_identity(args.identity, args.llm_fingerprint)
    config = import_checkpoint(args.src, args.out, identity, file=args.file, revision=args.revision,
                               quick_gelu=args.quick_gelu)
    print(json.dumps({"out": args.out, "model": config["model"], "imported": config["train"]["imported"]},
                     indent=2, default=str))
    return 0


def run_cache(args: argparse.Namespace) -> int:
    """Run `flame import cache`; prints the counts (keys, found, missing, imported, bad files by reason)."""
    from flame_pipeline.imports.cache import import_cache, resolve_identity

    identity = resolve_identity(args.identity, args.llm_fingerprint)
    summary = import_cache(args.src, args.manifest, args.out, identity, layout=args.layout, split=args.split,
                           shard_rows=args.shard_rows, chunk_rows=args.chunk_rows, threads=args.threads)
    print(json.dumps(summary.to_dict(), indent=2))
    return 0
