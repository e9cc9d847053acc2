"""Benchmark: the public API's speed against the code paths it wraps, measured in the same run (issue 20).

* Text: ``FlameModel.encode_text`` over ``--prompts`` class prompts (``"an emoji of {name}."``) vs stage 1's
  :class:`stage1_embed_text.encode.encoder.FacetEncoder` on the same texts (raw group, the job's batching).
* Images: ``FlameModel.encode_image`` on image files vs ``flame eval``'s path
  (:func:`eval.embedding.embed_images` over the same files), the same exported model.

The model is a tiny random ViT exported against the LLM's real identity (so the API loads the real LLM); the
numbers are texts/s and images/s, and the ratios API / baseline (target: >= 0.95 each).

    .venv/bin/python bench/api_throughput.py --llm smollm2-135m --prompts 1000 --images 512
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import flame_pipeline
from eval.benchmarks.base import ImageRef
from eval.embedding import embed_images
from pipeline import __version__
from pipeline.asset_list import default_readout
from pipeline.machine import cpu_summary
from stage1_embed_text.api import TextEmbedder
from stage1_embed_text.backends.llm import load_llm
from stage1_embed_text.encode.encoder import FacetEncoder
from stage1_embed_text.encode.prompts import FLAME
from stage2_train_vision.config import DataConfig, ModelConfig
from stage2_train_vision.export import export_model
from stage2_train_vision.model import FlameVisionModel

RESULTS = Path(__file__).resolve().parent / "results" / "api_throughput.json"


def _model_folder(root: Path, identity: dict, img_size: int) -> Path:
    cfg = ModelConfig(name="vit_tiny_patch16_224", img_size=img_size, patch_size=16, depth=4, width=192,
                      num_heads=3, proj_hidden=1024, out_dim=identity["dim"])
    torch.manual_seed(0)
    return export_model(FlameVisionModel(cfg), cfg, DataConfig(), identity, root / "model")


def _images(root: Path, n: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        p = root / f"img{i:05d}.png"
        p.write_bytes(buf.getvalue())
        paths.append(p)
    return paths


def _time_pair(baseline, ours, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` seconds of each, the two alternating so that machine load hits both alike."""
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((baseline, ours)):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="best of N timings per side")
    ap.add_argument("--write", action="store_true", help=f"write {RESULTS.relative_to(RESULTS.parents[2])}")
    args = ap.parse_args()
    torch.manual_seed(0)
    embedder = TextEmbedder(FacetEncoder(load_llm(args.llm), FLAME, readout=default_readout(args.llm)))
    identity = embedder.encoder.identity().to_dict()
    prompts = [f"an emoji of {w} number {i}." for i, w in enumerate(["cat", "dog", "face", "flag"] * (args.prompts // 4 + 1))][: args.prompts]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = flame_pipeline.load(str(_model_folder(root, identity, args.img_size)), device="cpu")
        model._text = embedder  # the same loaded LLM on both sides: only the wrapper differs
        t_stage1, t_api_text = _time_pair(lambda: embedder.encoder.encode([{"raw": t} for t in prompts]),
                                          lambda: model.encode_text(prompts), args.repeats)
        paths = _images(root, args.images, args.img_size)
        refs = [ImageRef(path=str(p)) for p in paths]
        t_eval, t_api_img = _time_pair(lambda: embed_images(model.vision, refs, model.preprocess, 64, "cpu"),
                                       lambda: model.encode_image(paths, batch_size=64), args.repeats)
    doc = {
        "version": __version__, "cpu": cpu_summary(), "load_average_1min": round(os.getloadavg()[0], 2), "llm": args.llm, "prompts": args.prompts,
        "images": args.images, "img_size": args.img_size, "threads": torch.get_num_threads(),
        "text": {"stage1_texts_per_s": round(args.prompts / t_stage1, 1),
                 "api_texts_per_s": round(args.prompts / t_api_text, 1), "ratio": round(t_stage1 / t_api_text, 3)},
        "image": {"eval_images_per_s": round(args.images / t_eval, 1),
                  "api_images_per_s": round(args.images / t_api_img, 1), "ratio": round(t_eval / t_api_img, 3)},
    }
    print(f"CPU: {doc['cpu']}; load average {doc['load_average_1min']} (ratios alternate the two sides)")
    print(f"encode_text : {doc['text']['api_texts_per_s']} texts/s vs stage-1 encoder "
          f"{doc['text']['stage1_texts_per_s']} -> ratio {doc['text']['ratio']:.3f}")
    print(f"encode_image: {doc['image']['api_images_per_s']} images/s vs flame eval's embed_images "
          f"{doc['image']['eval_images_per_s']} -> ratio {doc['image']['ratio']:.3f}")
    if args.write:
        RESULTS.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
