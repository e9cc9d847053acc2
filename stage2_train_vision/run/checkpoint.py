"""Stage-2 checkpoints: where training stands (:class:`TrainState`), writing, finding, checking and loading them.

A checkpoint is ``OUTPUT_DIR/checkpoints/step-NNNNNNN/`` and holds no pickle (a checkpoint is data, never code)::

    model.safetensors          the model's weights (float32 as trained)
    optimizer.safetensors      the optimizer's tensors (AdamW moments and step counts), named "PARAM.KEY"
    optimizer.json             its param groups and any non-tensor state
    scheduler.json             the LR schedule's state
    scaler.json                the fp16 gradient scaler's state (fp16 runs only)
    train_state.json           :class:`TrainState` and Accelerate's micro-step counter
    rng-R.json                 process R's Python and NumPy generator states
    rng-R.safetensors          process R's torch CPU (and CUDA) generator states
    cache_identity.json        the essential identity of the cache trained against (checked by ``--resume``)
    checkpoint.json            written last: format, step, processes, and the size of every file above

Publishing is atomic, like the cache's shards: every process writes into the hidden folder
``checkpoints/.step-NNNNNNN.partial``, and rank 0 renames it to ``step-NNNNNNN`` once every file is there. A run
killed during a save leaves only the hidden folder; ``--resume`` names it and any other incomplete checkpoint
it skips, resumes from the newest complete one, and the next save removes the leftover.

Loading reads only these files (safetensors and JSON); a checkpoint folder holding anything else (e.g.
Accelerate's ``custom_checkpoint_0.pkl`` or ``random_states_0.pkl``, which unpickle arbitrary code) is refused.

Rotation (``train.keep_checkpoints``) is ours rather than Accelerate's ``ProjectConfiguration(total_limit=...)``:
Accelerate deletes the old checkpoints *before* writing the new one, into a folder it names itself, so a kill
during that save would leave fewer complete checkpoints than asked for; here old ones go only after the new one is
published (``tests/test_stage2_checkpoint.py`` checks that both keep the same newest folders).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.cache.store import CacheIdentity, CacheIdentityError
from pipeline.errors import FlameError

log = logging.getLogger(__name__)

FORMAT = 1
CHECKPOINTS = "checkpoints"
CACHE_IDENTITY = "cache_identity.json"
MANIFEST = "checkpoint.json"
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCHEDULER = "scheduler.json"
SCALER = "scaler.json"
TRAIN_STATE = "train_state.json"
PARTIAL = ".partial"
_FIXED = {MODEL, OPTIMIZER, OPTIMIZER_JSON, SCHEDULER, SCALER, TRAIN_STATE, CACHE_IDENTITY, MANIFEST}
_RNG = re.compile(r"rng-(\d+)\.(json|safetensors)")
_STEP = re.compile(r"step-(\d+)")


def _written(path: Path) -> None:
    """Called after each file of a checkpoint is written (tests replace it to interrupt a save between files)."""


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint (``train_state.json``).

    Attributes:
        epoch: the epoch to continue in.
        batch: micro-batches of that epoch already consumed (the resume point in the data).
        step: optimizer steps done.
        images: images trained on (all processes).
        history: ``[step, loss]`` of every optimizer step.
        skipped: invalid batch slots seen so far, by reason (images that failed to decode).
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
        names = {f.name for f in dataclasses.fields(self)}
        for k, v in state.items():
            if k in names:
                setattr(self, k, v)


@dataclass
class Checkpointed:
    """What a checkpoint saves and restores.

    Attributes:
        accelerator: the run's Accelerator (process index, barriers, the fp16 scaler, the micro-step counter).
        model: the unwrapped model (its ``state_dict`` is saved as is).
        optimizer: the prepared optimizer.
        scheduler: the LR schedule.
        state: the run's :class:`TrainState`.
    """

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: TrainState


class CheckpointError(FlameError, RuntimeError):
    """A checkpoint could not be written (no space left), or cannot be resumed: incomplete, damaged, written by
    another number of processes, or holding files that are not part of a checkpoint (pickles)."""


class ForeignCheckpointError(CheckpointError):
    """A checkpoint folder holds a file no flame checkpoint contains (e.g. a pickle): never loaded, never skipped."""


def step_of(path: Path) -> int | None:
    """The step of a published checkpoint folder ``step-NNNNNNN``; ``None`` for any other name."""
    m = _STEP.fullmatch(path.name)
    return int(m.group(1)) if m else None


def published(output_dir: str | Path) -> list[Path]:
    """The published checkpoint folders under ``output_dir/checkpoints``, oldest step first."""
    root = Path(output_dir) / CHECKPOINTS
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None] if root.is_dir() else []
    return sorted(found, key=step_of)


def check_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Check that ``ckpt`` is a complete flame checkpoint made only of its data files; returns its manifest
    (``checkpoint.json``: ``format``, ``step``, ``processes``, ``files``).

    Raises:
        ForeignCheckpointError: a file that is not part of a checkpoint (a pickle, ...).
        CheckpointError: no ``checkpoint.json`` (an interrupted save), or a listed file missing or of another size.
    """
    names = sorted(p.name for p in ckpt.iterdir())
    foreign = [n for n in names if n not in _FIXED and not _RNG.fullmatch(n)]
    if foreign:
        raise ForeignCheckpointError(
            f"checkpoint {ckpt} holds {', '.join(foreign[:3])}, which flame checkpoints never contain (flame loads "
            "only safetensors and JSON, never pickles): refusing to resume from it"
        )
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))
        files = dict(manifest["files"])
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete (no {MANIFEST}: its save was interrupted)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt}: {MANIFEST} is damaged ({exc})") from None
    for name, size in files.items():
        path = ckpt / name
        if not path.is_file() or path.stat().st_size != size:
            got = path.stat().st_size if path.is_file() else "missing"
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {name} is {got}, expected {size} bytes")
    return manifest


