"""`flame eval`: zero-shot evaluation of an exported model.

Example (an emoji manifest, then a model that ``flame train`` exported into ``TRAIN.OUTPUT_DIR/model``)::

    flame manifest emoji --out runs/emoji-manifest
    flame eval --model runs/my/train/model --benchmark emoji --data runs/emoji-manifest --out runs/my/eval-emoji

The text side is the stage-1 embedder named by the model's ``config.json`` cache identity (a different
identity is refused). Text vectors are cached under ``--text-cache`` (default
``$FLAME_HOME/eval-text-cache``) by identity, text mode and text, and reused by later runs.
"""

# This module only registers the subcommand (``flame --help`` imports it): it imports light modules only; the
# command itself is :func:`eval.run.main`.

from __future__ import annotations

import argparse
import logging

from eval.benchmarks import BENCHMARKS
from stage1_embed_text.config import TEXT_MODES

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `flame eval`."""
    p = sub.add_parser("eval", help="Zero-shot evaluation of an exported model", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported model directory (model.safetensors + config.json)")
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS, help="benchmark name")
    p.add_argument("--data", required=True,
                   help="benchmark files (for emoji: a manifest directory from `flame manifest emoji`)")
    p.add_argument("--out", required=True, help="output directory for results.json, results.md and PNGs")
    p.add_argument("--text-mode", choices=TEXT_MODES, default=None,
                   help="text mode for every task (default: multi for English/long-caption retrieval and "
                        "compositionality, single for classification and multilingual)")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--text-batch-size", type=int, default=32, help="texts per text-embedder call")
    p.add_argument("--text-cache", default=None, help="eval text-vector cache (default $FLAME_HOME/eval-text-cache)")
    p.add_argument("--device", default=None, help="image encoder device (default cuda when available)")
    p.add_argument("--image-root", default=None, help="images folder for COCO/Flickr JSON, ShareGPT4V, SugarCrepe")
    p.add_argument("--languages", default=None,
                   help="comma-separated languages for multilingual retrieval; 'all' = every language present "
                        "(default: all for XM3600; de,fr,es,ja,zh,ar,hi for emoji)")
    p.add_argument("--no-linear-probe", action="store_true", help="skip the linear probe")
    p.add_argument("--ranking", choices=("auto", "torch", "faiss"), default="auto",
                   help="retrieval ranking backend (auto: exact torch matmul for small sets, faiss for large)")
    p.add_argument("--workers", type=int, default=0, help="image-decoding worker processes")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--strict", action="store_true", help="fail when a benchmark's size differs from the published one")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """`flame eval`: :func:`eval.run.main`; exit code 0 on success (the ``flame`` entry point answers refused
    input with exit code 2)."""
    # the one deferred import: eval.run pulls in torch, transformers and the stage-1/2 code (seconds), which
    # `flame --help` and every other subcommand never need
    from eval.run import main

    return main(args)
