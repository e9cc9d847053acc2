"""The ``hf`` stage-1 backend (the reference): a :class:`~stage1_embed_text.encode.encoder.FacetEncoder` on an LLM
loaded with transformers (:func:`stage1_embed_text.backends.llm.load_llm`), SPEC §2.4."""

from __future__ import annotations

from stage1_embed_text.backends import llm as _llm
from stage1_embed_text.backends.registry import EncoderSpec, register_backend
from stage1_embed_text.encode.encoder import FacetEncoder


@register_backend("hf")
def build_hf_encoder(spec: EncoderSpec, device: str | None) -> FacetEncoder:
    """Load ``spec.llm`` cut to ``spec.layer`` and wrap it in a :class:`FacetEncoder` on ``device`` (default CPU).

    Raises:
        stage1_embed_text.config.EmbedConfigError: unknown dtype, readout or position mode, a layer outside the
            model, or a context too short for the templates.
        FileNotFoundError: a model path that does not exist.
    """
    llm = _llm.load_llm(spec.llm, dtype=spec.dtype, layer=spec.layer)
    if device not in (None, "cpu"):
        llm.model.to(device)
        llm.final_norm.to(device)
    kw = {"max_batch_sequences": spec.batch_size} if spec.batch_size else {}
    return FacetEncoder(
        llm, prompt_set=spec.prompt_set, readout=spec.readout, position_mode=spec.position_mode,
        context_tokens=spec.context_tokens, max_batch_tokens=spec.max_batch_tokens, **kw,
    )
