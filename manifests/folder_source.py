"""A folder of images plus a captions JSONL file -> manifest.

``FOLDER/captions.jsonl`` (``--captions-file`` names another file in the folder) holds one JSON object per
line; blank lines are ignored. Fields:

==================  ========  ===============================================================================
``file``            required  image path, relative to the folder (or absolute, inside the folder)
``key``             optional  sample key; default: ``file`` as written
``raw_caption``     optional  original caption; ``caption`` is read when ``raw_caption`` is absent
``short_caption``   optional  short recaption
``long_caption``    optional  long recaption
``split``           optional  default: ``--split``
``lang``            optional  BCP-47 language of the captions
==================  ========  ===============================================================================

Rows reference the image file (``image_path``: relative to the manifest folder if the image lies under it,
else absolute). Outcomes (besides those in :mod:`manifests.common`): a line that is not a JSON object ->
``skipped_bad_line``; no ``file`` and no ``key`` -> ``skipped_no_key``; no ``file`` or a missing file ->
``skipped_no_image``; a ``file`` outside the folder (absolute elsewhere, or ``..`` climbing out of it) ->
``skipped_image_outside_root`` (never opened); undecodable file -> ``skipped_undecodable_image``; a non-string caption raises
:class:`~manifests.schema.ManifestError`. Image files (``.jpg .jpeg .png .webp``) in the folder that no
line names are counted as ``unlisted_images`` (not counted when ``--limit`` stopped the read early).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from manifests.common import (
    IMAGE_SUFFIXES,
    ManifestBuilder,
    caption_value,
    file_image_problem,
    reference_path,
)
from manifests.registry import common_options, register_options, register_source
from manifests.schema import LONG_CAPTION, RAW_CAPTION, SHORT_CAPTION, ManifestError, ManifestInfo
from pipeline.paths import confined_path

log = logging.getLogger(__name__)

CAPTIONS_FILE = "captions.jsonl"


def build_folder_manifest(
    folder: str | Path,
    out_dir: str | Path,
    *,
    captions_file: str = CAPTIONS_FILE,
    split: str = "train",
    on_duplicate: str = "error",
    limit: int | None = None,
) -> ManifestInfo:
    """Build a manifest from an image folder and its captions JSONL (fields in the module docstring).

    Args:
        folder: the image folder.
        out_dir: the manifest directory.
        captions_file: the JSONL file name inside ``folder``.
        split: ``split`` of lines without one.
        on_duplicate: ``"error" | "first" | "skip"`` (:mod:`manifests.common`).
        limit: read at most this many lines.

    Raises:
        FileNotFoundError: the folder or its captions file does not exist.
        ManifestError: a caption field is not a string, or the file is not UTF-8.
        DuplicateKeyError: a repeated key under ``on_duplicate="error"``.
    """
    folder = Path(folder)
    jsonl = folder / captions_file
    if not jsonl.is_file():
        raise FileNotFoundError(f"captions file {jsonl} does not exist")
    args = {"folder": str(folder), "captions_file": captions_file, "split": split,
            "on_duplicate": on_duplicate, "limit": limit}
    listed: set[Path] = set()
    with ManifestBuilder(out_dir, {"name": "folder", "args": args}, on_duplicate, limit) as builder:
        try:
            with open(jsonl, encoding="utf-8") as f:
                for lineno, line in enumerate(tqdm(f, desc=f"read {captions_file}", unit="line", disable=None), 1):
                    if builder.full:
                        break
                    if line.strip():
                        _add_line(line, f"{jsonl} line {lineno}", folder, Path(out_dir), split, builder, listed)
        except UnicodeDecodeError as exc:
            raise ManifestError(f"{jsonl} is not UTF-8 text ({exc})") from exc
        if not builder.full:
            unlisted = _count_unlisted(folder, listed)
            if unlisted:
                builder.count("unlisted_images", unlisted)
        return builder.finish()


def _add_line(
    line: str, where: str, folder: Path, out_dir: Path, split: str, builder: ManifestBuilder, listed: set[Path]
) -> None:
    try:
        entry: Any = json.loads(line)
    except json.JSONDecodeError as exc:
        log.debug("%s: %s", where, exc)
        entry = None
    if not isinstance(entry, dict):
        builder.reject("bad_line")
        return
    file = entry.get("file")
    key = entry.get("key") or file
    if not key:
        builder.reject("no_key")
        return
    raw = entry[RAW_CAPTION] if RAW_CAPTION in entry else entry.get("caption")
    row = {
        "key": str(key),
        RAW_CAPTION: caption_value(raw, where),
        SHORT_CAPTION: caption_value(entry.get(SHORT_CAPTION), where),
        LONG_CAPTION: caption_value(entry.get(LONG_CAPTION), where),
        "split": entry.get("split") or split,
        "lang": entry.get("lang"),
    }
    full = confined_path(folder, str(file)) if file else None
    if full is not None:
        listed.add(full.resolve())
        skip = file_image_problem(full)
        row["image_path"] = reference_path(full, out_dir)
    elif file:
        skip = "image_outside_root"
    else:
        skip = "no_image"
    builder.add(row, where, skip=skip)


def _count_unlisted(folder: Path, listed: set[Path]) -> int:
    return sum(
        1
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and path.resolve() not in listed
    )


def _one_folder(name: str, inputs: list[str]) -> None:
    if len(inputs) != 1:
        raise ManifestError(f"source {name!r} takes exactly one folder, got {len(inputs)} inputs")


@register_options("folder", rank=50)
def _add_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--captions-file", default=CAPTIONS_FILE, help="captions JSONL inside the folder")


@register_source("folder", rank=50, inputs="one image folder with ``captions.jsonl``",
                 check_inputs=_one_folder)
def _build_from_args(args: argparse.Namespace) -> ManifestInfo:
    return build_folder_manifest(args.inputs[0], args.out, captions_file=args.captions_file,
                                 **common_options(args))
