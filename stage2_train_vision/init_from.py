"""``model.init_from=SRC``: start stage 2 from an exported or imported model instead of random weights.

``SRC`` is a model folder or a hub id ``user/repo[@revision]`` (:func:`pipeline.hub.resolve_model_dir`). The folder is what :func:`stage2_train_vision.export.export_model` writes (a finished ``flame train`` run's
``model/``) or what ``flame import checkpoint`` writes from FLAME's released weights. The architecture (timm name,
image size, patch, depth, width, heads, final norm, projector H and D) is taken from ``DIR/config.json``, whatever
the run's ``model.*`` keys say; the weights (ViT, projector, ``logit_scale``, ``logit_bias``) from
``DIR/model.safetensors``. A resumed run (``--resume``) takes its weights from its checkpoint instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from pipeline.cache.store import IDENTITY_KEYS, CacheIdentity, CacheIdentityError
from pipeline.hub import resolve_model_dir
from stage2_train_vision.config import Config, ModelConfig
from stage2_train_vision.export import CONFIG, WEIGHTS
from stage2_train_vision.model import FlameVisionModel

log = logging.getLogger(__name__)

# ModelConfig fields that describe the network's shape: they come from init_from's config.json.
ARCHITECTURE = ("name", "img_size", "patch_size", "depth", "width", "num_heads", "final_norm", "proj_hidden", "out_dim")


def read_init_config(init_from: str | Path) -> dict[str, Any]:
    """``config.json`` of an exported model folder or hub repository.

    Raises:
        ModelSourceError: not a model folder, or a hub id that cannot be fetched.
    """
    d = resolve_model_dir(init_from, what="model.init_from")
    return json.loads((d / CONFIG).read_text(encoding="utf-8"))


def apply_init_from(cfg: Config, identity: CacheIdentity) -> Config:
    """``cfg`` with the architecture fields of ``cfg.model`` replaced by those of ``cfg.model.init_from``.

    Run settings (``grad_checkpointing``, ``max_logit_scale``...) stay the run's. Differences between the model's
    recorded text side and the training cache are logged (fine-tuning against another text side is allowed);
    D must match.

    Args:
        cfg: the run's config, ``cfg.model.init_from`` set.
        identity: the identity of the training cache.

    Raises:
        CacheIdentityError: the model projects to another D than the cache's.
        FileNotFoundError: see :func:`read_init_config`.
    """
    doc = read_init_config(cfg.model.init_from)
    saved = doc.get("model", {})
    default = ModelConfig()
    for name in ARCHITECTURE:
        mine = getattr(cfg.model, name)
        if name in saved and mine != saved[name] and mine != getattr(default, name) and name != "out_dim":
            log.warning("model.%s=%r is ignored: model.init_from=%s sets %r", name, mine, cfg.model.init_from,
                        saved[name])
    if saved.get("out_dim") != identity.dim:
        raise CacheIdentityError(f"model.init_from={cfg.model.init_from} projects to D={saved.get('out_dim')} but "
                                 f"the cache's D is {identity.dim}: use a cache of the text side it was trained with")
    theirs = doc.get("cache_identity") or {}
    try:  # the essential fields the model recorded (D was checked above), compared as a reader compares them
        identity.check({k: theirs[k] for k in IDENTITY_KEYS if k in theirs and k != "dim"})
    except CacheIdentityError as exc:
        log.warning("model.init_from was trained against another text side than this cache (%s)", exc)
    image = doc.get("image", {})
    for name in ("mean", "std", "interpolation"):
        if name in image and _plain(image[name]) != _plain(getattr(cfg.data, name)):
            log.warning("model.init_from used image %s %r, this run data.%s %r", name, image[name], name,
                        getattr(cfg.data, name))
    model = dataclasses.replace(cfg.model, **{k: saved[k] for k in ARCHITECTURE if k in saved})
    return dataclasses.replace(cfg, model=model)


def load_init_weights(model: FlameVisionModel, init_from: str | Path) -> None:
    """Load ``init_from``'s weights into ``model`` (built from :func:`apply_init_from`'s config; strict).

    Raises:
        RuntimeError: the weights do not fit the model.
    """
    model.load_state_dict(load_file(resolve_model_dir(init_from, what="model.init_from") / WEIGHTS), strict=True)
    log.info("initialized the model from %s", init_from)


def _plain(v: Any) -> Any:
    return [float(x) for x in v] if isinstance(v, list | tuple) else v
