"""Where an LLM's files come from, for both stage-1 backends (SPEC §9): resolution, conversion, fingerprint.

Sources, tried in this order:

* an embedded name (:data:`pipeline.assets.EMBEDDED_LLMS`): its GGUF (from :func:`pipeline.assets.llm_gguf`)
  is converted once to a bf16 safetensors folder ``flame_home()/models/<name>-bf16/``;
* a ``.gguf`` file: loaded by transformers' GGUF loader (``hf``), or converted once to
  ``flame_home()/models/converted/<stem>-bf16/`` (``vllm``, which loads no GGUF here);
* a local folder;
* a Hugging Face hub id (works where the user has a hub or a filled HF cache).

Both backends name a source the same way in cache identities (:attr:`ModelSource.name`) and fingerprint the
same files (:attr:`ModelSource.fingerprint_path`), so their identities differ only in ``backend``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.assets import EMBEDDED_LLMS, llm_gguf
from pipeline.atomic import atomic_directory, atomic_write_bytes
from pipeline.paths import flame_home

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


@dataclass(frozen=True)
class ModelSource:
    """A resolved LLM source.

    Attributes:
        name: as recorded in cache identities: embedded names and hub ids as given, local paths absolute.
        location: the folder to load from (an embedded model's converted folder, a GGUF file's folder, a local
            folder) or the hub id.
        gguf: the GGUF file name inside ``location``, or ``None``.
        given: the source exactly as the user gave it (path expanded).
    """

    name: str
    location: str
    gguf: str | None
    given: str

    @property
    def is_hub_id(self) -> bool:
        return self.gguf is None and not Path(self.location).exists()

    @property
    def fingerprint_path(self) -> str | Path:
        """What :func:`weights_fingerprint` digests: the GGUF file itself, else the folder (or hub id)."""
        return Path(self.location) / self.gguf if self.gguf else self.location


def resolve_source(name_or_path: str) -> ModelSource:
    """Resolve an embedded name, ``.gguf`` file, local folder or hub id; an embedded model is converted once.

    Raises:
        FileNotFoundError: a ``.gguf`` or a path (starting with ``.``, ``/`` or ``~``) that does not exist, or
            an embedded model whose asset is missing.
    """
    p = Path(name_or_path).expanduser()
    local = name_or_path not in EMBEDDED_LLMS and p.exists()
    name = str(p.resolve()) if local else name_or_path
    if name_or_path in EMBEDDED_LLMS:
        return ModelSource(name, str(embedded_folder(name_or_path)), None, str(p))
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        return ModelSource(name, str(p.parent), p.name, str(p))
    if p.exists():
        return ModelSource(name, str(p), None, str(p))
    if name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path not found: {p}")
    return ModelSource(name, name_or_path, None, name_or_path)


def safetensors_folder(source: ModelSource) -> Path:
    """A local safetensors folder of ``source`` (what the ``vllm`` backend loads).

    An embedded model's converted folder or a local folder as is; a ``.gguf`` file converted once to
    ``flame_home()/models/converted/<stem>-bf16``; a hub id's snapshot (``*.safetensors``, ``*.json``,
    ``*.model``, ``*.txt``; needs a hub or a filled HF cache).
    """
    if source.gguf:
        gguf = Path(source.location) / source.gguf
        target = flame_home() / "models" / "converted" / f"{gguf.stem}-bf16"
        if not (target / "config.json").exists():
            log.info("converting %s to a bf16 safetensors folder at %s (once; vLLM cannot load GGUF)", gguf, target)
            convert_gguf(gguf, target)
        return target
    if not source.is_hub_id:
        return Path(source.location)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source.location, allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt"]))


def embedded_folder(name: str) -> Path:
    """The bf16 safetensors folder of embedded model ``name``, converting its GGUF once if needed (SPEC §9).

    Raises:
        pipeline.assets.AssetError: not an embedded model name, or its asset cannot be fetched or verified.
    """
    target = flame_home() / "models" / f"{name}-bf16"
    if (target / "config.json").exists():
        return target
    gguf = Path(llm_gguf(name))
    log.info("converting %s to a bf16 safetensors folder at %s (once)", gguf, target)
    convert_gguf(gguf, target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint and save it as a bf16 safetensors folder (model + tokenizer) at ``target``.

    The folder is written under a temporary name and renamed into place (:func:`pipeline.atomic.atomic_directory`),
    so a killed conversion never leaves a half-written folder; if another process finished the same conversion
    first, its folder is kept and this one discarded.

    Raises:
        OSError: the folder could not be published (and no finished conversion is there).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16, **dequantize_kwargs()
    )
    with atomic_directory(target, keep_existing=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    if not (target / "config.json").exists():
        raise OSError(f"could not publish the converted model at {target}")


def dequantize_kwargs() -> dict:
    """transformers >= 5 keeps GGUF weights packed (and refuses to save them) unless asked to dequantize;
    older versions always dequantize."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def weights_fingerprint(source: str | Path) -> str:
    """``sha256:<hex>`` over the weight files of a folder or a single file, cached in ``flame_home()``.

    The digest covers each weight file's name and contents (sorted by name), so it does not depend on the
    dtype the model is loaded in. The cache entry is keyed by the files' paths, sizes and mtimes; a hub id is
    resolved to its local snapshot (the files already downloaded) first.

    Raises:
        FileNotFoundError: no weight files found.
    """
    files = _weight_files(source)
    stat_key = hashlib.sha256(
        json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]).encode()
    ).hexdigest()
    cache = flame_home() / "fingerprints" / f"{stat_key}.json"
    if cache.exists():
        return json.loads(cache.read_text())["fingerprint"]
    total = hashlib.sha256()
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
        total.update(f"{f.name}:{h.hexdigest()}\n".encode())
    fingerprint = "sha256:" + total.hexdigest()
    atomic_write_bytes(cache, json.dumps({"fingerprint": fingerprint, "files": [str(f) for f in files]}).encode())
    return fingerprint


def _weight_files(source: str | Path) -> list[Path]:
    p = Path(source)
    if p.is_file():
        return [p]
    if not p.is_dir():
        from huggingface_hub import snapshot_download

        p = Path(snapshot_download(str(source), local_files_only=True))  # the files from_pretrained fetched
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in _WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no weight files in {p}")
    return files
