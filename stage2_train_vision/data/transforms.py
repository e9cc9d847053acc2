"""Image preprocessing (SPEC §5): RandomResizedCrop(scale 0.9-1.0), bicubic, CLIP mean/std.

Both transforms take a PIL image or a ``uint8 [3, H, W]`` tensor and return ``float32 [3, S, S]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as TF

from stage2_train_vision.config import Config, ImageConfig

_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of RandomResizedCrop (torchvision's default)


def _interpolation(name: str) -> InterpolationMode:
    if name not in _INTERPOLATION:
        raise ValueError(f"unknown interpolation {name!r} (known: {', '.join(_INTERPOLATION)})")
    return _INTERPOLATION[name]


class TrainTransform:
    """RandomResizedCrop to ``size`` (area ``crop_scale``, aspect 3/4-4/3), then ``(x / 255 - mean) / std``.

    The crop box is torchvision's own :meth:`torchvision.transforms.RandomResizedCrop.get_params` (same sampling
    rule and fallback), run on a torch RNG seeded from the numpy ``Generator`` passed per call inside
    :func:`torch.random.fork_rng`, so the data pipeline seeds each sample without touching torch's global RNG
    state (it is restored on exit)."""

    def __init__(self, cfg: ImageConfig):
        self.cfg = cfg
        self.interpolation = _interpolation(cfg.interpolation)
        std = torch.tensor(cfg.std).view(3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = torch.tensor(cfg.mean).view(3, 1, 1) / std

    def crop_params(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` from ``RandomResizedCrop.get_params`` seeded by one 63-bit draw of ``rng``:
        up to 10 draws of area and log-aspect, else the largest central crop in the aspect range."""
        seed = int(rng.integers(0, 2**63 - 1))
        shape_only = torch.empty(1, 1, 1).expand(1, height, width)  # get_params reads only the size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            top, left, h, w = RandomResizedCrop.get_params(shape_only, list(self.cfg.crop_scale), list(RATIO))
        return int(top), int(left), int(h), int(w)

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