def find_checkpoint(output_dir: str | Path, resume: str) -> Path:
    """``resume`` as a checkpoint directory, or for ``"latest"`` the newest *complete* one under
    ``output_dir/checkpoints``; each incomplete one skipped (an interrupted save) is named in a warning.

    Raises:
        FileNotFoundError: no such checkpoint, or no complete one.
        CheckpointError: the named checkpoint is incomplete or holds foreign files (:func:`check_checkpoint`).
    """
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        check_checkpoint(path)
        return path
    root = Path(output_dir) / CHECKPOINTS
    for partial in sorted(root.glob(f".step-*{PARTIAL}")) if root.is_dir() else []:
        log.warning("--resume: skipping %s, a checkpoint whose save was interrupted", partial)
    for path in reversed(published(output_dir)):
        try:
            check_checkpoint(path)
        except ForeignCheckpointError:
            raise
        except CheckpointError as exc:
            log.warning("--resume: skipping %s", exc)
            continue
        return path
    raise FileNotFoundError(f"--resume: no complete checkpoint under {root}")


def check_checkpoint_cache(ckpt: Path, identity: CacheIdentity) -> None:
    """Refuse to resume ``ckpt`` against a cache other than the one it was trained against.

    Compares the essential identity stored in ``ckpt/cache_identity.json`` with ``identity``
    (:meth:`CacheIdentity.check`).

    Raises:
        CacheIdentityError: the identities differ (``llm: cache has 'b', expected 'a'``), or the file is unreadable.
    """
    try:
        saved = json.loads((ckpt / CACHE_IDENTITY).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CacheIdentityError(f"checkpoint {ckpt}: cannot read {CACHE_IDENTITY}: {exc}") from None
    try:
        identity.check(saved)
    except CacheIdentityError as exc:
        raise CacheIdentityError(f"--resume: checkpoint {ckpt} was trained against another cache: {exc}") from None


def _write_json(path: Path, obj: Any) -> None:
    _write(path, lambda p: p.write_bytes(json.dumps(obj, indent=1).encode("utf-8")))


def _write(path: Path, writer: Callable[[Path], Any]) -> None:
    writer(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    _written(path)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (the folder's entry reaches the disk, not only the files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """This process's generator states: Python's and NumPy's as JSON, torch's as tensors (no pickle)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state, tensors


def _set_rng_state(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's ``state_dict`` split into tensors (``"PARAM.KEY"``) and the JSON rest."""
    sd = optimizer.state_dict()
    tensors, rest = {}, {}
    for pid, values in sd["state"].items():
        rest[str(pid)] = {}
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                rest[str(pid)][k] = v
    return tensors, {"param_groups": sd["param_groups"], "state": rest}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(pid): dict(values) for pid, values in meta["state"].items()}
    for name, t in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = t
    return {"state": state, "param_groups": meta["param_groups"]}


def _write_files(what: Checkpointed, tmp: Path, identity: CacheIdentity) -> None:
    """Rank 0's files of a checkpoint (model, optimizer, schedule, scaler, train state, cache identity)."""
    acc = what.accelerator
    weights = {k: v.detach().to("cpu").contiguous() for k, v in what.model.state_dict().items()}
    _write(tmp / MODEL, lambda p: save_file(weights, p, metadata={"format": "pt"}))
    tensors, meta = _optimizer_parts(what.optimizer)
    _write(tmp / OPTIMIZER, lambda p: save_file(tensors, p))
    _write_json(tmp / OPTIMIZER_JSON, meta)
    _write_json(tmp / SCHEDULER, what.scheduler.state_dict())
    if acc.scaler is not None:
        _write_json(tmp / SCALER, acc.scaler.state_dict())
    _write_json(tmp / TRAIN_STATE, {"train": what.state.state_dict(), "accelerator_step": acc.step})
    _write_json(tmp / CACHE_IDENTITY, identity.essential())


def save_checkpoint(what: Checkpointed, output_dir: Path, keep: int, identity: CacheIdentity) -> Path:
    """Publish checkpoint ``what.state.step`` atomically, then keep the newest ``keep`` (``keep <= 0``: all).
    Collective: every process calls it. Returns the checkpoint folder.

    Every process writes its RNG state into ``checkpoints/.step-NNNNNNN.partial``, rank 0 the rest and then
    ``checkpoint.json`` (the size of every file), and renames the folder to ``step-NNNNNNN`` last. A checkpoint
    of the same step that exists already (a rerun) is replaced.

    Raises:
        CheckpointError: no space left on the device; the partial checkpoint is removed, so ``--resume`` picks
            the last complete one.
        OSError: any other write failure, as raised.
    """
    acc, step = what.accelerator, what.state.step
    root = output_dir / CHECKPOINTS
    path, tmp = root / f"step-{step:07d}", root / f".step-{step:07d}{PARTIAL}"
    try:
        if acc.is_main_process:
            for old in root.glob(f".step-*{PARTIAL}"):  # interrupted saves; one run per output folder (run lock)
                shutil.rmtree(old)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        state, tensors = _rng_state()
        _write_json(tmp / f"rng-{acc.process_index}.json", state)
        _write(tmp / f"rng-{acc.process_index}.safetensors", lambda p: save_file(tensors, p))
        if acc.is_main_process:
            _write_files(what, tmp, identity)
        acc.wait_for_everyone()
        if acc.is_main_process:
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            _write_json(tmp / MANIFEST, {"format": FORMAT, "step": step, "processes": acc.num_processes,
                                         "files": files})
            if path.exists():
                shutil.rmtree(path)
            os.rename(tmp, path)
            _fsync_dir(root)
            _written(path)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        done = [p.name for p in published(output_dir)]
        raise CheckpointError(
            f"no space left on the device writing checkpoint {path}: it was removed; "
            + (f"the last complete one is {done[-1]}" if done else "no complete checkpoint yet")
            + "; free space and rerun with --resume"
        ) from None
    acc.wait_for_everyone()
    if acc.is_main_process and keep > 0:
        for old in published(output_dir)[:-keep]:
            shutil.rmtree(old)
    log.info("saved checkpoint %s", path)
    return path


def load_checkpoint(what: Checkpointed, ckpt: Path) -> None:
    """Restore ``what`` from the complete checkpoint ``ckpt`` (:func:`check_checkpoint` first): weights,
    optimizer, schedule, scaler, :class:`TrainState`, Accelerate's micro-step counter and this process's RNG
    states. Reads only safetensors and JSON.

    Raises:
        CheckpointError: incomplete, foreign files, written by another number of processes, or a file that does
            not parse or fit the model.
    """
    acc = what.accelerator
    manifest = check_checkpoint(ckpt)
    if manifest.get("processes") != acc.num_processes:
        raise CheckpointError(
            f"checkpoint {ckpt} was written by {manifest.get('processes')} processes and this run has "
            f"{acc.num_processes}: resume with the same number of processes (each restores its own RNG state)"
        )
    try:
        what.model.load_state_dict(load_file(ckpt / MODEL), strict=True)
        meta = json.loads((ckpt / OPTIMIZER_JSON).read_text(encoding="utf-8"))
        what.optimizer.load_state_dict(_optimizer_state(load_file(ckpt / OPTIMIZER), meta))
        what.scheduler.load_state_dict(json.loads((ckpt / SCHEDULER).read_text(encoding="utf-8")))
        if acc.scaler is not None and (ckpt / SCALER).exists():
            acc.scaler.load_state_dict(json.loads((ckpt / SCALER).read_text(encoding="utf-8")))
        train = json.loads((ckpt / TRAIN_STATE).read_text(encoding="utf-8"))
        what.state.load_state_dict(train["train"])
        acc.step = int(train["accelerator_step"])
        rank = acc.process_index
        _set_rng_state(json.loads((ckpt / f"rng-{rank}.json").read_text(encoding="utf-8")),
                       load_file(ckpt / f"rng-{rank}.safetensors"))
    except (SafetensorError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt} cannot be loaded: {str(exc).splitlines()[0]}") from None
