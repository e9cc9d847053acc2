"""Import a checkpoint released by FLAME's authors as an exported flame model (``model.safetensors`` + ``config.json``).

What an official checkpoint holds (issue 13, from ``MIV-XJTU/FLAME`` ``src/open_clip/model.py``,
``transformer.py`` and ``src/training/main.py``):

* an open_clip ``torch.save`` dict ``{"epoch", "name", "state_dict", "optimizer", ...}`` whose tensor names may
  start with ``module.`` (saved from a DDP wrapper); a plain name -> tensor dict or a ``.safetensors`` file
  (possibly sharded, with a ``*.safetensors.index.json``) is read the same way;
* ``visual.*``: open_clip's ``VisionTransformer`` (``conv1`` without bias, ``class_embedding``,
  ``positional_embedding``, ``ln_pre``, ``transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj,
  ln_2, mlp.c_fc, mlp.c_proj}``; ``ln_post`` and ``proj`` exist but FLAME does not use them);
* ``mm.*``: the projector ``Linear(width, H) -> GELU -> Linear(H, D) -> LayerNorm(D)``, H = max(D, 4096);
* ``logit_scale`` (log of the temperature) and ``logit_bias`` of the sigmoid loss;
* ``text.*``: the whole LLM (~24.5 GB for Mistral-Nemo). Those tensors are never read: a torch file is opened with
  ``torch.load(..., weights_only=True, mmap=True)`` (its tensors stay unread pages of a memory map) and a
  safetensors file reads only the tensors named above.

The image embedding is the transformer's tokens without ``ln_post``, ``mm`` per token, mean over the patch
tokens (class token excluded), L2 normalization: exactly :class:`stage2_train_vision.model.FlameVisionModel`
with ``final_norm=False`` on timm's CLIP-layout ViT (``vit_base_patch16_clip_224``: LayerNorm before the blocks,
LayerNorm eps 1e-5, no patch-embedding bias, GELU; ``--quick-gelu`` for a QuickGELU tower), whose tensors timm's own OpenAI/open_clip converter
(``timm.models.vision_transformer._convert_openai_clip``) produces from ``visual.*``.

The architecture comes from the tensors: width and patch from ``conv1.weight [width, 3, p, p]``, image size from
``positional_embedding [1 + (size/p)^2, width]``, depth from the block count, heads = width / 64 (FLAME's model
configs), H and D from ``mm``. Anything else (other open_clip towers, layer scale, attention pooling, an MLP
ratio other than 4, a checkpoint without ``mm``) is refused with a one-line :class:`CheckpointImportError`.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from flame_pipeline.imports.cache import official_identity, refused_message
from pipeline.cache.store import CacheIdentity
from stage2_train_vision.config import ConfigError, DataConfig, ModelConfig
from stage2_train_vision.export import export_model
from stage2_train_vision.model import FlameVisionModel

log = logging.getLogger(__name__)

TIMM_NAME = "vit_base_patch16_clip_224"  # timm's CLIP-layout ViT; size overrides come from the tensors
TIMM_NAME_QUICK_GELU = "vit_base_patch16_clip_quickgelu_224"  # the same with OpenAI's QuickGELU
HEAD_WIDTH = 64  # heads = width / 64 in FLAME's open_clip model configs
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
_DDP_PREFIX = "module."
_KEEP = ("visual.", "mm.")
_SCALARS = ("logit_scale", "logit_bias")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointImportError(ConfigError):
    """A checkpoint that cannot be imported: unknown or non-FLAME layout, unsafe pickle, unreadable file."""


def _wanted(name: str) -> str | None:
    """``name`` without a DDP ``module.`` prefix if it is an image-side tensor, else ``None``."""
    if name.startswith(_DDP_PREFIX):
        name = name[len(_DDP_PREFIX):]
    return name if name.startswith(_KEEP) or name in _SCALARS else None


def _refused(path: Path, exc: BaseException) -> CheckpointImportError:
    return CheckpointImportError(f"{path}: refused, the pickle holds objects that weights_only loading does not "
                                 f"allow ({refused_message(exc)}); only tensors, numbers and containers are read")


def load_torch_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Image-side tensors of a ``torch.save`` checkpoint (``module.`` stripped) and its ``epoch``/``name``.

    Raises:
        CheckpointImportError: a pickle ``weights_only`` refuses, a file that is not a zip-format
            ``torch.save`` file (it cannot be memory-mapped), or no name -> tensor mapping inside.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise _refused(path, exc) from None
    except RuntimeError as exc:
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointImportError(f"{path}: not a readable torch.save zip file ({why})") from None
    info: dict[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        info = {k: obj[k] for k in ("epoch", "name") if isinstance(obj.get(k), int | str)}
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointImportError(f"{path}: no state_dict (name -> tensor) inside")
    state = {}
    for k, v in obj.items():
        name = _wanted(str(k))
        if name is not None and isinstance(v, torch.Tensor):
            state[name] = v.to(torch.float32).clone()  # copy out of the memory map; text.* stays unread
    return state, info


def load_safetensors(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Image-side tensors of one or more ``.safetensors`` files (``module.`` stripped; nothing else is read)."""
    state = {}
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    name = _wanted(k)
                    if name is not None:
                        state[name] = f.get_tensor(k).to(torch.float32)
        except SafetensorError as e:
            raise CheckpointImportError(f"{path} is not a readable safetensors file ({e})") from None
    return state


