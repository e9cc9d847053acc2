"""Machine facts for ``bench/gpu_check.py``: versions, datasheet peaks, the measured matmul peak, peak memory per
section, and which SDPA kernel a call actually ran.

Kept apart from the check itself so that each stays readable; it imports only torch and the project's
``pipeline.machine`` (the CPU model and flags).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import resource
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.machine import cpu_info

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets, by a substring of
# torch.cuda.get_device_name; the first match wins, so the H100 variants come before plain "H100" (the SXM5
# part, named e.g. "NVIDIA H100 80GB HBM3"). H200 has the H100 SXM's tensor cores.
SPEC_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
LIBRARIES = ("transformers", "accelerate", "timm", "numpy", "tokenizers", "safetensors", "pyarrow", "zarr",
             "numcodecs")
# aten ops of the SDPA kernels (what torch.profiler sees run), and the torch.nn.attention.SDPBackend names.
SDPA_KERNELS = (("flash", "_scaled_dot_product_flash_attention", "FLASH_ATTENTION"),
                ("efficient", "_scaled_dot_product_efficient_attention", "EFFICIENT_ATTENTION"),
                ("cudnn", "_scaled_dot_product_cudnn_attention", "CUDNN_ATTENTION"),
                ("math", "_scaled_dot_product_attention_math", "MATH"))


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spec_peak_tflops(gpu_name: str | None) -> float | None:
    """Datasheet dense bf16 peak (TFLOP/s) of the GPU named ``gpu_name``; ``None`` for a CPU or an unlisted GPU."""
    for part, tflops in SPEC_BF16_TFLOPS if gpu_name else ():
        if part in gpu_name:
            return tflops
    return None


def library_versions() -> dict[str, str | None]:
    """Installed versions of :data:`LIBRARIES` (``None`` = not installed), by their distribution metadata."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def driver_version() -> str | None:
    """The NVIDIA driver version (NVML, else ``nvidia-smi``); ``None`` when neither answers."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # no NVML binding or no driver: try the command line
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)
        return out.stdout.strip().splitlines()[0] or None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def machine_info(device: torch.device) -> dict:
    """Device, CPU, driver and library versions of this run (``spec_peak_tflops``: see :data:`SPEC_BF16_TFLOPS`)."""
    libs = library_versions()
    info = {"device": str(device), "cpu": cpu_info() | {"torch_threads": torch.get_num_threads()},
            "python": platform.python_version(), "torch": torch.__version__, "transformers": libs["transformers"],
            "timm": libs["timm"], "libraries": libs, "spec_peak_tflops": None}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
                       "multiprocessors": p.multi_processor_count, "cuda": torch.version.cuda,
                       "cudnn": torch.backends.cudnn.version(), "driver": driver_version()}
        info["spec_peak_tflops"] = spec_peak_tflops(p.name)
    return info


def reset_memory_peak(device: torch.device) -> None:
    """Start a new peak-memory window: the CUDA allocator's peaks and (Linux) the process's peak RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def memory_peak(device: torch.device) -> dict:
    """Peaks since :func:`reset_memory_peak`: ``process_peak_rss_mib`` (VmHWM; ``ru_maxrss`` of the whole run
    where ``/proc`` is missing) and, on CUDA, ``gpu_peak_allocated_gib`` / ``gpu_peak_reserved_gib``."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) / 1024
    out = {"process_peak_rss_mib": round(rss)}
    if device.type == "cuda":
        out["gpu_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        out["gpu_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    return out


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, inner: int, warmup_s: float,
                reps: int = 5) -> tuple[float, int]:
    """``(best FLOP/s, warm-up products)`` of ``torch.matmul`` of two ``size x size`` matrices of ``dtype``.

    Products run for ``warmup_s`` seconds first (at least ``inner``), so a GPU's clocks leave idle; then each of
    ``reps`` repetitions times ``inner`` back-to-back products between two synchronisations (launch latency
    does not count).
    """
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    c = torch.empty(size, size, device=device, dtype=dtype)
    warm, until = 0, time.perf_counter() + warmup_s
    while warm < inner or time.perf_counter() < until:
        for _ in range(inner):
            torch.matmul(a, b, out=c)
        warm += inner
        sync(device)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b, out=c)
        sync(device)
        best = min(best, (time.perf_counter() - t) / inner)
    return 2.0 * size**3 / best, warm


def mfu(achieved_tflops: float, peak_tflops: float | None) -> float | None:
    """``achieved / peak`` rounded to 4 places; ``None`` without a peak."""
    return round(achieved_tflops / peak_tflops, 4) if peak_tflops else None


# ---------------------------------------------------------------------------------------------- SDPA


@contextlib.contextmanager
def first_sdpa_call() -> Iterator[list]:
    """Within the block, keep ``(args, kwargs)`` of the first ``F.scaled_dot_product_attention`` call (the one
    transformers' SDPA attention makes with the encoder's mask) in the yielded list."""
    calls: list = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        if not calls:
            calls.append((args, kwargs))
        return original(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        yield calls
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def sdpa_kernels_run(fn: Callable[[], object]) -> list[str]:
    """Labels of :data:`SDPA_KERNELS` whose aten op ran during ``fn()`` (``torch.profiler``, CPU-side op events,
    which name the kernel the dispatcher chose on any device)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.name for e in prof.events()}
    return [label for label, op, _ in SDPA_KERNELS if any(op in n for n in names)]


