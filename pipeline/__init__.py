"""Shared layer of flame-pipeline: paths, typed configs, the cache format, the CLI and the end-to-end demo."""

__version__ = "0.3.0"
