"""The bottom layer shared by every package (errors, atomic writes, paths, machine facts, pinned assets, the cache
contract and its reader/writer) and, in :mod:`pipeline.app`, the top layer (the ``flame`` command, demo, inspect)."""

__version__ = "0.5.0"
