"""Smoke-run benchmarks/bench_e2e.py --quick (tiny model on CPU, megacpt and HF) with the
profiler on, so the GPU benchmark can't rot between GPU sessions."""
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
    prof = payload["profile"]
    assert prof and {p["impl"] for p in prof} == {"megacpt"}
    assert sum(p["pct"] for p in prof) <= 100.0 + 1e-6
    assert any("mm" in p["name"] for p in prof)  # the matmuls show up
    trace = tmp_path / "e2e-megacpt-mb2.trace.json.gz"
    assert json.loads(gzip.open(trace).read())["traceEvents"]