def _pick(names: list[str], where: str, file: str | None) -> tuple[str, list[str] | None]:
    """Which of ``names`` (files of a folder or hub repository) to read: ``(kind, files)``.

    ``file`` chooses one; otherwise a ``*.safetensors.index.json``, else the only ``.safetensors``, else the only
    torch file. ``kind`` is ``"index"``, ``"safetensors"`` or ``"torch"``.
    """
    if file is not None:
        if file not in names:
            raise CheckpointImportError(f"{where} has no file {file!r}")
        chosen = [file]
    else:
        chosen = [n for n in names if n.endswith(INDEX_SUFFIX)]
        chosen = chosen or [n for n in names if n.endswith(SAFETENSORS_SUFFIX)]
        chosen = chosen or [n for n in names if n.endswith(TORCH_SUFFIXES)]
        if len(chosen) != 1:
            found = ", ".join(chosen[:8]) or "none"
            raise CheckpointImportError(f"{where}: cannot tell which checkpoint file to import (candidates: {found}); "
                                        "pass --file NAME")
    name = chosen[0]
    kind = ("index" if name.endswith(INDEX_SUFFIX) else "safetensors" if name.endswith(SAFETENSORS_SUFFIX)
            else "torch" if name.endswith(TORCH_SUFFIXES) else None)
    if kind is None:
        raise CheckpointImportError(f"{name}: not a .pt/.pth/.bin/.safetensors checkpoint")
    return kind, chosen


