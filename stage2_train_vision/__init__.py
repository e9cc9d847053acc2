"""Stage 2: a timm ViT + MLP projector trained against cached LLM vectors with Accelerate (SPEC §5)."""
