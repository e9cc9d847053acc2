"""Import what FLAME's authors released (text caches of ``.pth`` files, checkpoints) as flame artifacts."""
