"""Smoke-run each benchmark's --quick path (tiny sizes, interpreter on CPU) so they can't rot.

Results go to a tmp path, never benchmarks/results/.
"""
import importlib
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEYS = {"op", "pass", "rows", "hidden", "dtype", "impl", "ms", "gbps", "frac_of_copy_bw"}


@pytest.mark.parametrize("name,ops", [("bench_rmsnorm", {"rmsnorm"}),
                                      ("bench_swiglu", {"swiglu", "swiglu_fused"}),
                                      ("bench_rope", {"qkv_rope"}),
                                      ("bench_cross_entropy", {"cross_entropy"})])
def test_quick_run_writes_result_rows(tmp_path, monkeypatch, name, ops):
    monkeypatch.syspath_prepend(REPO)
    bench = importlib.import_module(f"benchmarks.{name}")
    out = tmp_path / f"{name}.json"
    path = bench.main(["--quick", "--out", str(out)])
    assert path == str(out)
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert {r["op"] for r in rows} == ops
    assert {r["pass"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    assert {r["impl"] for r in rows} == {"megacpt", "torch"}
    for r in rows:
        assert KEYS <= set(r), r
        assert r["ms"] > 0 and r["gbps"] > 0 and r["frac_of_copy_bw"] > 0


@pytest.mark.parametrize("name", ["bench_rmsnorm", "bench_swiglu", "bench_rope",
                                  "bench_cross_entropy", "bench_e2e", "bench_parallel_overhead"])
def test_full_run_refuses_cpu(monkeypatch, name):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    monkeypatch.syspath_prepend(REPO)
    bench = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit, match="needs a CUDA GPU; use --quick"):
        bench.main([])
