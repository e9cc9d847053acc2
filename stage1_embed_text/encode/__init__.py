"""Captions -> unit facet vectors: prompts, whole-prompt tokenization, packing, batching, the encoder (SPEC §2.1-§2.4)."""
