"""Stage-2 checkpoints: where training stands (:class:`TrainState`), writing, finding and checking them.

A checkpoint is ``OUTPUT_DIR/checkpoints/step-NNNNNNN/``: Accelerate's ``save_state`` (model, optimizer,
scheduler, RNG states and the registered :class:`TrainState`) plus ``cache_identity.json``, the essential
identity (:meth:`pipeline.cache.store.CacheIdentity.essential`) of the cache the run trains against, which
``--resume`` checks before loading anything.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from pipeline.atomic import atomic_write_bytes
from pipeline.cache.store import CacheIdentity, CacheIdentityError
from pipeline.errors import FlameError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
CACHE_IDENTITY = "cache_identity.json"


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint.

    Attributes:
        epoch: the epoch to continue in.
        batch: micro-batches of that epoch already consumed (the resume point in the data).
        step: optimizer steps done.
        images: images trained on (all processes).
        history: ``[step, loss]`` of every optimizer step.
        skipped: invalid batch slots seen so far, by reason (failed images, samples without facets).
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    images: int = 0
    history: list[list[float]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class CheckpointError(FlameError, RuntimeError):
    """A checkpoint could not be written (no space left on the device); the partial one was removed."""


def find_checkpoint(output_dir: str | Path, resume: str) -> Path:
    """``resume`` as a checkpoint directory, or the newest under ``output_dir/checkpoints`` for ``"latest"``.

    Raises:
        FileNotFoundError: no such checkpoint.
    """
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return path
    found = sorted((Path(output_dir) / CHECKPOINTS).glob("step-*"))
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint under {Path(output_dir) / CHECKPOINTS}")
    return found[-1]


def check_checkpoint_cache(ckpt: Path, identity: CacheIdentity) -> None:
    """Refuse to resume ``ckpt`` against a cache other than the one it was trained against.

    Compares the essential identity stored in ``ckpt/cache_identity.json`` with ``identity``
    (:meth:`CacheIdentity.check`); a checkpoint without that file (written before it was recorded) is resumed
    with a warning.

    Raises:
        CacheIdentityError: the identities differ (``llm: cache has 'b', expected 'a'``), or the file is unreadable.
    """
    path = ckpt / CACHE_IDENTITY
    if not path.exists():
        log.warning("checkpoint %s records no cache identity; resuming without checking the cache", ckpt)
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CacheIdentityError(f"checkpoint {ckpt}: cannot read {CACHE_IDENTITY}: {exc}") from None
    try:
        identity.check(saved)
    except CacheIdentityError as exc:
        raise CacheIdentityError(f"--resume: checkpoint {ckpt} was trained against another cache: {exc}") from None


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int, identity: CacheIdentity) -> None:
    """Write checkpoint ``step`` (Accelerate state + the cache identity), then keep the newest ``keep``
    (``keep <= 0``: keep all). Collective: every process calls it.

    The checkpoint folder is not renamed into place (every process writes its own RNG state into it, and
    ``save_state`` names the folder itself); ``cache_identity.json`` is written atomically
    (:func:`pipeline.atomic.atomic_write_bytes`) and a partial folder is removed on a full disk.

    Raises:
        CheckpointError: no space left on the device; the partial checkpoint is removed, so ``--resume`` picks
            the last complete one.
        OSError: any other write failure, as raised.
    """
    path = output_dir / CHECKPOINTS / f"step-{step:07d}"
    try:
        accelerator.save_state(str(path))
        if accelerator.is_main_process:
            atomic_write_bytes(path / CACHE_IDENTITY, json.dumps(identity.essential(), indent=2).encode("utf-8"))
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        shutil.rmtree(path, ignore_errors=True)
        done = sorted(p.name for p in (output_dir / CHECKPOINTS).glob("step-*"))
        raise CheckpointError(
            f"no space left on the device writing checkpoint {path}: it was removed; "
            + (f"the last complete one is {done[-1]}" if done else "no complete checkpoint yet")
            + "; free space and rerun with --resume"
        ) from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and keep > 0:
        for old in sorted((output_dir / CHECKPOINTS).glob("step-*"))[:-keep]:
            shutil.rmtree(old)
    log.info("saved checkpoint %s", path)
