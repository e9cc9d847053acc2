"""Zero-shot evaluation: retrieval, classification, multilingual, compositionality, linear probe (SPEC §6)."""
