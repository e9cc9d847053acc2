"""Canonical Parquet manifests (SPEC §4) and the readers that build them from real dataset formats."""
