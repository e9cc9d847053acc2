"""Stage 1: a frozen causal LLM embeds every caption once with FLAME multi-facet prompts (SPEC §2)."""
