"""Smoke-run benchmarks/bench_e2e.py --quick (tiny model on CPU, megacpt and HF) with the
profiler on, so the GPU benchmark can't rot between GPU sessions; and its robustness: a
failing or overrunning implementation is recorded in its row while the others are measured,
an empty selection is an error, file names stay plain."""
import gzip
import importlib
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEYS = {"model", "impl", "seq", "micro_batch", "tokens_per_sec", "tflops", "mfu",
        "peak_mem_gb", "ms_per_step"}


def test_quick_run_rows_and_profile(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(REPO)
    bench = importlib.import_module("benchmarks.bench_e2e")
    out = tmp_path / "e2e.json"
    assert bench.main(["--quick", "--profile", "1", "--out", str(out)]) == str(out)
    payload = json.loads(out.read_text())
    assert {"benchmark", "device", "torch", "triton", "command", "rows"} <= set(payload)
    rows = payload["rows"]
    assert [r["impl"] for r in rows] == ["megacpt", "hf"]
    for r in rows:
        assert KEYS <= set(r), r
        assert r["tokens_per_sec"] > 0 and r["seq"] == 32 and r["micro_batch"] == 2
        # one FLOPs formula for both: the ratio of TFLOP/s equals the ratio of tokens/s
        assert r["tflops"] / r["tokens_per_sec"] == pytest.approx(
            rows[0]["tflops"] / rows[0]["tokens_per_sec"])
    # interleaved (CPU default): paired comparison with hf from the same rounds
    ratio = rows[1]["ms_per_step"] / rows[0]["ms_per_step"]
    assert rows[0]["speedup_vs_hf_paired"] == pytest.approx(ratio)
    assert rows[1]["speedup_vs_hf_paired"] == 1.0
    assert all(r["min_ms"] == min(r["rep_ms"]) and r["peak_mem_gb"] > 0 for r in rows)
    prof = payload["profile"]
    assert prof and {p["impl"] for p in prof} == {"megacpt"}
    assert sum(p["pct"] for p in prof) <= 100.0 + 1e-6
    assert any("mm" in p["name"] for p in prof)  # the matmuls show up
    trace = tmp_path / "e2e-megacpt-fp32-mb2.trace.json.gz"
    assert json.loads(gzip.open(trace).read())["traceEvents"]


def _bench(monkeypatch):
    monkeypatch.syspath_prepend(REPO)
    return importlib.import_module("benchmarks.bench_e2e")


def test_failing_and_slow_impls_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    import time

    bench = _bench(monkeypatch)
    real = bench.build_step

    def build(impl, *a):
        if impl == "hf":
            raise RuntimeError("CUDA out of memory (simulated)")
        if impl == "megacpt-kernels":
            def slow():
                time.sleep(3)
                return 0.0
            return slow, "sleeps"
        return real(impl, *a)

    monkeypatch.setattr(bench, "build_step", build)
    monkeypatch.setattr(bench, "cpu_peak_bytes", lambda impl, timeout: 1 << 20)
    out = tmp_path / "e2e.json"
    bench.main(["--quick", "--impls", "hf", "megacpt-kernels", "megacpt", "--time-limit-s", "2",
                "--out", str(out)])
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["hf"]["error"].startswith("RuntimeError: CUDA out of memory")
    assert rows["megacpt-kernels"]["timed_out"] and rows["megacpt-kernels"]["error"]
    ok = rows["megacpt"]
    assert ok["error"] is None and ok["tokens_per_sec"] > 0 and ok["reps"] == 1
    assert ok["warmup_s"] > 0 and ok["build_s"] > 0 and ok["ms_per_step"] > 0


def test_empty_selection_is_an_error(monkeypatch):
    bench = _bench(monkeypatch)
    with pytest.raises(SystemExit, match="nothing selected"):
        bench.main(["--quick", "--impls"])


def test_file_names_are_plain(monkeypatch):
    bench = _bench(monkeypatch)
    assert bench.safe_name("e2e-megacpt+compile-bf16 mb4/x") == "e2e-megacpt_compile-bf16_mb4_x"