def sdpa_backends(call: tuple, device: torch.device, reps: int = 3) -> list[dict]:
    """Each SDPA kernel alone (``torch.nn.attention.sdpa_kernel([backend])``) on the arguments of ``call``:
    ``[{kernel, works, ms | error}]``; ``ms`` is the best of ``reps`` timed calls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    args, kwargs = call
    rows = []
    for label, _, name in SDPA_KERNELS:
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            rows.append({"kernel": label, "works": False, "error": f"torch {torch.__version__} has no {name}"})
            continue
        try:
            with warnings.catch_warnings(), sdpa_kernel([backend]):
                warnings.simplefilter("ignore")  # each refusing kernel warns why before the error
                best = float("inf")
                for _ in range(reps):
                    sync(device)
                    t = time.perf_counter()
                    F.scaled_dot_product_attention(*args, **kwargs)
                    sync(device)
                    best = min(best, time.perf_counter() - t)
            rows.append({"kernel": label, "works": True, "ms": round(1000 * best, 3)})
        except RuntimeError as e:
            rows.append({"kernel": label, "works": False, "error": (str(e).strip().splitlines() or ["?"])[0][:200]})
    return rows


def sdpa_report(run_encoder: Callable[[], object], device: torch.device) -> dict:
    """Run ``run_encoder()`` (a warm-up encode with SDPA attention) under the profiler and record which SDPA
    kernel ran with the 4-D facet mask (``used``), the shapes of that call, and every kernel alone on it.

    ``ok``: the encoder ran a fused kernel (flash, efficient or cuDNN) and never the math kernel (and, when the
    call was captured, a fused kernel runs it alone).
    """
    with first_sdpa_call() as calls:
        used = sdpa_kernels_run(run_encoder)
    if not calls:  # no SDPA at all (used is empty then), or a caller that bound the function before the spy
        return {"used": used, "alone": [], "fused_working": None, "ok": bool(used) and "math" not in used,
                "note": "no F.scaled_dot_product_attention call seen by the spy: the kernel is the profiler's alone"}
    args, kwargs = calls[0]
    q, k = args[0], args[1]
    mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
    call = {"query": list(q.shape), "key": list(k.shape), "dtype": str(q.dtype).removeprefix("torch."),
            "mask": None if mask is None else list(mask.shape),
            "mask_dtype": None if mask is None else str(mask.dtype).removeprefix("torch."),
            "options": {n: v for n, v in kwargs.items() if n != "attn_mask" and isinstance(v, bool | float | int)}}
    rows = sdpa_backends(calls[0], device)
    del calls, args, kwargs, q, k, mask
    fused = [r["kernel"] for r in rows if r["works"] and r["kernel"] != "math"]
    return {"used": used, "call": call, "alone": rows, "fused_working": fused,
            "ok": bool(used) and "math" not in used and bool(fused)}
