"""flame-pipeline's public Python API: load a trained FLAME model, embed images and texts, classify, search.

    import flame_pipeline

    model = flame_pipeline.load("runs/demo-artifacts/train-.../model")     # a folder, a hub id or a FLAME .pt
    img = model.encode_image(["cat.png", "dog.png"])                        # float32 [2, D], unit rows
    txt = model.encode_text(["a cat", "a dog"])                             # the frozen LLM, loaded once
    classifier = model.zero_shot_classifier(["cat", "dog"], ["a photo of a {}."])
    probs = model.classify(["cat.png"], classifier)                         # sigmoid(t * cos + b), [1, 2]

The stages stay where they are (``stage1_embed_text``, ``stage2_train_vision``, ``eval``); this package is the
facade over them plus the ``flame`` command. Importing it loads no torch: :func:`load` and :class:`FlameModel`
come in on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline import __version__

if TYPE_CHECKING:
    import torch

    from flame_pipeline.model import FlameModel

__all__ = ["FlameModel", "__version__", "load"]


def load(src: str, device: str | None = None, dtype: str | torch.dtype | None = None,
         revision: str | None = None) -> FlameModel:
    """Load a trained FLAME model.

    Args:
        src: a model folder (``flame train``'s ``model/``, ``flame import checkpoint``'s output), a Hugging Face
            hub id ``user/repo`` or ``user/repo@revision``, or an official FLAME checkpoint file (imported once
            into ``$FLAME_HOME/models/imported/``).
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when available.
        dtype: ``None`` (float32 image side; the LLM in the dtype the cache was computed in) or a dtype for both
            (``"bfloat16"``, ``torch.float16``, ...).
        revision: hub branch, tag or commit (overrides ``@revision``).

    Returns:
        a :class:`FlameModel`; its LLM loads on the first ``encode_text``.

    Raises:
        pipeline.hub.ModelSourceError: an unknown source, a folder that is not a model, a hub id that is not
            cached while offline.
        flame_pipeline.imports.checkpoint.CheckpointImportError: a checkpoint file FLAME did not write.
    """
    from flame_pipeline.model import load_model

    return load_model(src, device=device, dtype=dtype, revision=revision)


def __getattr__(name: str) -> Any:
    if name == "FlameModel":
        from flame_pipeline.model import FlameModel

        return FlameModel
    raise AttributeError(f"module 'flame_pipeline' has no attribute {name!r}")
