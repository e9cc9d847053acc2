"""Stage 2 training loop (SPEC §5): ViT + projector against cached text vectors, under Accelerate.

Run it as ``accelerate launch stage2_train_vision/train.py --config FILE [section.key=value ...] [--resume]``
or, in one process, ``flame train --config FILE ...``. The text side is the cache only: nothing here imports
transformers or an LLM.

Outputs under ``train.output_dir``: ``checkpoints/step-NNNNNNN/`` (Accelerate ``save_state``: model, optimizer,
scheduler, RNG, and :class:`TrainState` = epoch, position in the epoch, step, loss history; plus
``cache_identity.json``, the essential identity of the cache it was trained against, which ``--resume``
checks), ``model/`` (the export, :mod:`stage2_train_vision.export`), ``loss.png``, ``train_config.json`` and
tracker logs.

Processes: on a machine without CUDA the Accelerator is created with ``cpu=True``, so ``accelerate launch
--multi_gpu --num_processes N`` trains on N CPU processes over gloo (``DistributedType.MULTI_CPU``).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import is_tensorboard_available, set_seed
from tqdm.auto import tqdm

from pipeline.atomic import atomic_write_bytes
from pipeline.cache import CacheIdentity, CacheIdentityError, CacheReader
from pipeline.errors import FlameError, run_command
from stage2_train_vision.cli import add_arguments, run
from stage2_train_vision.config import Config, ConfigError, ModelConfig
from stage2_train_vision.data import build_training_data, sample_seed
from stage2_train_vision.export import export_model
from stage2_train_vision.init_from import apply_init_from, load_init_weights
from stage2_train_vision.loss import contrastive_loss
from stage2_train_vision.model import FlameVisionModel
from stage2_train_vision.optim import build_optimizer, build_scheduler
from stage2_train_vision.plots import plot_loss_curve
from stage2_train_vision.transforms import train_transform

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


def resolve_model_config(cfg: ModelConfig, cache_dim: int) -> ModelConfig:
    """``cfg`` with ``out_dim`` = the cache's D. Raises :class:`CacheIdentityError` if ``cfg.out_dim`` is set
    to another value (D is never typed twice: leave ``model.out_dim`` unset normally)."""
    if cfg.out_dim is not None and cfg.out_dim != cache_dim:
        raise CacheIdentityError(
            f"projector output model.out_dim={cfg.out_dim} but the cache's D is {cache_dim}; "
            "remove model.out_dim (D comes from the cache) or use the cache it was meant for"
        )
    return dataclasses.replace(cfg, out_dim=cache_dim)


def per_process_batch(global_batch: int, world: int, grad_accum: int) -> int:
    """Images per process per micro-step. Raises :class:`ConfigError` unless the global batch divides evenly."""
    if global_batch % (world * grad_accum):
        raise ConfigError(
            f"train.batch_size={global_batch} is not divisible by processes x grad_accum = {world} x {grad_accum}"
        )
    return global_batch // (world * grad_accum)


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

    Compares the essential identity stored in ``ckpt/cache_identity.json`` with ``identity``; a checkpoint
    without that file (written before it was recorded) is resumed with a warning.

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


class CheckpointError(FlameError, RuntimeError):
    """A checkpoint could not be written (no space left on the device); the partial one was removed."""


def _save(accelerator: Accelerator, output_dir: Path, step: int, keep: int, identity: CacheIdentity) -> None:
    """Write checkpoint ``step`` (Accelerate state + the cache identity), then keep the newest ``keep``.

    Raises:
        CheckpointError: no space left on the device; the partial checkpoint is removed, so ``--resume`` picks
            the last complete one.
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


