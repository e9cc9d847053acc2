"""The application layer: the ``flame`` command, the end-to-end demo, cache inspection and imports.

It sits on top of every package (manifests, stage 1, stage 2, eval) and nothing imports it.
"""
