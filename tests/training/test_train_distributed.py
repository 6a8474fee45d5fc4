"""Multi-process CPU tests: exact resume under tp2pp2 (+ sequence parallel), the layout
mismatch error, and a rank that dies or hangs (the survivor stops with a clear error in bounded
time: a closed connection fails the collective at once, a silent peer trips the process-group
timeout or the trainer's watchdog).
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from megacpt.config import ConfigError
from _harness import free_port, run_distributed
from megacpt.training.loop import train
from megacpt.training.metrics import read_metrics
from _train_helpers import config, mock_args


def _resume_worker(root: str) -> dict:
    """Runs on each of 4 ranks: uninterrupted tp2pp2 run vs. exit at 2 + resume."""
    import torch

    torch.set_num_threads(1)
    layout = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
              "--sequence-parallel", "--data-path", "0.7", "zh", "0.3", "en"]
    full = train(*config(mock_args(*layout, iters=4)))
    ck, logs = f"{root}/ck", f"{root}/log"
    run = mock_args(*layout, "--save", ck, "--log-dir", logs, iters=4)
    first = train(*config(run + ["--exit-interval", "2"]))
    second = train(*config(run + ["--load", ck]))
    try:  # the same checkpoint in another layout (tp2 pp1 dp2) is resharded on load
        train(*config(mock_args("--tensor-model-parallel-size", "2", "--data-path", "0.7",
                                 "zh", "0.3", "en", "--load", ck, iters=4)))
        mismatch = None
    except ConfigError as e:
        mismatch = str(e)
    return {"full": full.losses, "first": first.losses, "second": second.losses,
            "reason": first.reason, "mismatch": mismatch}


def test_exact_resume_tp2pp2(tmp_path):
    results = run_distributed(_resume_worker, 4, str(tmp_path), timeout=240)
    for r in results:  # every rank agrees on every loss
        assert r["full"] == results[0]["full"]
    r = results[0]
    assert r["reason"] == "exit_interval" and sorted(r["second"]) == [3, 4]
    assert {**r["first"], **r["second"]} == r["full"]  # bit-exact continuation
    rows = read_metrics(f"{tmp_path}/log", "train")
    assert [row["iteration"] for row in rows] == [1, 2, 3, 4]
    assert read_metrics(f"{tmp_path}/log", "header")[0]["layout"] == "tp2pp2dp1"
    assert r["mismatch"] is None  # another layout resumes (tests/checkpoint/test_ckpt_reshard.py)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_dead_rank_gives_clear_error_in_bounded_time(tmp_path, how):
    """Rank 1 dies (SIGKILL) or hangs (SIGSTOP) mid-training; rank 0 must stop with a clear
    error within about the process-group timeout (30 s here) instead of hanging."""
    logs = str(tmp_path / "log")
    argv = mock_args("--log-dir", logs, "--distributed-timeout-minutes", "0.5", iters=3000)
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "megacpt.train", *argv], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    try:
        deadline = time.monotonic() + 180
        while not (os.path.exists(f"{logs}/metrics.jsonl") and read_metrics(logs, "train")):
            assert all(p.poll() is None for p in procs), procs[0].stdout.read()
            assert time.monotonic() < deadline, "training did not start within 180 s"
            time.sleep(0.2)
        procs[1].send_signal(getattr(signal, how))
        # a hang fails here: the survivor must stop well within this bound (pg timeout 30 s)
        out, _ = procs[0].communicate(timeout=150)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 1, out
    assert "another rank probably died" in out, out
    assert "rank 0: a collective failed" in out or "rank 0: no progress for" in out, out
