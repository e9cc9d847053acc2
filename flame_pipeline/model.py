"""A trained FLAME model as a Python object: load it, embed images and texts, classify, compare (SPEC §8).

:func:`load` takes the same sources as ``flame eval --model`` and ``model.init_from`` (a model folder or a hub id,
:func:`flame_pipeline.sources.resolve_model`) plus an official FLAME checkpoint file, and returns a
:class:`FlameModel`:

* the image side is the exported stage-2 encoder (:func:`stage2_train_vision.export.load_exported`) behind the
  eval transform (:func:`stage2_train_vision.data.transforms.eval_transform`), the same code ``flame eval`` runs;
* the text side is the frozen LLM with exactly the identity the model was trained against (weights fingerprint,
  layer, readout, prompt set, ``<s>`` marker, position mode), loaded on the first :meth:`FlameModel.encode_text`
  call through stage 1's :class:`stage1_embed_text.api.TextEmbedder` (stage 1's packing and token-budget
  batching). A model with its own text tower (the from-scratch baseline) uses that tower instead.

Every vector is ``torch.float32`` on the CPU with unit L2 norm, shape ``[n, D]`` (D = the LLM's hidden size).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from eval.embedding import check_identity, embedder_identity, load_model_text_encoder
from eval.metrics import class_prototypes
from eval.tasks import fill_template
from flame_pipeline.sources import resolve_model
from manifests.images import UndecodableImageError, decode_image
from pipeline.errors import FlameError
from stage1_embed_text.api import TextEmbedder
from stage1_embed_text.config import check_text_mode
from stage2_train_vision.data.transforms import eval_transform
from stage2_train_vision.export import load_exported

ImageInput = str | Path | Image.Image
#: Images embedded per forward pass unless told otherwise.
IMAGE_BATCH = 64


class InputError(FlameError, ValueError):
    """An API call with unusable input: no texts, a blank text, an image that does not open, a bad shape."""


class FlameModel:
    """A loaded FLAME model (use :func:`load`).

    Attributes:
        vision: the exported :class:`stage2_train_vision.model.FlameVisionModel`, eval mode, on ``device``.
        config: the folder's parsed ``config.json``.
        folder: the local model folder.
        preprocess: PIL image -> ``float32 [3, S, S]`` (resize, center crop, CLIP mean/std; the eval transform).
        device: where the image encoder (and, once loaded, the LLM) runs.
        dtype: ``None`` (float32 images; the LLM in the identity's compute dtype) or the dtype both run in.
    """

    def __init__(self, vision: torch.nn.Module, config: dict[str, Any], folder: Path, device: torch.device,
                 dtype: torch.dtype | None = None):
        self.vision, self.config, self.folder = vision, config, folder
        self.device, self.dtype = device, dtype
        self.preprocess: Callable[[Image.Image], torch.Tensor] = eval_transform(config["image"])
        self._text: Any = None

    def __repr__(self) -> str:
        ident = self.text_identity or {}
        return (f"FlameModel({self.config['model']['name']}, D={self.dim}, text side "
                f"{ident.get('llm', 'own tower')!r}, folder={str(self.folder)!r})")

    @property
    def dim(self) -> int:
        """D, the embedding width (the text-side LLM's hidden size)."""
        return int(self.config["model"]["out_dim"])

    @property
    def text_identity(self) -> dict[str, Any] | None:
        """The cache identity the model was trained against (``None`` for a model with its own text tower)."""
        return self.config.get("cache_identity")

    @property
    def logit_scale(self) -> float:
        """The trained temperature ``t = exp(s)``, clamped like in training."""
        return float(self.vision.temperature().detach())

    @property
    def logit_bias(self) -> float:
        """The trained sigmoid bias ``b``."""
        return float(self.vision.logit_bias.detach())

    # ---- images -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, images: Sequence[ImageInput] | torch.Tensor, batch_size: int = IMAGE_BATCH) -> torch.Tensor:
        """Image embeddings.

        Args:
            images: PIL images or paths (decoded with the manifests' image decoder, then :attr:`preprocess`), or
                a preprocessed batch ``float [n, 3, S, S]``.
            batch_size: images per forward pass.

        Returns:
            ``float32 [n, D]`` on the CPU, unit rows, in input order.

        Raises:
            InputError: no images, an image that does not open, or a tensor of the wrong shape.
        """
        if isinstance(images, torch.Tensor):
            size = self.config["image"]["size"]
            if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
                raise InputError(f"a preprocessed batch must be [n, 3, {size}, {size}], got {list(images.shape)}")
            batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        else:
            images = list(images)
            if not images:
                raise InputError("encode_image needs at least one image")
            batches = (torch.stack([self.preprocess(self._open(x)) for x in images[i : i + batch_size]])
                       for i in range(0, len(images), batch_size))
        out = [self._forward(b) for b in batches]
        if not out:
            raise InputError("encode_image needs at least one image")
        return torch.cat(out)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, self.dtype or torch.float32, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype not in (None, torch.float32)):
            emb = self.vision(x)
        return F.normalize(emb.float(), dim=-1).cpu()

    @staticmethod
    def _open(image: ImageInput) -> Image.Image:
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        try:
            return decode_image(Path(image).read_bytes(), str(image))
        except (OSError, UndecodableImageError) as exc:
            raise InputError(f"image {image}: {exc}") from None

    # ---- texts --------------------------------------------------------------------------------------------
    def encode_text(self, texts: Sequence[str], mode: str = "single") -> torch.Tensor:
        """Text embeddings in the space the model was trained against (SPEC §6 text modes).

        The first call loads the text side once: the LLM named by the model's cache identity, checked against its
        weights fingerprint and D (a mismatch is a one-line :class:`pipeline.cache.meta.CacheIdentityError`
        naming both values).

        Args:
            texts: captions or prompts (cleaned and templated as in training, SPEC §2.1-§2.2).
            mode: ``"single"``: the raw single-prompt vector; ``"multi"``: the mean of the 7 long-caption facets,
                renormalized.

        Returns:
            ``float32 [n, D]`` on the CPU, unit rows.

        Raises:
            InputError: no texts, or a blank text.
            ValueError: unknown mode.
        """
        check_text_mode(mode)
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise InputError("encode_text needs at least one text")
        blank = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if blank:
            raise InputError(f"encode_text: blank or non-string texts at positions {blank[:5]}")
        side = self.text_side()
        vec = side.embed(texts, mode=mode) if isinstance(side, TextEmbedder) else side.encode(texts, mode)
        return torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float32))

    def text_side(self) -> Any:
        """The loaded text side (loading it on first use): a :class:`stage1_embed_text.api.TextEmbedder`, or the
        model's own text tower encoder."""
        if self._text is None:
            if self.config.get("text_side"):
                self._text = load_model_text_encoder(self.vision, self.config, device=str(self.device))
            else:
                dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(self.dtype)
                embedder = TextEmbedder.from_identity(self.text_identity, dtype=dtype, device=str(self.device))
                check_identity(self.text_identity, embedder_identity(embedder))
                self._text = embedder
        return self._text

    # ---- zero-shot use ------------------------------------------------------------------------------------
    def zero_shot_classifier(self, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                             mode: str = "single") -> torch.Tensor:
        """Class prototypes ``float32 [C, D]``: every template filled with each name (``{}`` or ``{c}``),
        embedded, each L2-normalized, averaged over templates and renormalized (SPEC §6, as ``flame eval``).

        Raises:
            InputError: no class names or no templates.
        """
        classnames, templates = list(classnames), list(templates)
        if not classnames or not templates:
            raise InputError("zero_shot_classifier needs at least one class name and one template")
        prompts = [fill_template(t, c) for c in classnames for t in templates]
        vec = self.encode_text(prompts, mode).numpy().reshape(len(classnames), len(templates), -1)
        return torch.from_numpy(class_prototypes(vec))

    def classify(self, images: Sequence[ImageInput] | torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
        """Per-class probabilities ``sigmoid(t * cos + b)`` with the model's trained scale ``t`` and bias ``b``
        (the sigmoid loss it was trained with, so each class is scored on its own and rows need not sum to 1;
        the top-1 class is the row's argmax, as in ``flame eval``).

        Returns:
            ``float32 [n_images, C]``.
        """
        emb = images if isinstance(images, torch.Tensor) and images.ndim == 2 else self.encode_image(images)
        return torch.sigmoid(self.logit_scale * (emb @ classifier.T.to(emb.dtype)) + self.logit_bias)

    def similarity(self, images: Sequence[ImageInput] | torch.Tensor, texts: Sequence[str],
                   mode: str = "single") -> torch.Tensor:
        """Cosine similarities ``float32 [n_images, n_texts]`` in ``[-1, 1]``."""
        return self.encode_image(images) @ self.encode_text(texts, mode).T

    def to(self, device: str | torch.device) -> FlameModel:
        """Move the image encoder (and a loaded text tower or LLM) to ``device``; returns ``self``."""
        self.device = torch.device(device)
        self.vision.to(self.device)
        if isinstance(self._text, TextEmbedder):
            self._text.encoder.llm.model.to(self.device)
            self._text.encoder.llm.final_norm.to(self.device)
            self._text.encoder.device = self.device
        elif self._text is not None:
            self._text = None  # a text tower encoder is rebuilt on the new device on next use
        return self


def load_model(src: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
               revision: str | None = None) -> FlameModel:
    """:func:`flame_pipeline.load`: resolve ``src`` (:func:`flame_pipeline.sources.resolve_model`), then
    :func:`from_folder`."""
    return from_folder(resolve_model(src, revision), device=device, dtype=dtype)


def from_folder(folder: Path, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None) -> FlameModel:
    """A :class:`FlameModel` from a local exported or imported model folder (see :func:`flame_pipeline.load`)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    vision, config = load_exported(folder, device=dev)
    if not config.get("cache_identity") and not config.get("text_side"):
        raise InputError(f"{folder}/config.json names no text side (cache_identity); export it with flame train")
    return FlameModel(vision, config, Path(folder), dev, dtype)
