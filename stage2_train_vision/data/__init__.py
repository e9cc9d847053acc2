"""Training pairs (SPEC §5): manifest images + cache vectors by key, in memory or streamed, and their augmentation."""
