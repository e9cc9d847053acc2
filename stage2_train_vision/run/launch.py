"""How a stage-2 run starts under Accelerate: the launcher's settings win (SPEC §5, issue 21).

One rule for precision: ``train.mixed_precision = "launcher"`` (the default) takes what ``accelerate launch``
was told, by its ``--mixed_precision`` flag or its config file, which it passes to the script as
``ACCELERATE_MIXED_PRECISION`` (``"no"`` when neither sets it, and without a launcher); an explicit TOML value
must agree with the launcher's, else the run stops with one line naming both (:func:`resolve_mixed_precision`).
Process count and distributed type are the launcher's alone; a launch that asked for several processes and did
not start them all in one process group stops with one line (:func:`check_world`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from pipeline.machine import fast_bf16
from stage2_train_vision.config import Config, ConfigError
from stage2_train_vision.run.run_lock import RunLock, RunLockError

WORLD_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def resolve_mixed_precision(value: str, env: dict[str, str] | None = None) -> str:
    """The precision to run: the launcher's for ``"launcher"``, else ``value`` if the launcher agrees.

    ``accelerate launch`` passes its ``--mixed_precision`` flag or its config file's ``mixed_precision`` (``"no"``
    when neither sets it) as ``ACCELERATE_MIXED_PRECISION``; without a launcher (``flame train``) the variable is
    normally unset.

    Args:
        value: ``train.mixed_precision`` (``"launcher"``, ``"auto"``, ``"no"``, ``"bf16"`` or ``"fp16"``); ``"auto"``
            takes the launcher's when it sets one, else ``"bf16"`` if bf16 is native on this machine's device
            (:func:`pipeline.machine.fast_bf16`) and ``"no"`` if not.
        env: the environment (default ``os.environ``).

    Returns:
        ``"no"``, ``"bf16"``, ``"fp16"`` (or what else the launcher names, e.g. ``"fp8"``, for Accelerate to check).

    Raises:
        ConfigError: ``value`` is explicit and the launcher asks for another precision (naming both).
    """
    launcher = (os.environ if env is None else env).get("ACCELERATE_MIXED_PRECISION")
    launcher = launcher.lower() if launcher else None
    if value == "launcher":
        return launcher or "no"
    if value == "auto":
        return launcher or ("bf16" if fast_bf16("cuda" if torch.cuda.is_available() else "cpu") else "no")
    if launcher is not None and launcher != value:
        raise ConfigError(
            f"train.mixed_precision = {value!r} but accelerate launch asks for {launcher!r} (its --mixed_precision "
            "flag or config file; 'no' when neither sets it): remove train.mixed_precision to take the launcher's, "
            "or make them agree"
        )
    return value


def check_world(accelerator: Accelerator, env: dict[str, str] | None = None) -> None:
    """Refuse a launch that did not start the processes it asked for: processes that did not join one process
    group (each would train alone into the same output directory), or ``accelerate launch`` told to start
    several processes (it then sets ``MASTER_PORT``) that started only this one without a process group (a
    ``MULTI_CPU`` config file on one machine does that). Raises :class:`ConfigError` naming the counts."""
    env = os.environ if env is None else env
    launched = int(env.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise ConfigError(
            f"launched as {launched} processes (WORLD_SIZE) but Accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}); check the accelerate launch options"
        )
    by_accelerate = "ACCELERATE_MIXED_PRECISION" in env or "ACCELERATE_USE_CPU" in env
    if by_accelerate and "MASTER_PORT" in env and not any(k in env for k in WORLD_ENV):
        raise ConfigError(
            "accelerate launch was asked for several processes (it set MASTER_PORT) but started only this one, "
            "without a process group; on one machine use `accelerate launch --multi_gpu --num_processes N` "
            "(with CUDA_VISIBLE_DEVICES= for CPU processes), not distributed_type MULTI_CPU"
        )


def make_accelerator(cfg: Config) -> Accelerator:
    """Check the config's run-wide settings, set the torch threads and create the run's Accelerator (``cpu=True``
    without CUDA; precision per :func:`resolve_mixed_precision`, accumulation and trackers from ``cfg.train``,
    tracker logs under ``output_dir/logs``).

    Raises:
        ConfigError: ``data.manifest`` or ``data.cache`` unset, a precision that contradicts the launcher's, or
            the launched processes did not all start and join one group (:func:`check_world`).
    """
    tc = cfg.train
    for name in ("manifest", "cache"):
        if not getattr(cfg.data, name):
            raise ConfigError(f"data.{name} is not set: pass data.{name}=DIR")
    precision = resolve_mixed_precision(tc.mixed_precision)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    out = Path(tc.output_dir)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        gradient_accumulation_steps=tc.grad_accum,
        log_with=tc.log_with or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    check_world(accelerator)
    return accelerator


def tracker_init_kwargs(cfg: Config) -> dict[str, dict[str, Any]]:
    """Accelerate's ``init_kwargs``: ``train.tracker_init`` with the run name (``train.run_name``, default the
    output folder's name) filled in for the trackers that take one (wandb ``name``, mlflow ``run_name``)."""
    tc = cfg.train
    name = tc.run_name or Path(tc.output_dir).name
    kwargs = {k: dict(v) for k, v in tc.tracker_init.items()}
    for tracker, key in (("wandb", "name"), ("mlflow", "run_name")):
        if tracker in tc.log_with or "all" in tc.log_with:
            kwargs.setdefault(tracker, {}).setdefault(key, name)
    return kwargs


def take_run_lock(accelerator: Accelerator, output_dir: str) -> RunLock | None:
    """Collective: the main process takes ``output_dir``'s run lock (:class:`RunLock`) and returns it; the others
    return ``None``. If the main one is refused, every process raises :class:`RunLockError` (the main one with
    the holder's name), so none waits for the others in a collective."""
    lock, refused = None, None
    if accelerator.is_main_process:
        lock = RunLock(output_dir)
        try:
            lock.acquire()
        except RunLockError as exc:
            lock, refused = None, exc
    ok = refused is None
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(torch.tensor(float(ok), device=accelerator.device), "sum").item()
        ok = flag == accelerator.num_processes
    if refused is not None:
        raise refused
    if not ok:
        raise RunLockError(f"output folder {output_dir} is in use by another run (see the main process)")
    return lock


def flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"section.key": scalar or str}`` for trackers (TensorBoard hparams take scalars)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, f"{name}."))
        else:
            out[name] = v if isinstance(v, int | float | str | bool) else str(v)
    return out
