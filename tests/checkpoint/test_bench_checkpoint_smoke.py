"""Smoke-run benchmarks/bench_checkpoint.py on the tiny shape so it can't rot."""
import importlib
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tiny_run_writes_sync_and_async_rows(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(REPO)
    bench = importlib.import_module("benchmarks.bench_checkpoint")
    out = tmp_path / "ckpt.json"
    assert bench.main(["--sizes", "tiny", "--repeats", "1", "--device", "cpu",
                       "--workdir", str(tmp_path / "w"), "--out", str(out)]) == str(out)
    row = json.loads(out.read_text())["rows"][0]
    assert row["size"] == "tiny" and row["checkpoint_gb"] > 0
    assert row["sync_blocked_s"] > 0 and row["async_blocked_s"] > 0 and row["load_gbps"] > 0
    assert not os.path.exists(tmp_path / "w" / "tiny")  # cleaned up


def test_reshard_memory_bench_reports_bytes_and_peak_per_rank(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(REPO)
    bench = importlib.import_module("benchmarks.bench_reshard_memory")
    out = tmp_path / "reshard.json"
    bench.main(["--size", "tiny", "--cases", "tp2->tp1", "--workdir", str(tmp_path / "w"),
                "--out", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    assert row["case"] == "tp2->tp1" and row["tensor_mb_read"] == row["part_mb"] > 0
    assert row["all_mb_read"] >= row["tensor_mb_read"] and row["load_peak_extra_mb"] > 0
    assert not os.path.exists(tmp_path / "w")
