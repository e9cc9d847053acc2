"""What ``flame_pipeline.load``, ``flame eval --model`` and ``flame index --model`` accept as a model (SPEC §8).

One resolver, :func:`resolve_model`, for every form:

* a model folder written by ``flame train`` or ``flame import checkpoint`` (``config.json`` +
  ``model.safetensors``);
* a Hugging Face hub id, ``user/repo`` or ``user/repo@revision`` (:func:`pipeline.hub.resolve_model_dir`; works
  offline from a filled hub cache);
* an official FLAME checkpoint file (``.pt``/``.pth``/``.bin``/``.safetensors``, an open_clip ``torch.save``
  dict), imported on the fly by the code of ``flame import checkpoint``
  (:func:`flame_pipeline.imports.checkpoint.import_checkpoint`) into
  ``$FLAME_HOME/models/imported/<sha256 of the file>/`` once, and reused after.

``model.init_from`` in a training config takes the first two forms (stage 2 sits below the importer); import a
checkpoint file once with ``flame import checkpoint`` to start training from it.
"""

from __future__ import annotations

from pathlib import Path

from flame_pipeline.imports.checkpoint import SAFETENSORS_SUFFIX, TORCH_SUFFIXES, import_checkpoint
from pipeline.assets import sha256_file
from pipeline.atomic import atomic_directory
from pipeline.hub import ModelSourceError, resolve_model_dir
from pipeline.paths import flame_home

CHECKPOINT_SUFFIXES = (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX)


def resolve_model(src: str | Path, revision: str | None = None, what: str = "model") -> Path:
    """The local model folder for ``src`` (see the module docstring for the accepted forms).

    Raises:
        ModelSourceError: not a model folder, not a checkpoint file, not a reachable hub repository.
        CheckpointImportError: a checkpoint file that is not a FLAME checkpoint.
    """
    path = Path(str(src)).expanduser()
    if path.is_file():
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise ModelSourceError(f"{what} {src}: a file that is not a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})"
                                   " nor a model folder")
        return imported_folder(path)
    return resolve_model_dir(src, revision, what)


def imported_folder(checkpoint: Path) -> Path:
    """The model folder of an official checkpoint file, imported once under ``$FLAME_HOME/models/imported``."""
    target = flame_home() / "models" / "imported" / sha256_file(checkpoint)[:16]
    if (target / "config.json").is_file():
        return target
    with atomic_directory(target, keep_existing=True) as tmp:
        import_checkpoint(checkpoint, tmp)
    return target