def train(cfg: Config, resume: str | None = None, text_tower: Any = None) -> dict[str, Any]:
    """Train per ``cfg``; resume from a checkpoint (path or ``"latest"``) if given.

    ``text_tower``: a :class:`stage2_train_vision.text_tower.TextTowerConfig` to train a text transformer from
    scratch jointly with the ViT instead of using the cached vectors (the CLIP-style baseline of
    ``bench/fidelity.py``); ``None`` (default): the FLAME recipe, texts from the cache only.

    Accelerate's process-wide state is reset afterwards while the distributed setup (the process group) is kept,
    so ``train`` can be called again in the same process with another precision or accumulation (tests,
    ``flame demo``); :func:`main` destroys the process group when the script ends.

    Returns:
        The run summary (also written into the export's ``config.json["train"]``); ``"stopped": True`` when
        ``train.stop_at_step`` ended the run early (no export then).

    Raises:
        ConfigError, CacheIdentityError, DataError: refusals with a message naming the values involved.
    """
    try:
        return _train(cfg, resume, text_tower)
    finally:
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _train(cfg: Config, resume: str | None, text_tower: Any = None) -> dict[str, Any]:
    tc = cfg.train
    for name in ("manifest", "cache"):
        if not getattr(cfg.data, name):
            raise ConfigError(f"data.{name} is not set: pass data.{name}=DIR")
    if "tensorboard" in tc.log_with and not is_tensorboard_available():
        raise ConfigError("train.log_with names tensorboard but it is not installed: pip install tensorboard")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    output_dir = Path(tc.output_dir)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=tc.grad_accum,
        log_with=tc.log_with or None,
        project_dir=str(output_dir),
    )
    check_world(accelerator)
    set_seed(tc.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    reader = CacheReader(cfg.data.cache, expect=cfg.data.expect or None)
    ckpt = find_checkpoint(output_dir, resume) if resume else None
    if ckpt is not None:
        check_checkpoint_cache(ckpt, reader.identity)
    if cfg.model.init_from:  # model.init_from: the architecture comes from that model's config.json
        cfg = apply_init_from(cfg, reader.identity)
    model_cfg = resolve_model_config(cfg.model, reader.dim)
    batch = per_process_batch(tc.batch_size, world, tc.grad_accum)
    data = build_training_data(
        cfg.data, reader, train_transform(cfg), model_cfg.img_size, batch, rank, world, tc.seed, tc.grad_accum
    )
    if data.skipped:
        log.warning("dropped before training: %s", dict(data.skipped))
    model = FlameVisionModel(model_cfg)
    captions = None
    if text_tower is not None:  # texts come from a tower trained here, not from the cache (text_tower.py)
        from stage2_train_vision.text_tower import CaptionSampler, attach_text_tower

        attach_text_tower(model, text_tower, model_cfg.out_dim)
        captions = CaptionSampler(text_tower, cfg.data.manifest, cfg.data.split)
    if cfg.model.init_from and ckpt is None:  # model.init_from: its weights (a resumed run takes the checkpoint's)
        load_init_weights(model, cfg.model.init_from)
    optimizer = build_optimizer(model, cfg.optim)
    total_steps = tc.max_steps or sum(data.steps_per_epoch(e) for e in range(tc.epochs)) // tc.grad_accum
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    state = TrainState()
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler, state)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        log.info("resumed from %s at epoch %d, batch %d, step %d", ckpt, state.epoch, state.batch, state.step)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=list))
    if tc.log_with:
        accelerator.init_trackers("flame-stage2", config=_flat(cfg.to_dict()))
    log.info(
        "%s samples (%s), %d processes (%s) x %d images x %d accumulation = batch %d, %d steps, D=%d",
        data.n_samples, data.mode, world, accelerator.distributed_type.value, batch, tc.grad_accum, tc.batch_size,
        total_steps, model_cfg.out_dim,
    )

    core = accelerator.unwrap_model(model)
    bar = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_main_process, desc="train")
    skipped = Counter(state.skipped)
    stopped = False
    t_start, images_start = time.perf_counter(), state.images
    accum = torch.zeros((), device=accelerator.device)
    model.train()
    while state.step < total_steps:
        epoch = state.epoch
        n_batches = data.steps_per_epoch(epoch)
        if state.batch >= n_batches:  # a resumed position past this config's epoch would never advance
            raise ConfigError(
                f"the checkpoint is at batch {state.batch} of epoch {epoch} but this config gives {n_batches} "
                "batches per epoch; resume with the checkpoint's batch size, processes and data"
            )
        data.set_epoch(epoch, state.batch)
        for b in data.loader:
            images = b["images"].to(accelerator.device, non_blocking=True)
            with accelerator.accumulate(model):
                texts, text_valid = b["texts"], b["text_valid"]
                with accelerator.autocast():
                    if captions is None:
                        emb = model(images)
                    else:  # one caption per image through the tower: P = 1
                        tokens = captions(b["keys"], sample_seed(tc.seed, epoch, state.batch, rank))
                        emb, texts = model(images, tokens.to(accelerator.device))
                        texts, text_valid = texts[:, None], torch.ones(len(tokens), 1, dtype=torch.bool)
                loss = contrastive_loss(
                    cfg.loss.kind, emb, texts.to(emb.device), text_valid.to(emb.device),
                    core.temperature(), core.logit_bias, b["image_valid"].to(emb.device),
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            accum += loss.detach()
            skipped.update(b["skipped"])
            state.batch += 1
            state.images += batch * world
            if state.batch == n_batches:
                state.epoch, state.batch = epoch + 1, 0
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state.step += 1
            value = accelerator.reduce(accum, "mean").item() / tc.grad_accum
            accum.zero_()
            state.history.append([state.step, value])
            state.skipped = dict(skipped)
            rate = (state.images - images_start) / (time.perf_counter() - t_start)
            lr = scheduler.get_last_lr()[0]
            t = core.temperature().item()
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", t=f"{t:.2f}", img_s=f"{rate:.0f}")
            if tc.log_with and state.step % tc.log_every == 0:
                accelerator.log({"loss": value, "lr": lr, "logit_scale": t, "images_per_s": rate}, step=state.step)
            if tc.save_every and state.step % tc.save_every == 0:
                _save(accelerator, output_dir, state.step, tc.keep_checkpoints, reader.identity)
            if tc.stop_at_step and state.step >= tc.stop_at_step:
                stopped = True
            if stopped or state.step == total_steps:
                break
        if stopped or state.step == total_steps:
            break
        if state.epoch == epoch:  # every process yields steps_per_epoch batches; anything else would hang
            raise RuntimeError(f"the data loader ended epoch {epoch} after {state.batch} of {n_batches} batches")
    bar.close()
    elapsed = time.perf_counter() - t_start
    if not stopped and (not tc.save_every or state.step % tc.save_every):
        _save(accelerator, output_dir, state.step, tc.keep_checkpoints, reader.identity)
    summary = {
        "steps": state.step,
        "total_steps": total_steps,
        "epochs": round(state.epoch + state.batch / max(data.steps_per_epoch(state.epoch), 1), 3),
        "images": state.images,
        "images_per_s": round((state.images - images_start) / max(elapsed, 1e-9), 2),
        "processes": world,
        "batch_size": tc.batch_size,
        "loss": cfg.loss.kind,
        "first_loss": state.history[0][1] if state.history else None,
        "final_loss": state.history[-1][1] if state.history else None,
        "skipped_before_training": dict(data.skipped),
        "skipped_in_batches": dict(skipped),
        "stopped": stopped,
        "seed": tc.seed,
    }
    if not stopped and accelerator.is_main_process:
        text_side = None
        if text_tower is not None:
            from stage2_train_vision.text_tower import text_side_config

            text_side = text_side_config(text_tower, model_cfg.out_dim)
        export_model(core, model_cfg, cfg.data, reader.identity.to_dict(), output_dir / "model", summary, text_side)
        log.info("exported %s; loss %s -> %s", output_dir / "model", summary["first_loss"], summary["final_loss"])
        if state.history:
            steps, losses = zip(*state.history)
            plot_loss_curve(steps, losses, output_dir / "loss.png", title=f"{cfg.model.name} / {cfg.loss.kind}")
    for tracker in accelerator.trackers:  # end_training() would also destroy the process group; main() does
        tracker.finish()
    return summary


def check_world(accelerator: Accelerator) -> None:
    """Refuse a launch whose processes did not join one process group (each would train alone into the same
    output directory). Raises :class:`ConfigError` naming the launched and the joined process counts."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise ConfigError(
            f"launched as {launched} processes (WORLD_SIZE) but Accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}); check the accelerate launch options"
        )


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"section.key": scalar or str}`` for trackers (TensorBoard hparams take scalars)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, f"{name}."))
        else:
            out[name] = v if isinstance(v, int | float | str | bool) else str(v)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point under ``accelerate launch``; returns the exit code: bad input or a refusal (the errors
    ``flame`` maps, :func:`pipeline.errors.run_command`) ends in one line on stderr and exit code 2."""
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parser.parse_args(argv)
    try:
        return run_command("train.py", lambda: run(args))
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
