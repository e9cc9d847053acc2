"""The stage-1 backends (SPEC §2.5): ``hf`` (:mod:`~stage1_embed_text.backends.hf`, the reference) and ``vllm``
(:mod:`~stage1_embed_text.backends.vllm_backend`), each registered in :mod:`~stage1_embed_text.backends.registry`
under the :class:`~stage1_embed_text.backends.registry.TextEncoder` protocol; where the model files come from
(:mod:`~stage1_embed_text.backends.model_source`), how an LLM is loaded and cut
(:mod:`~stage1_embed_text.backends.llm`, :mod:`~stage1_embed_text.backends.truncate`).

Importing this package registers every backend and loads torch and transformers; vLLM itself is imported only
when a ``vllm`` encoder is built. :func:`build_encoder` is the one place an encoder is built.
"""

from stage1_embed_text.backends import hf, vllm_backend  # noqa: F401  (each registers its backend)
from stage1_embed_text.backends.registry import EncoderSpec, TextEncoder, build_encoder, register_backend

__all__ = ["EncoderSpec", "TextEncoder", "build_encoder", "register_backend"]
