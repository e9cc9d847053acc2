"""Benchmark: is bf16 worth it on this CPU? The measurement behind ``dtype = "auto"`` / ``mixed_precision = "auto"``.

Times, in the same run and on the same inputs, bf16 against float32 for the two kinds of work the CPU demo does:

* ``matmul``: one ``[M, K] x [K, N]`` product at stage 1's shapes (Gemma-3-270M: K = 640, N = 2048), GFLOP/s;
* ``vit_step``: one training step (forward + backward) of the demo's ViT (``configs/demo-cpu.toml``: ViT-Tiny,
  64 px, patch 8, depth 4) on a batch of 128 images, under ``torch.autocast("cpu", bfloat16)`` or without.

Prints the CPU (model, matmul flags), each time, the ratio bf16 / float32 (below 1: bf16 is slower) and what
:func:`pipeline.machine.fast_bf16` decides on this machine, so the rule can be checked against the measurement.
``--write`` stores the numbers in ``bench/results/precision.json``.

    .venv/bin/python bench/precision.py [--threads 2] [--repeats 3] [--write]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline import __version__  # noqa: E402  (after the project root is on sys.path)
from pipeline.machine import cpu_info, cpu_summary, fast_bf16  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "precision.json"


def _best_of(fn, repeats: int) -> float:
    """Smallest wall time of ``repeats`` calls after one warm-up call (seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_gflops(dtype: torch.dtype, repeats: int, m: int = 1024, k: int = 640, n: int = 2048) -> float:
    """GFLOP/s of ``[m, k] @ [k, n]`` in ``dtype`` (10 products per timed call)."""
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(m, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
    seconds = _best_of(lambda: [torch.nn.functional.linear(a, w) for _ in range(10)], repeats)
    return 2 * m * k * n * 10 / seconds / 1e9


def vit_step_seconds(bf16: bool, repeats: int, batch: int = 128) -> float:
    """Seconds of one forward + backward of the demo's ViT on ``batch`` random 64 px images."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=4, num_classes=0)
    x = torch.randn(batch, 3, 64, 64)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(x).float().pow(2).mean()
        loss.backward()

    return _best_of(step, repeats)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (the CPU demo's 2 cores)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is kept")
    p.add_argument("--write", action="store_true", help=f"store the result in {RESULTS.relative_to(ROOT)}")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_summary()}; torch {torch.__version__}, {args.threads} threads")
    fp32, bf16 = matmul_gflops(torch.float32, args.repeats), matmul_gflops(torch.bfloat16, args.repeats)
    step32, step16 = vit_step_seconds(False, args.repeats), vit_step_seconds(True, args.repeats)
    doc = {
        "version": __version__, "cpu": cpu_summary(), "flags": cpu_info()["flags"], "torch": torch.__version__,
        "threads": args.threads, "fast_bf16_decides": fast_bf16("cpu"),
        "matmul_gflops": {"float32": round(fp32, 1), "bfloat16": round(bf16, 1), "bf16_over_fp32": round(bf16 / fp32, 3)},
        "vit_step_s": {"float32": round(step32, 3), "bf16_autocast": round(step16, 3),
                       "fp32_over_bf16_speed": round(step32 / step16, 3)},
    }
    print(f"matmul [1024x640]x[640x2048]: float32 {fp32:.1f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s, bf16/fp32 = "
          f"{bf16 / fp32:.2f}")
    print(f"ViT-Tiny 64 px step, batch 128: float32 {step32:.3f} s, bf16 autocast {step16:.3f} s, bf16 speed / "
          f"fp32 speed = {step32 / step16:.2f}")
    faster = bf16 > fp32 and step16 < step32
    print(f"auto picks {'bf16' if doc['fast_bf16_decides'] else 'float32'} here; measured faster: "
          f"{'bf16' if faster else 'float32'}{'' if faster == doc['fast_bf16_decides'] else ' (the rule disagrees)'}")
    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
