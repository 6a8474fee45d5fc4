"""metrics.jsonl rows and resume truncation, console line, signal flag, non-finite counting."""
import json
import math
import os
import signal

import pytest
import torch

from megacpt.training.faults import (DeadRankError, NonFiniteError, NonFiniteTracker,
                                     PreemptionHandler, collective_guard)
from megacpt.training.metrics import (MetricsLogger, Throughput, console_line, peak_flops,
                                      read_metrics)


def test_metrics_rows_and_truncate(tmp_path):
    m = MetricsLogger(str(tmp_path), tensorboard=False)
    m.header(model_size="tiny", num_parameters=10, run_kind="scratch", blend={"zh": 1.0},
             seq_length=8, flops_per_token=60.0, init_from=None, target="zh")
    for it in range(1, 6):
        m.train(iteration=it, lm_loss=float("nan") if it == 2 else 1.0 / it, lr=0.1,
                grad_norm=None, consumed_tokens=8 * it, flops=480.0 * it,
                consumed_samples_per_dataset={"zh": it}, tokens_per_sec=1.0, skipped_steps=0)
        m.valid("zh", it, 2.0, 8 * it, 480.0 * it)
    rows = read_metrics(str(tmp_path))
    assert [r["type"] for r in rows[:3]] == ["header", "train", "valid"]
    assert rows[3]["lm_loss"] is None  # NaN is written as null: strict JSON
    assert rows[2] == {**rows[2], "split": "valid", "name": "zh", "iteration": 1, "loss": 2.0}
    assert m.truncate_after(3) == 4
    kept = read_metrics(str(tmp_path))
    assert kept[0]["type"] == "header"
    assert max(r["iteration"] for r in kept[1:]) == 3 and len(kept) == 7
    assert m.has_header()
    for line in open(tmp_path / "metrics.jsonl"):
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))


def test_tensorboard_scalars_when_installed(tmp_path, monkeypatch):
    """With tensorboard importable, the same numbers also go to a SummaryWriter."""
    import sys
    import types

    calls = []

    class FakeWriter:
        def __init__(self, log_dir):
            calls.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def close(self):
            calls.append(("closed",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=FakeWriter))
    m = MetricsLogger(str(tmp_path), tensorboard=True)
    m.train(iteration=3, lm_loss=2.5, lr=0.1, grad_norm=float("nan"), consumed_tokens=96,
            tokens_per_sec=10.0)
    m.valid("en", 3, 3.5, 96, 1.0)
    m.close()
    assert calls[0] == ("dir", str(tmp_path / "tensorboard"))
    assert ("train/lm_loss", 2.5, 3) in calls and ("train/lm_loss_vs_tokens", 2.5, 96) in calls
    assert ("valid/en", 3.5, 3) in calls and ("valid_vs_tokens/en", 3.5, 96) in calls
    assert not any(c[0] == "train/grad_norm" for c in calls)  # non-finite values are left out
    assert calls[-1] == ("closed",)


def test_metrics_disabled_on_other_ranks(tmp_path):
    m = MetricsLogger(str(tmp_path), enabled=False)
    m.header(x=1)
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_read_metrics_names_bad_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"type": "header"}\n{oops\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(str(p))


def test_throughput_and_console_line():
    tp = Throughput(flops_per_token=1e6, world_size=2, peak_flops=None, train_iters=100)
    tp.start(0, 0)
    rates = tp.interval(10, 10_000)
    assert rates["mfu"] is None and rates["tokens_per_sec"] > 0
    assert rates["tflops_per_device"] == pytest.approx(
        rates["tokens_per_sec"] * 1e6 / 2 / 1e12)
    line = console_line(10, 100, 2.5, 1e-4, 0.75, rates, 1)
    for part in ("iter", "loss 2.5000", "lr 1.000e-04", "grad norm 0.750", "tok/s",
                 "TFLOP/s/dev", "MFU n/a", "ETA", "skipped 1"):
        assert part in line
    assert peak_flops(torch.device("cpu")) is None
    tp2 = Throughput(1e6, 1, peak_flops=2e12, train_iters=10)
    r2 = tp2.interval(1, 1000)
    assert r2["mfu"] == pytest.approx(r2["tflops_per_device"] * 1e12 / 2e12)


def test_nonfinite_tracker_counts_and_stops():
    tr = NonFiniteTracker(max_consecutive=3)
    tr.record(1, False, 2.0, 1.0, None)
    tr.record(2, True, math.nan, None, "/ck/iter_0000001")
    tr.record(3, False, 2.0, 1.0, None)
    assert (tr.total, tr.consecutive) == (1, 0)
    tr.record(4, True, math.inf, None, None)
    tr.record(5, True, 2.0, math.nan, None)
    with pytest.raises(NonFiniteError, match=r"step 6: 3 consecutive.*iter_0000004"):
        tr.record(6, True, math.nan, math.nan, "/ck/iter_0000004")
    assert tr.total == 4
    assert not NonFiniteTracker.finite(1.0, None) and NonFiniteTracker.finite(1.0, 2.0)


def test_preemption_handler_sets_flag_and_restores():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as h:
        assert not h.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert h.should_stop() and h.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before


def test_collective_guard_wraps_backend_errors_only():
    with pytest.raises(ZeroDivisionError):
        with collective_guard(0, 1.0):
            1 / 0
    # without an initialised process group, errors pass through unchanged
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        with collective_guard(0, 1.0):
            raise RuntimeError("[gloo] Connection closed by peer")
    assert issubclass(DeadRankError, RuntimeError)


def test_rng_state_roundtrip_through_weights_only_load(tmp_path):
    import random

    import numpy as np

    from megacpt.training.loop import get_rng_state, seed_everything, set_rng_state

    seed_everything(5, rank=1)
    state = get_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(3))
    seed_everything(99)  # scramble every stream
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])
    seed_everything(5, rank=0)
    assert random.random() != first[0]  # ranks get different streams


def test_watchdog_fires_only_without_progress():
    import threading
    import time

    from megacpt.training.faults import Watchdog

    fired = threading.Event()
    messages = []

    def on_timeout(msg):
        messages.append(msg)
        fired.set()

    with Watchdog(0.6, rank=3, on_timeout=on_timeout) as wd:
        for i in range(6):  # regular progress keeps it quiet
            wd.beat(f"step {i}")
            time.sleep(0.1)
        assert not fired.is_set()
        wd.beat("step 7")
        assert fired.wait(timeout=30)  # then silence makes it fire
    assert "rank 3: no progress" in messages[0] and "during step 7" in messages[0]
    with Watchdog(0.01, rank=0, enabled=False, on_timeout=on_timeout) as wd:
        time.sleep(0.1)  # a disabled watchdog (single process) never fires
    assert len(messages) == 1
