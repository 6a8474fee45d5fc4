"""Smoke-run benchmarks/bench_parallel_overhead.py --quick (tiny model, CPU) so it can't rot;
its check that the plain copy computes the same loss as megacpt's model runs here too."""
import importlib
import json
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_run_writes_rows(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(REPO)
    bench = importlib.import_module("benchmarks.bench_parallel_overhead")
    out = tmp_path / "overhead.json"
    assert bench.main(["--quick", "--out", str(out)]) == str(out)
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["megacpt", "plain", "overhead"]
    for r in rows[:2]:
        assert r["ms"] > 0 and r["tokens_per_sec"] > 0 and r["seq"] == 32
    assert rows[2]["pct"] == pytest.approx(100 * (rows[0]["ms"] / rows[1]["ms"] - 1))


def test_plain_copy_has_no_parallel_layers(monkeypatch):
    monkeypatch.syspath_prepend(REPO)
    bench = importlib.import_module("benchmarks.bench_parallel_overhead")
    from megacpt.model import LlamaModel
    from megacpt.parallel import layers
    from _harness import tiny_model_config

    model = LlamaModel(tiny_model_config(num_layers=1), seed=3)
    plain = bench.plain_copy(model)
    kinds = (layers.ColumnParallelLinear, layers.RowParallelLinear,
             layers.VocabParallelEmbedding)
    assert not any(isinstance(m, kinds) for m in plain.modules())
    tokens = torch.randint(0, 200, (2, 16))
    torch.testing.assert_close(bench.plain_loss(plain, tokens, tokens), model(tokens, tokens))
