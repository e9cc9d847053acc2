"""`flame push MODEL_DIR REPO_ID`: publish an exported model folder to the Hugging Face Hub (SPEC §8).

The folder already is a Hub model repository (``config.json``, ``model.safetensors``, ``README.md``, written by
``flame train`` / ``flame import checkpoint``). ``push`` rewrites the card with the repo id in its usage snippet
and, with ``--results``, the metrics of ``flame eval`` runs as ``model-index`` metadata, then uploads the folder
with :meth:`huggingface_hub.HfApi.upload_folder` (your ``huggingface-cli login`` token). A model whose text-side LLM
is only a local path is refused: nobody else could load its text side.

Examples::

    flame push runs/demo-artifacts/train-XXXX/model me/flame-emoji-tiny --results runs/demo-*/eval/results.json
    flame push models/flame-cc3m me/flame-cc3m --private --card-only    # write the card, upload nothing
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipeline.errors import FlameError
from pipeline.hub import resolve_model_dir, write_card


class PushError(FlameError, ValueError):
    """A model folder that cannot be published as it is."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `flame push`."""
    p = sub.add_parser("push", help="Publish an exported model folder to the Hugging Face Hub", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="exported or imported model folder")
    p.add_argument("repo_id", help="user/name on the Hub")
    p.add_argument("--results", nargs="*", default=[], help="results.json files of flame eval runs for the card")
    p.add_argument("--dataset", action="append", default=[], help="training data set name or hub id (repeatable)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", default=None, help="branch to push to")
    p.add_argument("--card-only", action="store_true", help="write README.md into MODEL_DIR, upload nothing")
    p.set_defaults(func=run_push)


def prepare(model_dir: str | Path, repo_id: str, results: list[str | Path] = (),
            datasets: list[str] | None = None) -> Path:
    """Check the folder and rewrite its model card for ``repo_id``; returns the folder.

    Raises:
        PushError: the text side is a local path, or a results file does not read.
        ModelSourceError: not a model folder.
    """
    folder = resolve_model_dir(model_dir, what="MODEL_DIR")
    config: dict[str, Any] = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    source = config.get("text_encoder") or {}
    if source.get("kind") == "local":
        raise PushError(f"{folder}: its text-side LLM is the local path {source.get('path')}, which no one else can "
                        "load; embed with a hub id or an embedded model name to publish")
    docs = []
    for r in results:
        try:
            docs.append(json.loads(Path(r).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise PushError(f"--results {r}: {exc}") from None
    write_card(folder, config, docs, datasets or None, repo_id)
    return folder


def run_push(args: argparse.Namespace) -> int:
    folder = prepare(args.model_dir, args.repo_id, args.results, args.dataset)
    if args.card_only:
        print(f"wrote {folder / 'README.md'}")
        return 0
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(args.repo_id, private=args.private, exist_ok=True)
    info = api.upload_folder(repo_id=args.repo_id, folder_path=str(folder), revision=args.revision,
                             commit_message="Upload FLAME model (flame-pipeline)")
    print(f"pushed {folder} to {info}")
    return 0
