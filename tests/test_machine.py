"""pipeline.machine: what every benchmark prints beside its numbers."""

from pipeline import machine


def test_cpu_info_reads_model_and_only_the_matmul_flags(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse avx2 amx_bf16 amx_tile\n")
    real_path = machine.Path
    monkeypatch.setattr(machine, "Path", lambda p: real_path(cpuinfo) if p == "/proc/cpuinfo" else real_path(p))
    monkeypatch.setattr(machine, "logical_cores", lambda: 2)
    info = machine.cpu_info()
    assert info == {"model": "Test CPU 9000", "flags": ["avx2", "amx_bf16", "amx_tile"], "logical_cores": 2}
    assert machine.cpu_summary(info) == "Test CPU 9000 [avx2 amx_bf16 amx_tile], 2 cores"
    assert machine.cpu_summary(info | {"flags": []}) == "Test CPU 9000 [no avx2/avx512/amx], 2 cores"
