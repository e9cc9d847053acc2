"""Stage 2 training loop (SPEC §5): ViT + projector against cached text vectors, under Accelerate.

Run it as ``accelerate launch stage2_train_vision/train.py --config FILE [section.key=value ...] [--resume]``
or, in one process, ``flame train --config FILE ...``. The text side is the cache only: nothing here imports
transformers or an LLM.

The run reads top to bottom in :func:`_train`: :func:`make_accelerator`, :func:`build_run` (cache, data,
model, optimizer, schedule, resume), then :func:`stage2_train_vision.step.train_step` per micro-batch with
:func:`end_step` after every optimizer step (loss, progress, trackers, checkpoints), then :func:`finish`
(final checkpoint, export, loss plot).

Outputs under ``train.output_dir``: ``checkpoints/step-NNNNNNN/`` (:mod:`stage2_train_vision.run.checkpoint`:
published atomically, safetensors and JSON only, with ``cache_identity.json``, which ``--resume`` checks),
``metrics.jsonl`` (every step, :mod:`stage2_train_vision.run.metrics`), ``model/`` (the export,
:mod:`stage2_train_vision.export`), ``loss.png``, ``train_config.json``, tracker logs under ``logs/`` and
``train.lock`` (one run per folder, :mod:`stage2_train_vision.run.run_lock`). ``flame train`` ends by printing
where each of them is.

The launcher's precision and processes win (:mod:`stage2_train_vision.run.launch`). Without CUDA the Accelerator
is created with ``cpu=True``, so ``accelerate launch --multi_gpu --num_processes N`` trains on N CPU processes
over gloo (``DistributedType.MULTI_CPU``).

Training stops with one line at the first non-finite cache vector in a batch (naming its key) or non-finite
loss (naming the step), before that step is checkpointed, and a model with a non-finite weight is never exported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from pipeline.atomic import atomic_write_bytes
from pipeline.cache.store import CacheIdentityError, CacheReader
from pipeline.cache.verify import check_parts
from pipeline.errors import run_command
from stage2_train_vision.cli import add_arguments
from stage2_train_vision.config import Config, ConfigError, ImageConfig, ModelConfig, load_config
from stage2_train_vision.data.pairs import TrainingData, build_training_data, sample_seed
from stage2_train_vision.data.transforms import train_transform
from stage2_train_vision.export import export_model
from stage2_train_vision.init_from import apply_init_from, load_init_weights
from stage2_train_vision.model import FlameVisionModel
from stage2_train_vision.run.checkpoint import (
    Checkpointed,
    TrainState,
    check_checkpoint_cache,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from stage2_train_vision.run.heldout import HeldOut
from stage2_train_vision.run.launch import flat_config, make_accelerator, take_run_lock, tracker_init_kwargs
from stage2_train_vision.run.metrics import MetricsLog
from stage2_train_vision.run.plots import plot_loss_curve
from stage2_train_vision.run.progress import (
    Progress,
    check_batch_finite,
    check_loss_finite,
    print_outputs,
)
from stage2_train_vision.step import StepParts, prepare_step, train_step
from stage2_train_vision.text_tower import (
    CaptionSampler,
    TextTowerConfig,
    attach_text_tower,
    text_side_config,
)

log = logging.getLogger(__name__)

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


@dataclass
class TrainRun:
    """Everything :func:`build_run` set up for one run.

    Attributes:
        cfg: the run's config (architecture fields replaced by ``model.init_from``'s when set).
        model_cfg: ``cfg.model`` with ``out_dim`` = the cache's D.
        reader: the training cache.
        data: this process's loader and the epoch sizes.
        parts: model, optimizer, schedule and loss settings of :func:`stage2_train_vision.step.train_step`.
        state: where training stands (restored from the checkpoint when resuming).
        total_steps: optimizer steps of the whole run (``train.max_steps`` or the epochs' steps).
        batch: images per process per micro-step.
        output_dir: ``train.output_dir``.
        metrics: the run's ``metrics.jsonl`` (:mod:`stage2_train_vision.run.metrics`).
        text_tower: the tower config of a text-tower run, else ``None``.
        progress: the loop's running totals, once it started.
        heldout: the held-out samples of ``train.eval_every`` (main process only), else ``None``.
    """

    cfg: Config
    model_cfg: ModelConfig
    reader: CacheReader
    data: TrainingData
    parts: StepParts
    state: TrainState
    total_steps: int
    batch: int
    output_dir: Path
    metrics: MetricsLog
    text_tower: TextTowerConfig | None = None
    progress: Progress | None = None
    heldout: HeldOut | None = None

    @property
    def checkpointed(self) -> Checkpointed:
        """What a checkpoint of this run saves and restores."""
        p = self.parts
        return Checkpointed(p.accelerator, p.core, p.optimizer, p.scheduler, self.state)


def open_cache(cfg: Config) -> CacheReader:
    """The training cache after the cheap check of every part (:func:`pipeline.cache.verify.check_parts`: sizes
    and presence, no vector read), with ``data.expect`` checked. Raises :class:`pipeline.cache.meta.CacheError`
    naming the first damaged part, :class:`CacheIdentityError` for an unexpected identity."""
    check_parts(cfg.data.cache)
    return CacheReader(cfg.data.cache, expect=cfg.data.expect or None)


def build_run(cfg: Config, accelerator: Accelerator, resume: str | None = None,
              text_tower: TextTowerConfig | None = None) -> TrainRun:
    """Seed, open the cache (:func:`open_cache`), build the data, the model (fresh, ``model.init_from``'s
    weights, or the checkpoint's when resuming ``resume``: a path or ``"latest"``, the newest complete one), the
    optimizer and the schedule; write ``train_config.json``, open ``metrics.jsonl`` and start the trackers.

    Raises:
        ConfigError, CacheError, CacheIdentityError, DataError, CheckpointError: refusals naming the values
            involved (a run of 0 steps is a ConfigError).
        FileNotFoundError: no such checkpoint.
    """
    tc = cfg.train
    set_seed(tc.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    output_dir = Path(tc.output_dir)
    reader = open_cache(cfg)
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
        attach_text_tower(model, text_tower, model_cfg.out_dim)
        captions = CaptionSampler(text_tower, cfg.data.manifest, cfg.data.split)
    if cfg.model.init_from and ckpt is None:  # model.init_from: its weights (a resumed run takes the checkpoint's)
        load_init_weights(model, cfg.model.init_from)
    total_steps = tc.max_steps or sum(data.steps_per_epoch(e) for e in range(tc.epochs)) // tc.grad_accum
    if total_steps < 1:
        raise ConfigError(f"train.epochs = {tc.epochs} gives 0 optimizer steps ({data.steps_per_epoch(0)} "
                          f"micro-batches per epoch, train.grad_accum = {tc.grad_accum}): the run would train nothing")
    parts = prepare_step(cfg, accelerator, model, total_steps, captions)
    state = TrainState()
    run = TrainRun(cfg, model_cfg, reader, data, parts, state, total_steps, batch, output_dir,
                   MetricsLog(output_dir, enabled=False), text_tower)
    if ckpt is not None:
        load_checkpoint(run.checkpointed, ckpt)
        log.info("resumed from %s at epoch %d, batch %d, step %d", ckpt, state.epoch, state.batch, state.step)
    run.metrics = MetricsLog(output_dir, state.step, enabled=accelerator.is_main_process)
    if tc.eval_every and accelerator.is_main_process:
        if text_tower is None:
            run.heldout = HeldOut(cfg.data.manifest, tc.eval_split, reader, ImageConfig.of(cfg), tc.eval_samples)
        else:
            log.warning("train.eval_every: held-out recall is for the FLAME recipe, not a text-tower run; skipped")
    if accelerator.is_main_process:
        atomic_write_bytes(output_dir / "train_config.json",
                           json.dumps(cfg.to_dict(), indent=2, default=list).encode("utf-8"))
    if tc.log_with:
        accelerator.init_trackers(tc.project_name, config=flat_config(cfg.to_dict()), init_kwargs=tracker_init_kwargs(cfg))
    log.info(
        "%s samples (%s), %d processes (%s) x %d images x %d accumulation = batch %d, %d steps, D=%d, precision %s",
        data.n_samples, data.mode, world, accelerator.distributed_type.value, batch, tc.grad_accum, tc.batch_size,
        total_steps, model_cfg.out_dim, accelerator.mixed_precision,
    )
    return run


def end_step(run: TrainRun, progress: Progress) -> None:
    """After an optimizer step: count it, record the mean loss over processes and micro-steps in
    ``state.history`` and ``metrics.jsonl``, update the bar and the trackers, write a checkpoint every
    ``train.save_every`` steps and mark ``train.stop_at_step``. Collective (the loss reduction and the checkpoint).

    Raises:
        NonFiniteError: the loss is not finite (nothing of this step is saved).
        CheckpointError: see :func:`stage2_train_vision.run.checkpoint.save_checkpoint`.
    """
    state, tc, accelerator = run.state, run.cfg.train, run.parts.accelerator
    state.step += 1
    value = accelerator.reduce(progress.accum, "mean").item() / tc.grad_accum
    progress.accum.zero_()
    check_loss_finite(value, state.step, run.output_dir)
    state.history.append([state.step, value])
    state.skipped = dict(progress.skipped)
    now = time.perf_counter()
    step_s = max(now - progress.last, 1e-9)
    rate = (state.images - progress.images_start) / max(now - progress.started, 1e-9)
    lr = progress.lr
    t, b = run.parts.core.temperature().item(), run.parts.core.logit_bias.item()
    record = {"step": state.step, "epoch": round(state.epoch + state.batch / max(run.data.steps_per_epoch(state.epoch), 1), 4),
              "images": state.images, "loss": value, "lr": lr, "logit_scale": t, "logit_bias": b,
              "images_per_s": round(tc.batch_size / step_s, 2), "data_wait_s": round(progress.data_wait, 6),
              "step_s": round(step_s, 6)}
    if run.heldout is not None and state.step % tc.eval_every == 0:
        record.update(run.heldout.recall_at_1(run.parts.core, accelerator))
        log.info("step %d held-out recall@1: %s", state.step, {k: round(v, 4) for k, v in record.items() if "r1" in k})
    run.metrics.write(record)
    progress.last, progress.data_wait = time.perf_counter(), 0.0  # held-out eval not counted in the next step
    progress.bar.update(1)
    progress.bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", t=f"{t:.2f}", img_s=f"{rate:.0f}")
    if tc.log_with and state.step % tc.log_every == 0:
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.step)
    if tc.save_every and state.step % tc.save_every == 0:
        save_checkpoint(run.checkpointed, run.output_dir, tc.keep_checkpoints, run.reader.identity)
    if tc.stop_at_step and state.step >= tc.stop_at_step:
        progress.stopped = True


def finish(run: TrainRun, progress: Progress) -> dict[str, Any]:
    """End the run: the final checkpoint (unless stopped early or just written), the summary, and on the main
    process the export to ``output_dir/model`` and ``loss.png`` (not when stopped early); closes the trackers.

    Returns:
        The run summary (see :func:`train`).

    Raises:
        ExportError: the model has a non-finite weight (never exported).
    """
    state, tc, accelerator = run.state, run.cfg.train, run.parts.accelerator
    progress.bar.close()
    elapsed = time.perf_counter() - progress.started
    stopped = progress.stopped
    if not stopped and (not tc.save_every or state.step % tc.save_every):
        save_checkpoint(run.checkpointed, run.output_dir, tc.keep_checkpoints, run.reader.identity)
    summary = {
        "steps": state.step,
        "total_steps": run.total_steps,
        "epochs": round(state.epoch + state.batch / max(run.data.steps_per_epoch(state.epoch), 1), 3),
        "images": state.images,
        "images_per_s": round((state.images - progress.images_start) / max(elapsed, 1e-9), 2),
        "processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "batch_size": tc.batch_size,
        "loss": run.cfg.loss.kind,
        "first_loss": state.history[0][1] if state.history else None,
        "final_loss": state.history[-1][1] if state.history else None,
        "skipped_before_training": dict(run.data.skipped),
        "skipped_in_batches": dict(progress.skipped),
        "stopped": stopped,
        "seed": tc.seed,
    }
    if not stopped and accelerator.is_main_process:
        text_side = None if run.text_tower is None else text_side_config(run.text_tower, run.model_cfg.out_dim)
        export_model(run.parts.core, run.model_cfg, run.cfg.data, run.reader.identity.to_dict(),
                     run.output_dir / "model", summary, text_side)
        log.info("exported %s; loss %s -> %s", run.output_dir / "model", summary["first_loss"], summary["final_loss"])
        if state.history:
            steps, losses = zip(*state.history)
            plot_loss_curve(steps, losses, run.output_dir / "loss.png",
                            title=f"{run.cfg.model.name} / {run.cfg.loss.kind}")
    for tracker in accelerator.trackers:  # end_training() would also destroy the process group; main() does
        tracker.finish()
    return summary


def train(cfg: Config, resume: str | None = None, text_tower: TextTowerConfig | None = None) -> dict[str, Any]:
    """Train per ``cfg``; resume from a checkpoint (path, or ``"latest"``: the newest complete one) if given.

    ``text_tower``: a :class:`stage2_train_vision.text_tower.TextTowerConfig` to train a text transformer from
    scratch jointly with the ViT instead of using the cached vectors (the CLIP-style baseline of
    ``bench/fidelity.py``); ``None`` (default): the FLAME recipe, texts from the cache only.

    The main process holds ``output_dir/train.lock`` for the whole run. Accelerate's process-wide state is reset
    afterwards while the distributed setup (the process group) is kept, so ``train`` can be called again in the
    same process with another precision or accumulation (tests, ``flame demo``); :func:`main` destroys the
    process group when the script ends.

    Returns:
        The run summary (also written into the export's ``config.json["train"]``): ``steps``,
        ``total_steps``, ``epochs`` (float), ``images``, ``images_per_s``, ``processes``, ``mixed_precision``,
        ``batch_size``, ``loss`` (kind), ``first_loss`` / ``final_loss`` (float or ``None``),
        ``skipped_before_training``, ``skipped_in_batches``, ``stopped`` (``True`` when ``train.stop_at_step``
        ended the run early: no export then) and ``seed``.

    Raises:
        ConfigError, CacheError, CacheIdentityError, DataError: refusals with a message naming the values involved.
        RunLockError: another run holds the output folder.
        NonFiniteError: a non-finite cache vector or loss (nothing exported).
        CheckpointError: no space left for a checkpoint, or a checkpoint that cannot be resumed.
    """
    lock = None
    try:
        accelerator = make_accelerator(cfg)
        lock = take_run_lock(accelerator, cfg.train.output_dir)
        return _train(cfg, accelerator, resume, text_tower)
    finally:
        if lock is not None:
            lock.release()
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _train(cfg: Config, accelerator: Accelerator, resume: str | None,
           text_tower: TextTowerConfig | None = None) -> dict[str, Any]:
    run = build_run(cfg, accelerator, resume, text_tower)
    try:
        _loop(run)
        return finish(run, run.progress)
    finally:
        run.metrics.close()


def _loop(run: TrainRun) -> None:
    """The epochs of :func:`_train`: micro-steps, optimizer steps (:func:`end_step`) until the run's steps are
    done or ``train.stop_at_step``; sets ``run.progress``."""
    data, state, tc, accelerator = run.data, run.state, run.cfg.train, run.parts.accelerator
    rank = accelerator.process_index
    now = time.perf_counter()
    progress = run.progress = Progress(
        bar=tqdm(total=run.total_steps, initial=state.step, disable=not accelerator.is_main_process, desc="train"),
        skipped=Counter(state.skipped), started=now, images_start=state.images,
        accum=torch.zeros((), device=accelerator.device), last=now,
    )
    run.parts.model.train()
    while state.step < run.total_steps:
        epoch = state.epoch
        n_batches = data.steps_per_epoch(epoch)
        if state.batch >= n_batches:  # a resumed position past this config's epoch would never advance
            raise ConfigError(
                f"the checkpoint is at batch {state.batch} of epoch {epoch} but this config gives {n_batches} "
                "batches per epoch; resume with the checkpoint's batch size, processes and data"
            )
        data.set_epoch(epoch, state.batch)
        batches = iter(data.loader)
        while True:
            waited = time.perf_counter()
            b = next(batches, None)
            progress.data_wait += time.perf_counter() - waited
            if b is None:
                break
            if run.text_tower is None:
                check_batch_finite(b, state.step)
            progress.lr = run.parts.optimizer.param_groups[0]["lr"]
            loss, synced = train_step(run.parts, b, sample_seed(tc.seed, epoch, state.batch, rank))
            progress.accum += loss
            progress.skipped.update(b["skipped"])
            state.batch += 1
            state.images += run.batch * accelerator.num_processes
            if state.batch == n_batches:
                state.epoch, state.batch = epoch + 1, 0
            if not synced:
                continue
            end_step(run, progress)
            if progress.stopped or state.step == run.total_steps:
                return
        if state.epoch == epoch:  # every process yields steps_per_epoch batches; anything else would hang
            raise RuntimeError(f"the data loader ended epoch {epoch} after {state.batch} of {n_batches} batches")


def run(args: argparse.Namespace) -> int:
    """Load the config named by ``args`` (:func:`stage2_train_vision.cli.add_arguments`), train, and print
    where the results are (main process: metrics, loss plot, newest checkpoint, tracker logs, exported model);
    returns the exit code (0; refusals are raised for :func:`pipeline.errors.run_command`)."""
    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print_outputs(Path(cfg.train.output_dir), cfg.train.log_with, summary)
    return 0


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
