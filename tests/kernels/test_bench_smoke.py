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


def test_swiglu_liger_rows_for_both_ops(tmp_path, monkeypatch):
    """bench_swiglu compares with Liger's separate and fused gate-up ops; where Liger cannot
    run (CPU) each gets an "error" row instead of stopping the run."""
    pytest.importorskip("liger_kernel")
    monkeypatch.syspath_prepend(REPO)
    bench = importlib.import_module("benchmarks.bench_swiglu")
    out = tmp_path / "s.json"
    bench.main(["--quick", "--impls", "megacpt", "liger", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    liger = [r for r in rows if r["impl"] == "liger"]
    assert {r["op"] for r in liger} == {"swiglu", "swiglu_fused"}
    assert all(("ms" in r) != ("error" in r) for r in liger)
    assert {r["op"] for r in rows if r["impl"] == "megacpt"} == {"swiglu", "swiglu_fused"}
