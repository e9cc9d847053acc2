"""Typed stage-2 configuration (SPEC §5), loaded from TOML with ``section.key=value`` overrides.

A config file has the sections ``[model]``, ``[data]``, ``[loss]``, ``[optim]`` and ``[train]``, each mapping
onto one dataclass below. Unknown sections or keys are errors, so a typo never silently falls back to a
default. The projector output D is normally absent: it comes from the cache identity (``model.out_dim`` may
be set to make a run refuse a cache of another D).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from pipeline.cache.meta import CacheIdentity
from pipeline.errors import FlameError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ConfigError(FlameError, ValueError):
    """A config file or override names an unknown key, has a value of the wrong type, or is inconsistent."""


@dataclass
class ModelConfig:
    """The vision encoder: a timm ViT, all output tokens, a per-token MLP projector into D.

    Attributes:
        name: timm model name, e.g. ``"vit_base_patch16_224"`` (created without pretrained weights).
        img_size: input side in pixels (square).
        patch_size / depth / width / num_heads: overrides of the timm defaults (``None`` keeps them).
        final_norm: keep the backbone's final norm; ``False`` (default) = the official behaviour.
        proj_hidden: projector hidden size H; ``None`` = ``max(D, 4096)``.
        out_dim: projector output D; ``None`` = take it from the cache identity (the normal case).
        grad_checkpointing: recompute backbone activations in backward to save memory.
        init_logit_scale: initial temperature t (the parameter holds ``log t``).
        init_logit_bias: initial sigmoid bias b.
        max_logit_scale: t is clamped to at most this.
        init_from: an exported or imported model directory to start from (``flame import checkpoint``); its
            ``config.json`` sets the architecture fields above and its weights replace the random init
            (:mod:`stage2_train_vision.init_from`). ``""`` = random init.
    """

    name: str = "vit_tiny_patch16_224"
    img_size: int = 224
    patch_size: int | None = None
    depth: int | None = None
    width: int | None = None
    num_heads: int | None = None
    final_norm: bool = False
    proj_hidden: int | None = None
    out_dim: int | None = None
    grad_checkpointing: bool = False
    init_logit_scale: float = 10.0
    init_logit_bias: float = -10.0
    max_logit_scale: float = 100.0
    init_from: str = ""


@dataclass
class DataConfig:
    """Where pairs come from and how images are augmented.

    Attributes:
        manifest: manifest directory (SPEC §4).
        cache: cache directory (SPEC §3) built from that manifest.
        split: manifest split to train on.
        expect: cache identity fields the run requires (e.g. ``{layer = 17, llm = "..."}``).
        positives: P, facets sampled per image each time it is loaded.
        mode: ``"memory"`` (decode everything once, hold it in RAM), ``"stream"`` (read manifest parts in turn
            through a shuffle buffer) or ``"auto"`` (memory up to ``memory_max_samples``).
        memory_max_samples: the ``"auto"`` threshold.
        shuffle_buffer: rows held by the streaming shuffle buffer.
        num_workers: DataLoader worker processes.
        crop_scale: RandomResizedCrop area range.
        interpolation: ``"bicubic"`` | ``"bilinear"``.
        mean / std: normalisation (CLIP by default).
    """

    manifest: str = ""
    cache: str = ""
    split: str = "train"
    expect: dict[str, Any] = field(default_factory=dict)
    positives: int = 6
    mode: str = "auto"
    memory_max_samples: int = 200_000
    shuffle_buffer: int = 2048
    num_workers: int = 0
    crop_scale: tuple[float, float] = (0.9, 1.0)
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


@dataclass
class LossConfig:
    """``kind``: ``"sigmoid"`` (multi-positive sigmoid, the FLAME loss) or ``"infonce"`` (multi-positive)."""

    kind: str = "sigmoid"


@dataclass
class OptimConfig:
    """AdamW + cosine schedule with linear warm-up (decay skipped on biases, norms, 1-D params, t and b)."""

    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.5
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    """The run.

    Attributes:
        output_dir: checkpoints, ``metrics.jsonl``, plots, tracker logs and the exported model go here; one run at
            a time (``train.lock``, :mod:`stage2_train_vision.run.run_lock`).
        epochs: passes over the data (ignored when ``max_steps`` is set).
        max_steps: total optimizer steps; 0 = ``epochs`` full epochs. When set, training runs as many epochs as
            it takes, stops after this step, and the LR schedule spans exactly these steps (a fixed time budget
            whatever the dataset size, e.g. the CPU demo). ``max_steps = 0`` with ``epochs = 0`` is refused.
        batch_size: global batch (all processes, all accumulation micro-steps).
        grad_accum: micro-steps per optimizer step.
        mixed_precision: ``"launcher"`` (default: whatever ``accelerate launch`` was told by its flags or config
            file, i.e. ``ACCELERATE_MIXED_PRECISION``; ``"no"`` without a launcher), ``"auto"`` (the launcher's
            when one sets it, else ``"bf16"`` where bf16 is native and ``"no"`` elsewhere, e.g. an AVX2-only CPU:
            :func:`pipeline.machine.fast_bf16`) or ``"no"`` | ``"bf16"`` | ``"fp16"``. An explicit value that
            contradicts the launcher's is refused, naming both.
        seed: seeds model init, shuffling, augmentation and facet draws.
        save_every: checkpoint every this many optimizer steps (0 = only at the end).
        keep_checkpoints: how many recent checkpoints to keep (0 = all).
        log_every: tracker logging interval in steps (``metrics.jsonl`` gets every step).
        log_with: Accelerate trackers, e.g. ``["tensorboard"]`` (``pip install 'flame-pipeline[tensorboard]'``).
        project_name: the trackers' project (``init_trackers(project_name=...)``).
        run_name: the run's name in the trackers; ``""`` = the output folder's name.
        tracker_init: per-tracker init arguments, e.g. ``{wandb = {entity = "me", tags = ["cc3m"]}}``
            (Accelerate's ``init_kwargs``).
        eval_every: every this many steps, held-out recall@1 (:mod:`stage2_train_vision.run.heldout`) into
            ``metrics.jsonl`` and the trackers; 0 = off.
        eval_split: the held-out manifest split for ``eval_every`` (its keys must be in the cache).
        eval_samples: how many held-out samples (the first usable ones of the split).
        stop_at_step: stop after this step as if killed (the schedule still spans all epochs); 0 = off.
        threads: torch intra-op threads (0 = torch default).
    """

    output_dir: str = "runs/stage2"
    epochs: int = 1
    max_steps: int = 0
    batch_size: int = 256
    grad_accum: int = 1
    mixed_precision: str = "launcher"
    seed: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    log_with: list[str] = field(default_factory=list)
    project_name: str = "flame-stage2"
    run_name: str = ""
    tracker_init: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 0
    eval_split: str = ""
    eval_samples: int = 512
    stop_at_step: int = 0
    threads: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check/convert a TOML value against a dataclass field type (ints are accepted for floats)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin is list:
        if isinstance(value, str):
            value = [value] if value else []
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got {value!r}")
    if hint in (bool, int, str) and isinstance(value, hint):
        return value
    raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _apply(obj: Any, values: dict[str, Any], section: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown key {section}.{key} (known: {', '.join(sorted(names))})")
        setattr(obj, key, _coerce(value, hints[key], f"{section}.{key}"))


def _parse_override(text: str) -> tuple[str, str, Any]:
    """``"optim.lr=1e-3"`` -> ``("optim", "lr", 0.001)``; the value is TOML, else a bare string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    path, raw = text.split("=", 1)
    if path.count(".") != 1:
        raise ConfigError(f"override {text!r}: the key must be section.key, e.g. optim.lr")
    section, key = path.strip().split(".")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a :class:`Config` from a TOML file (optional) and ``section.key=value`` overrides, in that order.

    Raises:
        ConfigError: unknown section or key, a value of the wrong type, a malformed override, or any value
            :func:`config_problems` refuses (all of them in one line).
        FileNotFoundError: ``path`` does not exist.
    """
    cfg = Config()
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    if path is not None:
        with open(path, "rb") as f:
            try:
                raw = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{path}: not valid TOML ({e})") from None
        for section, values in raw.items():
            if section not in sections or not isinstance(values, dict):
                raise ConfigError(f"{path}: unknown section [{section}] (known: {', '.join(sections)})")
            _apply(sections[section], values, section)
    for text in overrides or []:
        section, key, value = _parse_override(text)
        if section not in sections:
            raise ConfigError(f"override {text!r}: unknown section {section!r} (known: {', '.join(sections)})")
        _apply(sections[section], {key: value}, section)
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


LOSS_KINDS = ("sigmoid", "infonce")
MIXED_PRECISION = ("launcher", "auto", "no", "bf16", "fp16")
DATA_MODES = ("auto", "memory", "stream")
INTERPOLATIONS = ("bicubic", "bilinear")


def _ranges(cfg: Config) -> list[tuple[str, Any, bool, str]]:
    """``(key, value, ok, what is allowed)`` of every numeric setting."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    finite = math.isfinite
    optional_pos = [(f"model.{k}", getattr(m, k)) for k in ("patch_size", "depth", "width", "num_heads",
                                                           "proj_hidden", "out_dim")]
    return [
        ("model.img_size", m.img_size, m.img_size >= 1, "at least 1"),
        *[(k, v, v is None or v >= 1, "at least 1 (or unset)") for k, v in optional_pos],
        ("model.init_logit_scale", m.init_logit_scale, finite(m.init_logit_scale) and m.init_logit_scale > 0,
         "a number > 0"),
        ("model.max_logit_scale", m.max_logit_scale,
         finite(m.max_logit_scale) and m.max_logit_scale >= m.init_logit_scale, "at least model.init_logit_scale"),
        ("model.init_logit_bias", m.init_logit_bias, finite(m.init_logit_bias), "a finite number"),
        ("data.positives", d.positives, d.positives >= 1, "at least 1"),
        ("data.memory_max_samples", d.memory_max_samples, d.memory_max_samples >= 0, "at least 0"),
        ("data.shuffle_buffer", d.shuffle_buffer, d.shuffle_buffer >= 1, "at least 1"),
        ("data.num_workers", d.num_workers, d.num_workers >= 0, "at least 0"),
        ("data.crop_scale", list(d.crop_scale), 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "0 < min <= max <= 1"),
        ("data.std", list(d.std), all(finite(x) and x > 0 for x in d.std), "numbers > 0"),
        ("optim.lr", o.lr, finite(o.lr) and o.lr >= 0, "a number >= 0"),
        ("optim.betas", list(o.betas), all(0 <= b < 1 for b in o.betas), "two numbers in [0, 1)"),
        ("optim.eps", o.eps, finite(o.eps) and o.eps > 0, "a number > 0"),
        ("optim.weight_decay", o.weight_decay, finite(o.weight_decay) and o.weight_decay >= 0, "a number >= 0"),
        ("optim.warmup_steps", o.warmup_steps, o.warmup_steps >= 0, "at least 0"),
        ("optim.min_lr_ratio", o.min_lr_ratio, 0 <= o.min_lr_ratio <= 1, "in [0, 1]"),
        ("optim.grad_clip", o.grad_clip, finite(o.grad_clip) and o.grad_clip >= 0, "a number >= 0 (0 = off)"),
        ("train.epochs", t.epochs, t.epochs >= 0, "at least 0"),
        ("train.max_steps", t.max_steps, t.max_steps >= 0, "at least 0 (0 = train.epochs)"),
        ("train.batch_size", t.batch_size, t.batch_size >= 1, "at least 1"),
        ("train.grad_accum", t.grad_accum, t.grad_accum >= 1, "at least 1"),
        ("train.seed", t.seed, 0 <= t.seed < 2**32, "in [0, 2^32)"),
        ("train.save_every", t.save_every, t.save_every >= 0, "at least 0 (0 = only at the end)"),
        ("train.keep_checkpoints", t.keep_checkpoints, t.keep_checkpoints >= 0, "at least 0 (0 = all)"),
        ("train.log_every", t.log_every, t.log_every >= 1, "at least 1"),
        ("train.stop_at_step", t.stop_at_step, t.stop_at_step >= 0, "at least 0 (0 = off)"),
        ("train.eval_every", t.eval_every, t.eval_every >= 0, "at least 0 (0 = off)"),
        ("train.eval_samples", t.eval_samples, t.eval_samples >= 2, "at least 2"),
        ("train.threads", t.threads, t.threads >= 0, "at least 0 (0 = torch's default)"),
    ]


def _choices(cfg: Config) -> list[tuple[str, Any, tuple[str, ...]]]:
    return [("loss.kind", cfg.loss.kind, LOSS_KINDS), ("train.mixed_precision", cfg.train.mixed_precision,
            MIXED_PRECISION), ("data.mode", cfg.data.mode, DATA_MODES),
            ("data.interpolation", cfg.data.interpolation, INTERPOLATIONS)]


def _tracker_problems(t: TrainConfig) -> list[str]:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    known, available = set(LOGGER_TYPE_TO_CLASS), {str(x) for x in get_available_trackers()}
    problems = []
    for name in t.log_with:
        if name not in known and name != "all":
            problems.append(f"train.log_with: unknown tracker {name!r} (Accelerate knows: {', '.join(sorted(known))})")
        elif name != "all" and name not in available:
            extra = "pip install 'flame-pipeline[tensorboard]'" if name == "tensorboard" else f"pip install {name}"
            problems.append(f"train.log_with names {name!r} but it is not installed: {extra}")
    unused = sorted(set(t.tracker_init) - set(t.log_with))
    if unused and "all" not in t.log_with:
        problems.append(f"train.tracker_init has arguments for {', '.join(unused)}, which train.log_with does not name")
    return problems


def config_problems(cfg: Config) -> list[str]:
    """Every value of ``cfg`` that cannot work, one message each naming the key, the value and what is allowed:
    numeric ranges, choices (``loss.kind``, ``train.mixed_precision``, ...), ``model.name`` known to timm,
    ``data.expect`` keys that are cache identity fields, trackers Accelerate knows and that are installed, and a
    run of 0 steps (``train.max_steps = 0`` and ``train.epochs = 0``). Empty when the config is valid."""
    import timm  # seconds to import: only when a config is checked, never for `flame --help`

    problems = [f"{key} = {value!r}: must be {allowed}" for key, value, ok, allowed in _ranges(cfg) if not ok]
    problems += [f"{key} = {value!r}: must be one of {', '.join(allowed)}"
                 for key, value, allowed in _choices(cfg) if value not in allowed]
    m = cfg.model
    if not m.init_from and not timm.is_model(m.name):
        close = timm.list_models(f"{m.name.split('_')[0]}_*")[:3] or timm.list_models("vit_*")[:3]
        problems.append(f"model.name = {m.name!r} is not a timm model (e.g. {', '.join(close)}; "
                        "timm.list_models() lists them)")
    if m.patch_size and m.img_size % m.patch_size:
        problems.append(f"model.img_size = {m.img_size} is not a multiple of model.patch_size = {m.patch_size}")
    if m.width and m.num_heads and m.width % m.num_heads:
        problems.append(f"model.width = {m.width} is not a multiple of model.num_heads = {m.num_heads}")
    fields = [f.name for f in dataclasses.fields(CacheIdentity)]
    problems += [f"data.expect: {k!r} is not a cache identity field (known: {', '.join(fields)})"
                 for k in cfg.data.expect if k not in fields]
    t = cfg.train
    if t.max_steps == 0 and t.epochs == 0:
        problems.append("train.max_steps = 0 and train.epochs = 0: the run would train 0 steps")
    if t.eval_every and t.eval_split in ("", cfg.data.split):
        problems.append(f"train.eval_split = {t.eval_split!r}: train.eval_every needs a held-out manifest split "
                        f"other than data.split = {cfg.data.split!r} (e.g. test)")
    if not t.output_dir:
        problems.append("train.output_dir is empty: name the run's folder")
    return problems + _tracker_problems(t)


@dataclass(frozen=True)
class ImageConfig:
    """Image preprocessing, as exported in ``config.json["image"]`` for eval.

    Attributes:
        size: square side fed to the model (= ``ModelConfig.img_size``).
        mean / std: per-channel normalisation of ``[0, 1]`` pixels.
        interpolation: ``"bicubic"`` | ``"bilinear"``.
        crop_scale: RandomResizedCrop area range (training only).
    """

    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    interpolation: str = "bicubic"
    crop_scale: tuple[float, float] = (0.9, 1.0)

    @classmethod
    def of(cls, cfg: ImageConfig | Config | dict[str, Any]) -> ImageConfig:
        """Accept an :class:`ImageConfig`, a whole :class:`Config`, or the exported ``config.json["image"]`` dict."""
        if isinstance(cfg, ImageConfig):
            return cfg
        if isinstance(cfg, Config):
            d = cfg.data
            return cls(cfg.model.img_size, tuple(d.mean), tuple(d.std), d.interpolation, tuple(d.crop_scale))
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in names}
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
