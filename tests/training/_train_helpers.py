"""Helpers of the trainer tests: a tiny on-disk corpus and CLI words for tiny runs.

The corpus is built with the data engineer's `IndexedDatasetBuilder` from seeded random
tokens (no tokenizer).
"""
import os

import numpy as np

from megacpt.arguments import parse_args

VOCAB = 300


def write_indexed(prefix: str, docs: list, dtype=np.uint16) -> str:
    from megacpt.data.indexed import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        b.add_item(d)
        b.end_document()
    b.finalize(prefix + ".idx")
    return prefix


def random_docs(seed: int, n: int, vocab: int = VOCAB, lo: int = 20, hi: int = 80):
    """n documents of lo..hi tokens: random walks whose steps are one of 4 offsets (fixed per
    seed), so a model can learn them (loss floor log 4)."""
    rng = np.random.default_rng(seed)
    offsets = rng.integers(1, vocab, size=4)
    docs = []
    for _ in range(n):
        length = int(rng.integers(lo, hi))
        steps = offsets[rng.integers(4, size=length - 1)]
        docs.append((rng.integers(vocab) + np.concatenate(([0], np.cumsum(steps)))) % vocab)
    return docs


def build_corpus(root: str) -> dict:
    """{"zh", "en", "zh_valid", "en_valid"} -> dataset prefix under `root`."""
    out = {}
    for name, n, seed in [("zh", 120, 1), ("en", 120, 2), ("zh_valid", 20, 1),
                          ("en_valid", 20, 2)]:  # a valid set shares its language's walk
        docs = random_docs(seed, n + (120 if name.endswith("valid") else 0))
        out[name] = write_indexed(os.path.join(root, f"{name}_text_document"), docs[-n:])
    return out


def tiny_args(*extra: str, iters: int = 6) -> list:
    """CLI words for a tiny fp32 CPU run of `iters` steps (add data flags)."""
    return ["--model-size", "tiny", "--vocab-size", str(VOCAB), "--seq-length", "16",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(iters),
            "--lr", "3e-3", "--eval-iters", "2", "--eval-interval", "1000",
            "--log-interval", "1000", "--num-workers", "0", "--attention-backend", "eager",
            "--no-tensorboard", *extra]


def mock_args(*extra: str, iters: int = 6) -> list:
    return tiny_args("--mock-data", *extra, iters=iters)


def real_args(corpus: dict, *extra: str, iters: int = 6) -> list:
    return tiny_args("--data-path", "0.7", f"zh={corpus['zh']}", "0.3", f"en={corpus['en']}",
                     "--valid-data-path", f"zh={corpus['zh_valid']}", f"en={corpus['en_valid']}",
                     "--split", "100,0,0", *extra, iters=iters)


def config(argv):
    return parse_args(argv)


# ----- the trainer's CLI in subprocesses (signal, disk and chaos tests) -----

def start_cli(argv: list, rank: int = 0, world: int = 1, port: int | None = None,
              new_session: bool = False, preexec_fn=None, env: dict | None = None):
    """`python -m megacpt.train ARGV` as rank `rank` of `world` (env:// variables, like
    torchrun sets them); its merged output is collected line by line in `proc.lines`."""
    import subprocess
    import sys
    import threading

    extra = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if world > 1:
        extra.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                     LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(port))
    proc = subprocess.Popen([sys.executable, "-m", "megacpt.train", *argv],
                            env={**os.environ, **extra, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=new_session, preexec_fn=preexec_fn)
    proc.lines = []

    def read():
        for line in proc.stdout:
            proc.lines.append(line)

    proc.reader = threading.Thread(target=read, daemon=True)
    proc.reader.start()
    return proc


def output(proc) -> str:
    proc.reader.join(timeout=30)
    return "".join(proc.lines)


def wait_until(cond, procs, timeout: float = 180, what: str = "the condition"):
    """Poll `cond()` every 10 ms; fail early if a process ends first."""
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        for p in procs:
            assert p.poll() is None, f"process ended (rc {p.returncode}) before {what}:\n" \
                                     + output(p)
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def printed(proc, text: str) -> bool:
    return any(text in line for line in list(proc.lines))


def train_rows(logs: str) -> list:
    from megacpt.training.metrics import read_metrics

    path = os.path.join(logs, "metrics.jsonl")
    return read_metrics(logs, "train") if os.path.exists(path) else []


def signal_when(argv: list, ready, sig: str = "SIGTERM", what: str = "the first step",
                group: bool = False, timeout: float = 120):
    """Start the trainer CLI with `argv`, wait until `ready(proc)`, send it `sig` (to its
    whole process group, loader workers included, with `group`), wait for it to end; killed
    if still running. Returns (proc, its merged output)."""
    import signal

    proc = start_cli(argv, new_session=group)
    try:
        wait_until(lambda: ready(proc), [proc], what=what)
        if group:
            os.killpg(proc.pid, getattr(signal, sig))
        else:
            proc.send_signal(getattr(signal, sig))
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
    return proc, output(proc)


def nan_loss_streak(ck: str, save_interval: int, max_nonfinite: int, match: str) -> None:
    """Train 8 tiny steps saving to `ck` every `save_interval`, the loss NaN from step 3 on:
    the run must stop with NonFiniteError matching `match` after `max_nonfinite` in a row."""
    import pytest

    from megacpt.training.faults import NonFiniteError
    from megacpt.training.loop import Trainer

    cfg, opts = config(mock_args("--save", ck, "--save-interval", str(save_interval),
                                 "--max-nonfinite-steps", str(max_nonfinite), iters=8))
    cbs = {"after_backward": lambda tr, it, loss: float("nan") if it >= 3 else None}
    with pytest.raises(NonFiniteError, match=match):
        Trainer(cfg, opts, callbacks=cbs).run()
