"""What machine a measurement ran on: CPU model, the instruction-set flags that decide bf16 matmul speed, cores.

Speed ratios differ between machines (a CPU with AMX runs bf16 matmuls several times faster than one with
AVX2 only), so every benchmark prints :func:`cpu_summary` and stores :func:`cpu_info` beside its numbers.
Reads ``/proc/cpuinfo`` (Linux); elsewhere the model falls back to :func:`platform.processor`.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# The flags that decide how fast the matmuls of stage 1 and stage 2 run on a CPU.
MATMUL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
# A CPU with one of these runs bf16 matmuls natively; without them torch emulates bf16, several times slower than fp32.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def logical_cores() -> int:
    """CPUs this process may run on (its affinity mask), else ``os.cpu_count()``."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_info() -> dict[str, Any]:
    """``{"model": str, "flags": [str], "logical_cores": int}``; ``flags`` is the subset of
    :data:`MATMUL_FLAGS` the CPU has, in that order."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": [f for f in MATMUL_FLAGS if f in flags], "logical_cores": logical_cores()}


def cpu_summary(info: dict[str, Any] | None = None) -> str:
    """One line, e.g. ``AMD EPYC 7B13 [avx2], 2 cores``."""
    info = info or cpu_info()
    flags = " ".join(info["flags"]) or "no avx2/avx512/amx"
    return f"{info['model']} [{flags}], {info['logical_cores']} cores"


def fast_bf16(device_type: str) -> bool:
    """Whether bf16 compute is native, hence worth choosing, on ``device_type`` (``"cuda"`` or ``"cpu"``): the one
    place both stages' ``auto`` precision is decided.

    CUDA: :func:`torch.cuda.is_bf16_supported`. CPU: one of :data:`BF16_FLAGS`. Without them torch emulates bf16,
    several times slower than float32 for both a stage-1 matmul and a demo training step (``bench/precision.py``
    measures both and prints this rule's answer next to them; ``bench/results/precision.json``).
    """
    if device_type == "cuda":
        import torch  # third-party, heavy: only when a CUDA device is asked about

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return any(f in cpu_info()["flags"] for f in BF16_FLAGS)
