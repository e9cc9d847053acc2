"""`flame index` and `flame search`: text-to-image search over your own images with a trained model.

Examples::

    flame index photos/ --model runs/demo-artifacts/train-XXXX/model --out photos.index
    flame index data/emoji --split test --model user/flame-vitb16 --out emoji-test.index
    flame search photos.index "a red bicycle" --k 5
    flame search photos.index "a red bicycle" "two dogs" --json

IMAGES is a folder (searched recursively), a manifest folder, or WebDataset tar shards (``shards/*.tar``). See
:mod:`flame_pipeline.search` for the index layout.
"""

from __future__ import annotations

import argparse
import json

from flame_pipeline import load


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `flame index` and `flame search`."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("index", help="Embed a folder, manifest or tar shards of images into a search index",
                       description=__doc__, formatter_class=fmt)
    p.add_argument("images", help="a folder of images, a manifest folder, or .tar shards (a glob)")
    p.add_argument("--model", required=True, help="model folder, hub id (user/repo[@rev]) or FLAME checkpoint file")
    p.add_argument("--out", required=True, help="index folder to write (replaced atomically)")
    p.add_argument("--split", default=None, help="with a manifest: only this split")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=int, default=0, help="image-decoding worker processes")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.set_defaults(func=run_index)

    s = sub.add_parser("search", help="Find the images of an index closest to a text", description=__doc__,
                       formatter_class=fmt)
    s.add_argument("index", help="index folder written by flame index")
    s.add_argument("query", nargs="+", help="one or more texts")
    s.add_argument("--k", type=int, default=10, help="results per query")
    s.add_argument("--mode", choices=("single", "multi"), default="single",
                   help="text mode: single (raw prompt) or multi (mean of the 7 long-caption facets)")
    s.add_argument("--model", default=None, help="model to embed the query with (default: the index's model)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--device", default=None)
    s.set_defaults(func=run_search)


def run_index(args: argparse.Namespace) -> int:
    from flame_pipeline.search import build_index

    if args.batch_size < 1:
        raise SystemExit("flame index: --batch-size must be >= 1")
    model = load(args.model, device=args.device)
    doc = build_index(model, args.model, args.images, args.out, args.split, args.batch_size, args.workers)
    skipped = ", ".join(f"{k} {v}" for k, v in doc["skipped"].items()) or "none"
    print(f"indexed {doc['count']} images (D={doc['dim']}) into {args.out}; skipped: {skipped}")
    return 0


def run_search(args: argparse.Namespace) -> int:
    from flame_pipeline.search import read_index, search

    loaded = read_index(args.index)
    model = load(args.model or loaded[0]["model"], device=args.device)
    hits = search(model, args.index, args.query, args.k, args.mode, loaded=loaded)
    if args.json:
        print(json.dumps([{"query": q, "results": h} for q, h in zip(args.query, hits, strict=True)],
                         ensure_ascii=False, indent=2))
        return 0
    for q, rows in zip(args.query, hits, strict=True):
        print(f"{q!r}")
        for r in rows:
            print(f"  {r['rank']:>3}  {r['score']:.4f}  {r['name']}")
    return 0
