"""Zero-shot evaluation: retrieval, classification, multilingual, compositionality, linear probe (SPEC §6).

Entry points: ``flame eval`` (:mod:`eval.cli`) and :func:`eval.run.run_benchmark` (used by ``flame demo``).

Modules, one job each; each imports only modules listed above it (``cli`` imports just the light
``benchmarks`` and stage 1's light ``config``, so ``flame --help`` loads no torch, and loads ``run`` when the command
runs). The text modes (``single``, ``multi``) are stage 1's (:data:`stage1_embed_text.config.TEXT_MODES`):

===========================  ==============================================================================
``ranking``                  deterministic top-k by inner product (float64 rescoring, ties -> lower index),
                             exact torch matmul or faiss ``IndexFlatIP`` candidates
``metrics``                  retrieval recall@k (any positive in top k), classification acc1/acc5/mean
                             per-class recall, zero-shot class prototypes, chance levels
``compositionality``         Winoground text/image/group scores, SugarCrepe accuracy
``linear_probe``             scikit-learn logistic regression on pre-projector features
``text_cache``               on-disk eval text vectors keyed by (identity hash, mode, text hash)
``embedding``                image embedding (progress bar) and the cached, identity-checked text side
``benchmarks``               tasks and image pool (``base``), the registry (``registry``: name -> loader and
                             published sizes) and the adapters, each registering its benchmarks: emoji,
                             COCO/Flickr30k, CLIP_benchmark wds, Urban-1k, ShareGPT4V-1k, DCI, DOCCI, XM3600,
                             class folders, Winoground, SugarCrepe
``tasks``                    one task -> metrics + chance
``report`` / ``plots``       ``results.json``, ``results.md``, PNG figures
``run`` / ``cli``            orchestration and the ``flame eval`` command
===========================  ==============================================================================
"""
