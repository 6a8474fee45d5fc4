"""--async-save in the trainer: SIGTERM while saves are in flight still leaves the signalled
step's checkpoint published (the in-flight save finished first), nothing half-written, and
--keep-last-checkpoints applied; losses do not depend on how checkpoints are written."""
import os

from megacpt.checkpoint.format import read_tracker
from megacpt.training.loop import train
from megacpt.training.metrics import read_metrics
from _train_helpers import config, mock_args, signal_when, train_rows


def test_async_saves_give_the_same_losses_and_checkpoints(tmp_path):
    sync = train(*config(mock_args("--save", str(tmp_path / "s"), "--save-interval", "2",
                                   iters=4)))
    asyn = train(*config(mock_args("--save", str(tmp_path / "a"), "--save-interval", "2",
                                   "--async-save", "--keep-last-checkpoints", "1", iters=4)))
    assert asyn.losses == sync.losses
    assert read_tracker(str(tmp_path / "a")) == 4
    assert sorted(os.listdir(tmp_path / "a")) == ["iter_0000004",
                                                  "latest_checkpointed_iteration.txt"]
    for name in ("model.safetensors", "optimizer.safetensors"):
        a = tmp_path / "a" / "iter_0000004" / "mp_rank_00_000" / name
        s = tmp_path / "s" / "iter_0000004" / "mp_rank_00_000" / name
        assert a.read_bytes() == s.read_bytes(), name


def test_sigterm_finishes_the_async_save_in_flight(tmp_path):
    ck, logs = str(tmp_path / "ck"), str(tmp_path / "log")
    argv = mock_args("--save", ck, "--log-dir", logs, "--save-interval", "1", "--async-save",
                     "--keep-last-checkpoints", "2", iters=3000)
    proc, out = signal_when(argv, lambda _: len(train_rows(logs)) >= 3, what="the third step")
    assert proc.returncode == 0, out
    saved = read_tracker(ck)
    assert saved == read_metrics(logs, "train")[-1]["iteration"], out
    assert sorted(os.listdir(ck)) == [f"iter_{saved - 1:07d}", f"iter_{saved:07d}",
                                      "latest_checkpointed_iteration.txt"], out
    assert os.path.isfile(f"{ck}/iter_{saved:07d}/meta.json")
