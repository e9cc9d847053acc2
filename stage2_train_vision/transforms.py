"""Image preprocessing (SPEC §5): RandomResizedCrop(scale 0.9-1.0), bicubic, CLIP mean/std.

Both transforms take a PIL image or a ``uint8 [3, H, W]`` tensor and return ``float32 [3, S, S]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2

from stage2_train_vision.config import Config, ImageConfig

_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


def _interpolation(name: str) -> InterpolationMode:
    if name not in _INTERPOLATION:
        raise ValueError(f"unknown interpolation {name!r} (known: {', '.join(_INTERPOLATION)})")
    return _INTERPOLATION[name]


def train_transform(cfg: ImageConfig | Config | dict[str, Any]) -> v2.Compose:
    """Random resized crop to ``size`` (area ``crop_scale``), to float in ``[0, 1]``, normalise.

    Randomness comes from torch's global RNG; the data pipeline seeds it per sample.
    """
    c = ImageConfig.of(cfg)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(c.size, scale=c.crop_scale, interpolation=_interpolation(c.interpolation), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(c.mean, c.std),
        ]
    )


def eval_transform(cfg: ImageConfig | Config | dict[str, Any]) -> v2.Compose:
    """Resize the shorter side to ``size``, center crop ``size x size``, to float in ``[0, 1]``, normalise.

    ``cfg`` may be the exported ``config.json["image"]`` dict (what eval uses).
    """
    c = ImageConfig.of(cfg)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(c.size, interpolation=_interpolation(c.interpolation), antialias=True),
            v2.CenterCrop(c.size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(c.mean, c.std),
        ]
    )
