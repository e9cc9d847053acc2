"""``bench/gpu_check.py``: ``--tiny`` runs end to end on the CPU; a full run without CUDA stops at once; the
SDPA-kernel record, the datasheet peaks and the final checks can fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402
import gpu_facts  # noqa: E402


def test_gpu_check_tiny_runs_and_agrees(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())

    assert r["tiny"] is True and r["ok"] is True
    assert {"machine", "sizes", "matmul_peak_tflops", "matmul_peak_end_tflops", "stage1_parity", "stage1", "stage2",
            "targets", "checks", "memory", "elapsed_s"} <= set(r)
    m = r["machine"]
    assert m["cpu"]["model"] and m["device"] == "cpu" and m["spec_peak_tflops"] is None and "gpu" not in m
    assert m["libraries"]["zarr"] and m["libraries"]["accelerate"] and m["python"].count(".") == 2
    assert r["matmul_peak_tflops"] > 0 and r["matmul_peak_end_tflops"] > 0 and r["peak_warmup_products"] >= 2
    assert r["mfu_peak_tflops"] == max(r["matmul_peak_tflops"], r["matmul_peak_end_tflops"])
    # peak memory per section, the process's RSS on a CPU run (a tiny run holds at least torch: > 100 MiB)
    assert list(r["memory"]) == ["matmul_peak", "stage1_parity", "stage1", "stage2", "done"]
    assert all(set(v) == {"process_peak_rss_mib"} and v["process_peak_rss_mib"] > 100 for v in r["memory"].values())

    parity = r["stage1_parity"]
    assert {(p["dtype"], p["attn"]) for p in parity["pairs"]} == {
        (d, a) for d in ("float32", "bfloat16") for a in ("eager", "sdpa")}
    assert all(p["min_cosine"] >= 0.999 for p in parity["pairs"]) and parity["ok"]

    # speeds/MFU at tiny shapes on a shared CPU are noise (the tiny matmul peak swings 10x with load): only > 0,
    # and every MFU is recomputed against the better of the two measured peaks
    s1 = r["stage1"]
    assert [run["attn"] for run in s1["runs"]] == ["sdpa", "eager"]
    for run in [*s1["runs"], *r["stage2"]["runs"].values()]:
        assert run["tokens_per_s" if "attn" in run else "images_per_s"] > 0 and run["mfu"] > 0
        assert run["mfu"] == round(run["achieved_tflops"] / r["mfu_peak_tflops"], 4) and run["mfu_spec"] is None
    assert s1["texts"] == 3 * s1["samples"] and s1["min_cosine_sdpa_vs_eager"] >= 0.99

    # the facet mask the encoder passes (additive, [B, 1, T, T]) runs torch's CPU flash kernel, never math
    k = s1["sdpa_kernel"]
    assert k["used"] == ["flash"] and k["ok"] is True
    assert len(k["call"]["mask"]) == 4 and k["call"]["mask"][1] == 1 and k["call"]["mask"][2] == k["call"]["mask"][3]
    assert {row["kernel"]: row["works"] for row in k["alone"]} == {
        "flash": True, "efficient": False, "cudnn": False, "math": True}

    s2 = r["stage2"]
    assert set(s2["runs"]) == {"ours", "plain timm + projector"} and s2["ours_vs_plain"] > 0
    assert s2["pinned_host_batch"] is False  # pinned on CUDA only
    fp = s2["forward_parity"]
    assert fp["images"] == 4 and fp["ok"] and 0.99 <= fp["min_cosine"] < 1.0  # bf16 autocast differs from fp32
    lp = s2["loss_parity"]
    assert lp["ok"] and lp["device"] == lp["cpu"]  # on the CPU both sides run the same code: exactly equal

    assert r["checks"] == {"stage-1 parity": True, "SDPA fused kernel with the facet mask": True,
                           "stage-1 SDPA vs eager cosine": True, "stage-2 forward, device vs cpu fp32": True,
                           "stage-2 loss, device vs cpu": True}
    assert r["targets"] == {}  # the MFU / ratio targets are for the full shapes only
    assert "| sdpa |" in proc.stdout and "| ours |" in proc.stdout and "checks: stage-1 parity ok" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("argv", [[], ["--device", "cuda"], ["--tiny", "--device", "cuda"]])
def test_without_cuda_a_gpu_run_stops_at_once_with_one_line(argv, tmp_path, capsys):
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as stop:
        gpu_check.main([*argv, "--json", str(out)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpu_check: ") and "--tiny" in err and "--device cpu" in err
    assert not out.exists()


def test_device_resolution():
    assert gpu_check.resolve_device(None, tiny=True) == torch.device("cpu")
    assert gpu_check.resolve_device("cpu", tiny=False) == torch.device("cpu")  # forced: the full shapes on the CPU


def test_datasheet_peaks_by_gpu_name():
    spec = gpu_facts.spec_peak_tflops
    assert spec("NVIDIA H100 80GB HBM3") == 989.0  # the SXM part
    assert spec("NVIDIA H200") == 989.0
    assert spec("NVIDIA H100 PCIe") == 756.0 and spec("NVIDIA H100 NVL") == 835.0
    assert spec("NVIDIA A100-SXM4-80GB") == 312.0
    assert spec("NVIDIA GeForce RTX 4090") is None and spec(None) is None
    assert gpu_facts.mfu(494.5, 989.0) == 0.5 and gpu_facts.mfu(1.0, None) is None


def _attention(force_math: bool):
    q = torch.randn(2, 4, 16, 32)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, :, 12:] = torch.finfo(mask.dtype).min  # an additive 4-D mask, as the encoder builds it

    def run():
        if force_math:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.MATH]):
                return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)

    return run


def test_sdpa_report_fails_when_the_math_kernel_ran():
    cpu = torch.device("cpu")
    original = torch.nn.functional.scaled_dot_product_attention
    good = gpu_facts.sdpa_report(_attention(force_math=False), cpu)
    assert good["used"] == ["flash"] and good["ok"] and good["call"]["mask"] == [2, 1, 16, 16]
    bad = gpu_facts.sdpa_report(_attention(force_math=True), cpu)
    assert bad["used"] == ["math"] and bad["ok"] is False and bad["fused_working"] == ["flash"]
    none = gpu_facts.sdpa_report(lambda: None, cpu)
    assert none["ok"] is False and none["used"] == [] and none["alone"] == []
    q = torch.randn(1, 2, 8, 16)
    bound = gpu_facts.sdpa_report(lambda: original(q, q, q, attn_mask=torch.zeros(1, 1, 8, 8)), cpu)
    assert bound["used"] == ["flash"] and bound["ok"] and bound["alone"] == [] and "profiler" in bound["note"]
    assert torch.nn.functional.scaled_dot_product_attention is original  # the spy is removed again


def _result(cosine: float, forward_ok: bool = True) -> dict:
    run = {"achieved_tflops": 2.0, "mfu": None, "mfu_spec": None}
    return {"tiny": False, "machine": {"device": "cuda:0", "spec_peak_tflops": 4.0}, "matmul_peak_tflops": 3.0,
            "stage1_parity": {"ok": True},
            "stage1": {"runs": [dict(run, attn="sdpa")], "min_cosine_sdpa_vs_eager": cosine,
                       "sdpa_kernel": {"ok": True}},
            "stage2": {"runs": {"ours": dict(run)}, "forward_parity": {"ok": forward_ok}, "loss_parity": {"ok": True},
                       "pinned_host_batch": True, "ours_vs_plain": 0.7}}


def test_finish_recomputes_mfu_and_fails_on_a_low_full_shape_cosine():
    r = _result(0.995)
    gpu_check.finish(r, peak_end=3.5e12)
    assert r["ok"] and r["mfu_peak_tflops"] == 3.5 and r["matmul_peak_end_tflops"] == 3.5
    assert r["stage1"]["runs"][0]["mfu"] == round(2.0 / 3.5, 4) and r["stage1"]["runs"][0]["mfu_spec"] == 0.5
    assert r["targets"] == {"stage-1 MFU >= 50 % of the datasheet peak": True, "stage-2 ours >= 0.6 x plain timm": True}
    assert r["checks"]["stage-2 batch pinned"] is True
    low = _result(0.98)
    gpu_check.finish(low, peak_end=1e12)
    assert low["ok"] is False and low["checks"]["stage-1 SDPA vs eager cosine"] is False
    assert low["mfu_peak_tflops"] == 3.0  # the start peak was the better one
    drift = _result(0.999, forward_ok=False)
    gpu_check.finish(drift, peak_end=1e12)
    assert drift["ok"] is False and drift["checks"]["stage-2 forward, device vs cpu fp32"] is False
