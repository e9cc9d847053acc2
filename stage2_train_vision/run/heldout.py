"""Held-out retrieval during training (``train.eval_every``): recall@1 between the images of a held-out manifest
split and their own cache vectors, logged to ``metrics.jsonl`` and the trackers.

Why this lives in stage 2 and is not the eval package's code: stage 2 may not import ``eval`` (the layers point
down), and the cache's held-out vectors are exactly the targets the model is trained to match, so recall among
them needs no benchmark download and no LLM. Zero-shot classification does need an LLM (class prompts must be
embedded with the cache's LLM, which stage 2 never loads), so it stays with ``flame eval`` on the exported model,
together with the full benchmarks. The metric is the usual multi-caption retrieval (as with COCO's five captions):
each present facet vector of a held-out sample is one text of that image.
"""

from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from manifests.schema import read_manifest
from pipeline.cache.store import CacheReader
from stage2_train_vision.config import ImageConfig
from stage2_train_vision.data.samples import IMAGE_COLUMNS, IMAGE_ERRORS, DataError, decode, split_keys
from stage2_train_vision.data.transforms import eval_transform


class HeldOut:
    """Up to ``max_samples`` held-out samples: eval-transformed images and every present facet vector.

    Args:
        manifest: manifest directory; split: the held-out split (not the training split).
        reader: the training cache (the held-out keys must be in it).
        image: the run's image preprocessing (:class:`ImageConfig`).
        max_samples: the first this many usable samples of the split, in manifest order.

    Attributes:
        keys: the samples' keys (``M``).
        images: ``float32 [M, 3, S, S]``.
        texts: ``float32 [T, D]``, the present facet vectors of the samples, sample by sample.
        owner: ``int64 [T]``, the sample of each text.

    Raises:
        DataError: the split is empty, or fewer than 2 of its samples have cache vectors and decodable images.
    """

    def __init__(self, manifest: str, split: str, reader: CacheReader, image: ImageConfig, max_samples: int):
        table = read_manifest(manifest, columns=IMAGE_COLUMNS, split=split)
        if table.num_rows == 0:
            split_keys(manifest, split)  # raises naming the splits there are
        rows = reader.rows(table.column("key").to_pylist())
        tf = eval_transform(image)
        self.keys: list[str] = []
        images, kept_rows = [], []
        for i, row in enumerate(table.to_pylist()):
            if len(self.keys) == max_samples:
                break
            if rows[i] < 0:
                continue
            try:
                images.append(tf(decode(row, manifest)))
            except IMAGE_ERRORS:
                continue
            self.keys.append(row["key"])
            kept_rows.append(int(rows[i]))
        if len(self.keys) < 2:
            raise DataError(
                f"train.eval_split {split!r}: {len(self.keys)} of its {table.num_rows} samples have cache vectors and "
                "a decodable image (need at least 2); build the cache from a manifest that includes this split"
            )
        vectors, mask = reader.read_rows(np.asarray(kept_rows, np.int64))
        self.images = torch.stack(images)
        self.texts = torch.from_numpy(vectors[mask].astype(np.float32))
        self.owner = torch.arange(len(self.keys)).repeat_interleave(torch.from_numpy(mask.sum(1)))

    @torch.no_grad()
    def recall_at_1(self, model: nn.Module, accelerator: Accelerator, batch: int = 64) -> dict[str, float]:
        """Image->text and text->image recall@1 of ``model`` (a :class:`FlameVisionModel`, run in eval mode under
        the accelerator's autocast, then put back in its mode): the fraction of images whose most similar text is
        one of their own, and of texts whose most similar image is theirs. Touches no random generator."""
        was_training = model.training
        model.eval()
        emb = []
        try:
            for i in range(0, len(self.images), batch):
                with accelerator.autocast():
                    emb.append(model(self.images[i:i + batch].to(accelerator.device)).float().cpu())
        finally:
            model.train(was_training)
        sim = torch.cat(emb) @ self.texts.T  # [M, T]
        own = torch.arange(len(self.keys))
        return {"heldout_r1_image_to_text": float((self.owner[sim.argmax(1)] == own).float().mean()),
                "heldout_r1_text_to_image": float((sim.argmax(0) == self.owner).float().mean())}
