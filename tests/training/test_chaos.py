"""Chaos: kill -9 at random moments (some inside saves), resume, and end bit-identical to the
uninterrupted run: every checkpoint file (model, optimizer, each rank's RNG streams) and
every loss.

One process and two ranks (dp2), each killed several times: after a random delay from the
launch (start-up, resume, training or a save, wherever it falls), after a random number of
new steps, or as soon as a save's temporary directory appears. Each time the job is then
started again with `--load`, like a scheduler requeueing it. The moments are drawn from a
seeded generator (MEGACPT_CHAOS_SEED, printed on failure); MEGACPT_CHAOS_KILLS raises the
number of kills per layout for a longer soak run (default 6 + 4, about a minute of CI).
With `--async-save` (one process, 4 kills): a kill while the background writer runs leaves
the previous checkpoint usable, and the run still ends with the files (checksums recorded
by the writer) of the synchronous reference run.
"""
import json
import os
import random
import signal
import time

import pytest

from _harness import free_port
from megacpt.training.metrics import read_metrics
from _train_helpers import mock_args, output, start_cli, train_rows, wait_until

ITERS = 30
KILLS = {1: 6, 2: 4, "async": 4}  # per layout; MEGACPT_CHAOS_KILLS=N sets all
if os.environ.get("MEGACPT_CHAOS_KILLS"):
    KILLS = {w: int(os.environ["MEGACPT_CHAOS_KILLS"]) for w in KILLS}
SEED = int(os.environ.get("MEGACPT_CHAOS_SEED", "14"))


def _argv(root: str, extra: tuple = ()) -> list:
    return mock_args(*extra, "--save", f"{root}/ck", "--load", f"{root}/ck", "--log-dir", f"{root}/log",
                     "--save-interval", "1", "--data-path", "0.7", "zh", "0.3", "en",
                     "--eval-interval", "5", iters=ITERS)


def _launch(root: str, world: int, extra: tuple = ()) -> list:
    port = free_port() if world > 1 else None
    return [start_cli(_argv(root, extra), rank=r, world=world, port=port)
            for r in range(world)]


def _temp_dirs(ck: str) -> set:
    """Identities of the save temp directories in `ck` (name, inode, creation time)."""
    out = set()
    for n in os.listdir(ck) if os.path.isdir(ck) else []:
        if n.endswith(".tmp") or ".tmp-" in n:
            try:
                st = os.stat(os.path.join(ck, n))
            except FileNotFoundError:
                continue
            out.add((n, st.st_ino, st.st_ctime_ns))
    return out


def _saving(ck: str, before: set) -> bool:
    """A save has started since `before` was taken (leftovers of killed saves don't count)."""
    return bool(_temp_dirs(ck) - before)


def _finish(procs: list, timeout: float = 180) -> None:
    for p in procs:
        p.wait(timeout=timeout)
    for p in procs:
        assert p.returncode == 0, output(p)


def _kill_at_random_moment(root: str, world: int, rng: random.Random,
                           kind: str, extra: tuple = ()) -> str | None:
    """Launch, kill -9 every rank at a random moment; what the moment was (None: the run
    finished first)."""
    ck, logs = f"{root}/ck", f"{root}/log"
    done = max([r["iteration"] for r in train_rows(logs)], default=0)
    leftovers = _temp_dirs(ck)
    procs = _launch(root, world, extra)
    try:
        if kind == "delay":
            end = time.monotonic() + rng.uniform(0.0, 3.0)
            while time.monotonic() < end and all(p.poll() is None for p in procs):
                time.sleep(0.005)
        elif kind == "steps":
            n = rng.randint(1, 3)
            wait_until(lambda: len(train_rows(logs)) and train_rows(logs)[-1]["iteration"]
                       >= done + n or any(p.poll() is not None for p in procs), [],
                       what=f"{n} new steps")
        else:  # poll fast: a tiny model's save takes a few milliseconds
            while not _saving(ck, leftovers) and all(p.poll() is None for p in procs):
                time.sleep(0.0005)
        if kind != "save":
            time.sleep(rng.uniform(0.0, 0.01))
        inside_save = _saving(ck, leftovers)
        finished = all(p.poll() == 0 for p in procs)
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=60)
    if finished:
        return None
    return f"{kind}{' (inside a save)' if inside_save else ''}"


def _final_state(root: str) -> tuple[dict, dict, list]:
    it_dir = f"{root}/ck/iter_{ITERS:07d}"
    meta = json.load(open(f"{it_dir}/meta.json"))
    losses = [(r["iteration"], r["lm_loss"]) for r in read_metrics(f"{root}/log", "train")]
    return meta["checksums"]["files"], meta["state"], losses


@pytest.mark.parametrize("world,mode", [(1, "sync"), (2, "sync"), (1, "async")])
def test_kill_minus_nine_at_random_moments_then_resume_is_bit_identical(tmp_path, world, mode):
    rng = random.Random(SEED * 10 + world + (5 if mode == "async" else 0))
    extra = ("--async-save",) if mode == "async" else ()
    kills = KILLS[world if mode == "sync" else mode]
    ref, chaos = str(tmp_path / "ref"), str(tmp_path / "chaos")
    _finish(_launch(ref, world))  # the reference saves synchronously
    moments = []
    kinds = [k for _ in range(kills) for k in rng.sample(["save", "delay", "steps"], 3)]
    while len(moments) < kills:
        moment = _kill_at_random_moment(chaos, world, rng, kinds[len(moments)], extra)
        if moment is None:
            break
        moments.append(moment)
        assert not os.path.exists(f"{chaos}/ck/latest_checkpointed_iteration.txt") or \
            os.path.isdir(f"{chaos}/ck/iter_" + open(
                f"{chaos}/ck/latest_checkpointed_iteration.txt").read().strip().zfill(7))
    note = f"seed {SEED}, world {world}, {mode}, kills: {moments}"
    print(note)
    assert len(moments) == kills, f"the run finished before all kills: {note}"
    assert any("inside a save" in m for m in moments), note
    _finish(_launch(chaos, world, extra))
    files, state, losses = _final_state(chaos)
    ref_files, ref_state, ref_losses = _final_state(ref)
    assert files == ref_files, note  # every file, RNG streams included, byte for byte
    assert len(files) == 3 + world
    assert state == ref_state, note
    assert losses == ref_losses and [i for i, _ in losses] == list(range(1, ITERS + 1)), note
