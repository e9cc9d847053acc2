"""`flame inspect CACHE`: identity, counts, completeness, integrity, validity, facet statistics and neighbours.

Every run checks each finished shard's files cheaply (present, index part readable with the recorded key
count, sizes); ``--verify`` also recomputes the SHA-256 digests each shard recorded when it was written
(:mod:`pipeline.cache.verify`), which finds any changed vector (negated, NaN, a flipped bit), and prints for each
damaged shard the command that redoes only that shard. Exit status: 0 all fine, 1 something found, 2 error.
"""

from __future__ import annotations

import argparse
import json

from tqdm import tqdm

from flame_pipeline.inspect import inspect_cache, nearest_neighbours, plot_facet_cosine
from manifests.schema import iter_batches
from pipeline.cache.store import CacheError, CacheReader
from pipeline.cache.verify import VerifyReport, verify_cache


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `flame inspect`."""
    p = sub.add_parser("inspect", help="Inspect a stage-1 cache", description=__doc__)
    p.add_argument("cache", help="cache directory written by `flame embed`")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--manifest", help="report key coverage against this manifest")
    p.add_argument("--key", help="nearest neighbours of this stored sample key")
    p.add_argument("--query", help="nearest neighbours of this text, embedded with the cache's own identity")
    p.add_argument("--facet", default=None, help="facet used for neighbours (default: raw for --query/--key)")
    p.add_argument("-k", type=int, default=10, help="neighbours to show")
    p.add_argument("--plot", metavar="DIR", help="write facet_cosine.png (F x F heatmap) into DIR")
    p.add_argument("--verify", action="store_true",
                   help="recompute the checksums every shard and the key lookup recorded (reads the whole cache once); "
                        "names each damaged shard with the command that redoes it")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    integrity = verify_cache(args.cache, checksums=args.verify)
    if integrity.lookup:  # a damaged lookup: the reader cannot open; say so with the fix, as part of the report
        _print_integrity(integrity, args.json)
        return 1
    reader = CacheReader(args.cache, allow_incomplete=True)
    manifest_keys = None
    if args.manifest:
        manifest_keys = (batch.column(0) for _, batch in iter_batches(args.manifest, ["key"]))
    with tqdm(total=reader.meta.layout.n_rows, unit="row", desc="checking rows", disable=args.json) as bar:
        report = inspect_cache(reader, manifest_keys=manifest_keys, progress=bar.update)
    out = report.to_dict() | {"integrity": integrity.to_dict()}
    facet = args.facet or reader.facets[0]
    if args.key or args.query:
        if args.key:
            if args.key not in reader:
                unfinished = len(reader.missing_shards)
                raise CacheError(f"key {args.key!r} not in the cache" + (
                    f" (looked in the finished shards only: {unfinished} of {reader.meta.layout.n_shards} "
                    "are unfinished)" if unfinished else ""))
            vec, mask = reader.get([args.key])
            i = reader.facets.index(facet)
            if not mask[0, i]:
                raise CacheError(f"facet {facet!r} is absent for key {args.key!r}")
            query = vec[0, i].astype("float32")
        else:
            from stage1_embed_text.api import TextEmbedder  # torch: only for --query

            query = TextEmbedder.from_identity(reader.identity).embed([args.query], mode="single")[0]
        out["neighbours"] = [
            {"keys": keys, "cosine": round(score, 4)}
            for keys, score in nearest_neighbours(reader, query, facet=facet, k=args.k)
        ]
    if args.plot:
        out["plot"] = str(plot_facet_cosine(report, reader.facets, f"{args.plot}/facet_cosine.png"))
    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        _print_text(out, reader.facets)
    if not args.json:
        for line in integrity.lines():
            print(line)
    fine = not report.bad_rows and not report.unreadable_shards and integrity.ok
    return 0 if fine and report.shards_done == report.n_shards else 1


def _print_integrity(integrity: VerifyReport, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"integrity": integrity.to_dict()}, indent=2, ensure_ascii=False))
    else:
        print("\n".join(integrity.lines()))


def _print_text(out: dict, facets: tuple[str, ...]) -> None:
    ident = out["identity"]
    print(f"identity   : {ident['llm']} (layer {ident['layer']}, {ident['readout']}, D={ident['dim']}, "
          f"{ident['prompt_set']} {ident['prompt_set_hash'][:12]}, {ident['position_mode']}, {ident['backend']})")
    print(f"rows/keys  : {out['n_rows']} rows, {out['n_keys']} keys")
    print(f"shards     : {out['shards_done']}/{out['n_shards']} finished")
    print(f"validity   : {len(out['bad_rows'])} non-finite or non-unit vectors"
          + (f" (first {out['bad_rows'][:5]})" if out["bad_rows"] else ""))
    for shard, error in out["unreadable_shards"].items():
        print(f"unreadable : shard {shard}: {error}")
    if out["coverage"]:
        print("coverage   : " + ", ".join(f"{k} {v}" for k, v in out["coverage"].items()))
    print("facets     : present rows / anisotropy (mean cosine of random rows)")
    for name in facets:
        print(f"  {name:<22} {out['facet_presence'][name]:>8}   {out['anisotropy'].get(name, float('nan')):.3f}")
    if "neighbours" in out:
        print("neighbours :")
        for n in out["neighbours"]:
            print(f"  {n['cosine']:.4f}  {', '.join(n['keys'][:4])}")
    if "plot" in out:
        print(f"plot       : {out['plot']}")
