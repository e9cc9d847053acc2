"""Image preprocessing (SPEC §5): RandomResizedCrop(scale 0.9-1.0), bicubic, CLIP mean/std.

Both transforms take a PIL image or a ``uint8 [3, H, W]`` tensor and return ``float32 [3, S, S]``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from stage2_train_vision.config import Config, ConfigError, ImageConfig

_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of RandomResizedCrop (torchvision's default)


def _interpolation(name: str) -> InterpolationMode:
    if name not in _INTERPOLATION:
        raise ConfigError(f"unknown interpolation {name!r} (known: {', '.join(_INTERPOLATION)})")
    return _INTERPOLATION[name]


class TrainTransform:
    """RandomResizedCrop to ``size`` (area ``crop_scale``, aspect 3/4-4/3), then ``(x / 255 - mean) / std``.

    :meth:`crop_params` is torchvision's ``RandomResizedCrop.get_params`` (same draws in the same order, same
    fallback; ``tests/test_fidelity.py`` checks the boxes are equal given the same draws) drawing from a numpy
    ``Generator`` passed per call. Kept instead of calling ``get_params`` because ``get_params`` draws only
    from torch's global RNG: seeding and restoring it per sample made the crop ~5x slower (1.5 vs 0.3 ms per
    sample on the loaded 2-core EPYC, about a third of the whole transform)."""

    def __init__(self, cfg: ImageConfig):
        self.cfg = cfg
        self.interpolation = _interpolation(cfg.interpolation)
        std = torch.tensor(cfg.std).view(3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = torch.tensor(cfg.mean).view(3, 1, 1) / std

    def crop_params(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """``(top, left, h, w)``: up to 10 draws of area and log-aspect, else the largest central crop in range."""
        area = height * width
        lo, hi = math.log(RATIO[0]), math.log(RATIO[1])
        for _ in range(10):
            target = area * rng.uniform(*self.cfg.crop_scale)
            ratio = math.exp(rng.uniform(lo, hi))
            w = round(math.sqrt(target * ratio))
            h = round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        in_ratio = width / height
        if in_ratio < RATIO[0]:
            w, h = width, round(width / RATIO[0])
        elif in_ratio > RATIO[1]:
            h, w = height, round(height * RATIO[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Image.Image | torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Crop, resize and normalise ``image`` (PIL or ``uint8 [3, H, W]``) -> ``float32 [3, size, size]``."""
        pixels = TF.pil_to_tensor(image) if isinstance(image, Image.Image) else image
        rng = rng if rng is not None else np.random.default_rng()
        top, left, h, w = self.crop_params(pixels.shape[-2], pixels.shape[-1], rng)
        size = [self.cfg.size, self.cfg.size]
        out = TF.resized_crop(pixels, top, left, h, w, size, self.interpolation, antialias=True)
        return out.float().mul_(self.scale).sub_(self.shift)


def train_transform(cfg: ImageConfig | Config | dict[str, Any]) -> TrainTransform:
    """The training transform of ``cfg`` (see :class:`TrainTransform`); call it as ``t(image, rng)``."""
    return TrainTransform(ImageConfig.of(cfg))


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