def _read(kind: str, name: str, fetch: Callable[[str], Path]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``name`` (fetched to a local path by ``fetch``); an index pulls only the shards with image tensors."""
    path = fetch(name)
    if kind == "torch":
        return load_torch_checkpoint(path)
    if kind == "safetensors":
        return load_safetensors([path]), {}
    weight_map = json.loads(path.read_text(encoding="utf-8")).get("weight_map", {})
    prefix = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
    shards = sorted({f for k, f in weight_map.items() if _wanted(k) is not None})
    if not shards:
        raise CheckpointImportError(f"{path}: the index names no visual.*/mm.* tensors")
    return load_safetensors([fetch(prefix + s) for s in shards]), {}


def read_checkpoint(src: str | Path, file: str | None = None,
                    revision: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The image-side tensors (float32, ``module.`` stripped) of a FLAME checkpoint and where they came from.

    Args:
        src: a local ``.pt``/``.pth``/``.bin``/``.safetensors``/``*.safetensors.index.json`` file, a folder holding
            one, or a Hugging Face model id (``caj/FLAME-Mistral-Nemo-ViT-B-16``); a hub id downloads only the
            chosen file (and, for a sharded safetensors checkpoint, only the shards holding image tensors).
        file: which file of a folder or repository to read (needed when there are several).
        revision: hub revision (branch, tag or commit).

    Raises:
        CheckpointImportError: see :func:`load_torch_checkpoint`; no or several candidate files; hub failure.
        FileNotFoundError: ``src`` is neither a path nor a hub id.
    """
    path = Path(src)
    if path.is_file():
        kind, _ = _pick([path.name], str(path.parent), path.name)
        state, info = _read(kind, path.name, lambda n: path.parent / n)
        info["file"] = str(path.resolve())
    elif path.is_dir():
        names = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
        kind, chosen = _pick(names, str(path), file)
        state, info = _read(kind, chosen[0], lambda n: path / n)
        info["file"] = str((path / chosen[0]).resolve())
    elif _HUB_ID.match(str(src)) and not str(src).endswith((*TORCH_SUFFIXES, SAFETENSORS_SUFFIX, ".json")):
        state, info = _read_hub(str(src), file, revision)
    else:
        raise FileNotFoundError(f"{src}: no such file or folder, and not a hub model id (owner/name)")
    info["source"] = str(src)
    return state, info


def _read_hub(repo_id: str, file: str | None, revision: str | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Download (to the Hugging Face cache) and read the checkpoint of hub model ``repo_id``."""
    from huggingface_hub import HfApi, hf_hub_download

    def fetch(name: str) -> Path:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision))
        except Exception as exc:  # noqa: BLE001 - network, auth and offline errors become one line
            raise CheckpointImportError(f"cannot download {name} from {repo_id}: {type(exc).__name__}: {exc}") from None

    try:
        names = HfApi().list_repo_files(repo_id, revision=revision)
    except Exception as exc:  # noqa: BLE001
        local = _local_snapshot(repo_id, revision)  # offline: the files downloaded before, if any
        if local is None:
            raise CheckpointImportError(f"cannot list hub repository {repo_id}: {type(exc).__name__}: {exc}") from None
        log.info("hub unreachable (%s); reading the downloaded snapshot %s", type(exc).__name__, local)
        state, info = read_checkpoint(local, file)
        return state, info | {"file": info.get("file"), "revision": revision}
    kind, chosen = _pick(sorted(names), repo_id, file)
    state, info = _read(kind, chosen[0], fetch)
    info.update(file=chosen[0], revision=revision)
    return state, info


def _local_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The folder of ``repo_id``'s files already in the Hugging Face cache, or ``None``."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - nothing downloaded
        return None


def _projector(mm: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """``mm.*`` -> :class:`stage2_train_vision.model.Projector` tensors (``0``, ``2``: Linear, ``3``: LayerNorm).

    The modules are recognized by shape, not by name: two Linear layers (2-D weight + bias) chained
    ``width -> H -> D`` and one LayerNorm (1-D weight + bias of size D).
    """
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in mm.items():
        mod, _, param = k.rpartition(".")
        modules.setdefault(mod, {})[param] = v
    linears = {m: p for m, p in modules.items() if set(p) == {"weight", "bias"} and p["weight"].ndim == 2}
    norms = {m: p for m, p in modules.items() if set(p) == {"weight", "bias"} and p["weight"].ndim == 1}
    first = [p for p in linears.values() if p["weight"].shape[1] == width]
    if len(linears) != 2 or len(norms) != 1 or len(modules) != 3 or len(first) != 1:
        raise CheckpointImportError(
            f"mm.* is not FLAME's projector Linear -> GELU -> Linear -> LayerNorm: modules "
            f"{ {m: {n: tuple(t.shape) for n, t in p.items()} for m, p in modules.items()} }"
        )
    lin1 = first[0]
    lin2 = next(p for p in linears.values() if p is not lin1)
    norm = next(iter(norms.values()))
    hidden, dim = lin1["weight"].shape[0], lin2["weight"].shape[0]
    if lin2["weight"].shape[1] != hidden or norm["weight"].shape[0] != dim:
        raise CheckpointImportError(f"mm.* layers do not chain {width} -> {hidden} -> {dim} -> LayerNorm({dim})")
    return {"0.weight": lin1["weight"], "0.bias": lin1["bias"], "2.weight": lin2["weight"], "2.bias": lin2["bias"],
            "3.weight": norm["weight"], "3.bias": norm["bias"]}


def infer_model_config(state: dict[str, torch.Tensor], quick_gelu: bool = False) -> ModelConfig:
    """The :class:`ModelConfig` of a FLAME checkpoint's image side, from its tensors alone.

    Args:
        state: image-side tensors as returned by :func:`read_checkpoint`.
        quick_gelu: the tower was built with open_clip's QuickGELU (``*-quickgelu`` model configs) instead of
            GELU; an activation leaves no tensor, so this cannot be read from the checkpoint.

    Raises:
        CheckpointImportError: not an open_clip vision tower, no FLAME projector, or a shape this model cannot take.
    """
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    mm = {k[len("mm."):]: v for k, v in state.items() if k.startswith("mm.")}
    if not visual:
        raise CheckpointImportError("no visual.* tensors: not an open_clip/FLAME checkpoint")
    if "conv1.weight" not in visual or "positional_embedding" not in visual:
        raise CheckpointImportError(f"visual.* is not open_clip's VisionTransformer (e.g. {sorted(visual)[:4]})")
    if not mm:
        raise CheckpointImportError("visual.* without FLAME's projector (mm.*): an open_clip model, not a FLAME "
                                    "checkpoint")
    conv = visual["conv1.weight"]
    if conv.ndim != 4 or conv.shape[1] != 3 or conv.shape[2] != conv.shape[3]:
        raise CheckpointImportError(f"visual.conv1.weight {tuple(conv.shape)} is not [width, 3, p, p]")
    width, patch = int(conv.shape[0]), int(conv.shape[2])
    tokens = int(visual["positional_embedding"].shape[0]) - 1
    grid = math.isqrt(max(tokens, 0))
    if grid * grid != tokens or grid == 0:
        raise CheckpointImportError(f"visual.positional_embedding has {tokens + 1} rows: not 1 + a square grid")
    blocks = {int(m.group(1)) for k in visual if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    if not blocks or blocks != set(range(len(blocks))):
        raise CheckpointImportError(f"visual.transformer.resblocks indices {sorted(blocks)[:8]} are not 0..N-1")
    if width % HEAD_WIDTH:
        raise CheckpointImportError(f"width {width} is not a multiple of {HEAD_WIDTH} (heads = width / 64)")
    fc = visual.get("transformer.resblocks.0.mlp.c_fc.weight")
    if fc is None or fc.shape[0] != 4 * width:
        raise CheckpointImportError(f"MLP hidden size {None if fc is None else fc.shape[0]} is not 4 x width {width}")
    proj = _projector(mm, width)
    return ModelConfig(
        name=TIMM_NAME_QUICK_GELU if quick_gelu else TIMM_NAME, img_size=grid * patch, patch_size=patch, depth=len(blocks), width=width,
        num_heads=width // HEAD_WIDTH, final_norm=False, proj_hidden=int(proj["0.weight"].shape[0]),
        out_dim=int(proj["2.weight"].shape[0]),
        init_logit_scale=float(state["logit_scale"].exp()) if "logit_scale" in state else ModelConfig.init_logit_scale,
        init_logit_bias=float(state["logit_bias"]) if "logit_bias" in state else ModelConfig.init_logit_bias,
    )


def build_model(state: dict[str, torch.Tensor], cfg: ModelConfig | None = None) -> FlameVisionModel:
    """A :class:`FlameVisionModel` holding the checkpoint's image side (timm layout via timm's converter).

    ``ln_post`` and ``proj`` (unused by FLAME) are dropped; every other tensor must land in the model.

    Raises:
        CheckpointImportError: unrecognized or missing tensors, or shapes that do not fit.
    """
    from timm.models.vision_transformer import _convert_openai_clip

    cfg = cfg or infer_model_config(state)
    model = FlameVisionModel(cfg)
    visual = {k: v for k, v in state.items() if k.startswith("visual.")}
    converted = _convert_openai_clip(visual, model.backbone, prefix="visual.")
    unused = {"norm.weight", "norm.bias", "head.weight", "head.bias"}  # ln_post and proj
    converted = {k: v for k, v in converted.items() if k not in unused}
    expected = set(model.backbone.state_dict())
    extra, missing = sorted(set(converted) - expected), sorted(expected - set(converted))
    if extra or missing:
        raise CheckpointImportError(f"visual.* does not fit FLAME's ViT: unrecognized {extra[:5]} missing {missing[:5]}")
    try:
        model.backbone.load_state_dict(converted, strict=True)
        model.projector.load_state_dict(_projector({k[3:]: v for k, v in state.items() if k.startswith("mm.")},
                                                   cfg.width or model.width), strict=True)
    except RuntimeError as exc:
        raise CheckpointImportError(f"tensor shapes do not fit: {str(exc).splitlines()[-1].strip()[:300]}") from None
    with torch.no_grad():
        for name in _SCALARS:
            if name in state:
                getattr(model, name).copy_(state[name].reshape(()))
            else:
                log.warning("checkpoint has no %s; keeping the default %s", name, getattr(model, name).item())
    return model.eval()


def import_checkpoint(src: str | Path, out: str | Path, identity: CacheIdentity | None = None, file: str | None = None,
                      revision: str | None = None, quick_gelu: bool = False) -> dict[str, Any]:
    """Write FLAME checkpoint ``src`` as an exported model directory ``out`` (``flame eval --model out``).

    Args:
        src: see :func:`read_checkpoint`.
        out: output directory (``model.safetensors`` float32 + ``config.json``).
        identity: the text side the weights expect (default: the official one,
            :func:`flame_pipeline.imports.cache.official_identity`); recorded as ``cache_identity``.
        file, revision: see :func:`read_checkpoint`.
        quick_gelu: see :func:`infer_model_config` (default GELU, open_clip's ``ViT-B-16`` config).

    Returns:
        the written ``config.json`` content: ``model`` (the inferred architecture), ``image`` (224 px CLIP
        mean/std, bicubic, as the official preprocessing), ``cache_identity`` and ``train.imported``
        (source, file, epoch, name).

    Raises:
        CheckpointImportError: see :func:`read_checkpoint`, :func:`infer_model_config`, :func:`build_model`.
        ConfigError: ``identity.dim`` differs from the projector's D.
    """
    identity = identity or official_identity()
    state, info = read_checkpoint(src, file, revision)
    cfg = infer_model_config(state, quick_gelu)
    if cfg.out_dim != identity.dim:
        raise ConfigError(f"the projector outputs D={cfg.out_dim} but identity {identity.llm} has D={identity.dim}; "
                          "pass the --identity the checkpoint was trained against")
    model = build_model(state, cfg)
    export_model(model, cfg, DataConfig(), identity.to_dict(), out, {"imported": info})
    log.info("imported %s: ViT width %d depth %d patch %d at %d px, projector %d -> %d -> %d, into %s", src,
             cfg.width, cfg.depth, cfg.patch_size, cfg.img_size, cfg.width, cfg.proj_hidden, cfg.out_dim, out)
    return json.loads((Path(out) / "config.json").read_text(encoding="utf-8"))
