"""Stop signals as schedulers send them: to the process group (DataLoader workers included),
during start-up, SIGINT once (save) and twice (abort at once), and through torchrun."""
import json
import os
import signal
import subprocess
import sys

import pytest

from megacpt.training.signals import PreemptionHandler
from _train_helpers import (mock_args, output, printed, signal_when, start_cli, train_rows,
                            wait_until)


def _tracker(ck: str) -> int:
    return int(open(f"{ck}/latest_checkpointed_iteration.txt").read())


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_signal_to_process_group_with_loader_workers_saves_and_exits_zero(tmp_path, sig):
    """The whole group gets the signal (what schedulers do), the loader worker too: the
    worker must ignore it and the trainer save at the next step boundary, exit 0."""
    ck, logs = str(tmp_path / "ck"), str(tmp_path / "log")
    argv = mock_args("--save", ck, "--log-dir", logs, "--num-workers", "1", iters=3000)
    proc, out = signal_when(argv, lambda _: train_rows(logs), sig, group=True)
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "DataLoader worker" not in out, out
    assert f"stopped by {sig}" in out, out
    saved = _tracker(ck)
    assert saved == train_rows(logs)[-1]["iteration"] and 0 < saved < 3000


def test_signal_during_start_up_exits_zero_before_the_first_step(tmp_path):
    logs = str(tmp_path / "log")
    proc, out = signal_when(mock_args("--log-dir", logs, iters=3000),
                            lambda p: printed(p, "megacpt.train starting"), what="start-up")
    assert proc.returncode == 0 and "before the first step" in out, out
    assert "Traceback" not in out and not train_rows(logs)


def test_second_sigint_aborts_at_once(tmp_path):
    ck = str(tmp_path / "ck")
    proc = start_cli(mock_args("--save", ck, iters=3000))
    try:
        wait_until(lambda: printed(proc, "megacpt.train starting"), [proc], what="start-up")
        proc.send_signal(signal.SIGINT)
        wait_until(lambda: printed(proc, "received SIGINT"), [proc], what="the first SIGINT")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = output(proc)
    assert proc.returncode == 130, out
    assert "aborted by a second SIGINT" in out and "Traceback" not in out, out
    assert not os.path.exists(f"{ck}/latest_checkpointed_iteration.txt")


def test_handler_second_sigint_raises_keyboard_interrupt():
    with PreemptionHandler() as h:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # the first SIGINT only sets the flag
        assert h.should_stop() and h.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass


def test_second_sigint_during_shutdown_still_ends_in_one_line_and_130():
    """Once the handler's scope is left after a first SIGINT, a second one (while the
    interpreter shuts down) exits 130 with our line instead of an uncaught KeyboardInterrupt."""
    code = ("import os, signal\nfrom megacpt.training.signals import PreemptionHandler\n"
            "with PreemptionHandler(abort_after_first_sigint=True):\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "os.kill(os.getpid(), signal.SIGINT)\nfor _ in range(10**6):\n    pass\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130, (r.returncode, r.stderr)
    assert "aborted by a second SIGINT" in r.stderr and "Traceback" not in r.stderr, r.stderr
    with PreemptionHandler(abort_after_first_sigint=True):  # no SIGINT: the old one is back
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with PreemptionHandler() as h:  # library use (Trainer.run) never installs the abort
        h._handle(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _torchrun(argv: list, rank_logs: str):
    """`torchrun --nproc-per-node 2 -m megacpt.train ARGV`, each rank's output in
    `rank_logs`; the launcher's merged output on proc.stdout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "--log-dir", rank_logs, "--redirects", "3", "-m", "megacpt.train", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_sigterm_to_torchrun_saves_on_every_rank(tmp_path):
    """SIGTERM to the launcher: torchrun forwards it to each rank's process group; both ranks
    save the same step and exit 0, with no traceback from any rank."""
    ck, logs, rank_logs = str(tmp_path / "ck"), str(tmp_path / "log"), str(tmp_path / "ranks")
    argv = mock_args("--save", ck, "--log-dir", logs, "--num-workers", "1", iters=3000)
    proc = _torchrun(argv, rank_logs)
    try:
        wait_until(lambda: train_rows(logs), [proc], what="the first step")
        proc.send_signal(signal.SIGTERM)
        launcher_out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    ranks = {}
    for root, _, files in os.walk(rank_logs):
        for f in files:
            if f in ("stdout.log", "stderr.log"):
                ranks.setdefault(os.path.basename(root), "")
                ranks[os.path.basename(root)] += open(os.path.join(root, f)).read()
    assert len(ranks) == 2, (launcher_out, ranks)
    for name, text in ranks.items():
        assert "Traceback" not in text and "DataLoader worker" not in text, (name, text)
    assert "stopped by SIGTERM" in "".join(ranks.values()), ranks
    saved = _tracker(ck)
    assert saved == train_rows(logs)[-1]["iteration"]
    meta = json.load(open(f"{ck}/iter_{saved:07d}/meta.json"))
    assert sorted(meta["checksums"]["files"]) == [
        "mp_rank_00_000/model.safetensors", "mp_rank_00_000/optimizer.pt",
        "mp_rank_00_000/optimizer.safetensors", "rng/rank_0.pt", "rng/rank_1.pt"]


def test_dead_rank_under_torchrun_gives_the_dead_rank_message(tmp_path):
    """kill -9 of one rank: torchrun SIGTERMs the survivor's process group (its loader worker
    included); the survivor must stop with the project's one-line message, no traceback."""
    logs, rank_logs = str(tmp_path / "log"), str(tmp_path / "ranks")
    argv = mock_args("--log-dir", logs, "--num-workers", "1", "--distributed-timeout-minutes",
                     "0.5", iters=3000)
    proc = _torchrun(argv, rank_logs)
    try:
        wait_until(lambda: train_rows(logs), [proc], what="the first step")
        victim = _rank_pid(proc.pid, 1)
        os.kill(victim, signal.SIGKILL)
        launcher_out, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
    survivor = _rank_output(rank_logs, 0)
    assert "Traceback" not in survivor, survivor
    assert "another rank probably died" in survivor or "stopped by SIGTERM" in survivor, \
        (survivor, launcher_out)


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of local rank `rank` among the launcher's children (from /proc)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = open(f"/proc/{pid}/stat").read()
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == launcher and f"LOCAL_RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no rank {rank} under launcher {launcher}")


def _rank_output(rank_logs: str, rank: int) -> str:
    text = ""
    for root, _, files in os.walk(rank_logs):
        if os.path.basename(root) == str(rank):
            for f in files:
                if f.endswith(".log"):
                    text += open(os.path.join(root, f)).read()
    return text
