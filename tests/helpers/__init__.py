"""Builders shared by the test modules: tiny data sets, caches, models and fakes. No tests live here.

``stage2_data``  a manifest of solid-colour PNGs and a cache of unit vectors (F=11, D=16) that a model can learn
``images``       PNG bytes: Pillow-made, and chunk-by-chunk for what Pillow cannot write
``shards``       tar files written member by member (webdataset shards)
``eval_fakes``   a deterministic text embedder, its identity, and a small emoji-like manifest for eval
``stage1_tiny``  tiny tokenizers and causal LMs built offline (Llama, Mistral, Gemma-3, Qwen shapes)
"""
