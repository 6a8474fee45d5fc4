"""Preemption and interrupt signals: stop at the next step boundary, save, exit 0.

Schedulers (SLURM, Kubernetes) and `torchrun` stop a job by sending SIGTERM (SLURM can be
told to send SIGUSR1 first) to the trainer, to its whole process group, or to the launcher,
which forwards it to every rank's process group. What happens here:

- `PreemptionHandler` (installed by `megacpt.train.main` before anything else is imported,
  so a signal during start-up is not lost, and again by `Trainer.run` when used from Python)
  turns SIGTERM, SIGUSR1 and the first SIGINT into a flag. The loop asks `should_stop()` once
  per step, which agrees over all ranks (max over the world), then saves a checkpoint and
  returns normally, so every rank exits 0. A signal that arrives before the first step stops
  the run before it (nothing new to save).
- A second SIGINT (Ctrl-C twice) raises `KeyboardInterrupt` at once: the user wants out now;
  the CLI reports it in one line and exits 130 without saving.
- DataLoader worker processes ignore all three signals (`megacpt.data.loader`'s
  `worker_init_fn`): a signal to the process group reaches them too, and a worker killed
  by it would take the main process down with a "DataLoader worker is killed" error
  before it could save. They end when the main process closes the loader or exits.

This module imports neither torch nor anything heavy at the top, so it can be installed
first; `should_stop` imports torch.distributed only when it is called.
"""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("megacpt.train")

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PreemptionHandler:
    """Context manager turning preemption signals into a flag the loop checks each step."""

    def __init__(self, signals=PREEMPTION_SIGNALS, abort_after_first_sigint: bool = False):
        self.signals = tuple(signals)
        self.abort_after_first_sigint = abort_after_first_sigint
        """CLI only: after a first SIGINT, leaving the scope installs `abort_now` for SIGINT
        (a second Ctrl-C during shutdown exits 130 with one line, not a traceback)."""
        self.received: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame):  # noqa: ARG002 - signal handler signature
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt("second SIGINT: aborting without saving")
        if self.received is None:
            extra = " (press Ctrl-C again to abort without saving)" \
                if signum == signal.SIGINT else ""
            log.warning("received %s: will save a checkpoint and exit at the next step "
                        "boundary%s", signal.Signals(signum).name, extra)
        if self.received is None or signum == signal.SIGINT:
            self.received = signum

    def __enter__(self) -> "PreemptionHandler":
        if threading.current_thread() is not threading.main_thread():
            log.warning("not on the main thread: preemption signals are not handled")
            return self
        for s in self.signals:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            if s == signal.SIGINT and self.abort_after_first_sigint and \
                    self.received == signal.SIGINT:
                old = abort_now  # Ctrl-C pressed once and the CLI is winding down
            signal.signal(s, old)
        self._old.clear()

    def should_stop(self, group=None) -> bool:
        """True on every rank when any rank received a signal (a collective when distributed)."""
        flag = 1 if self.received is not None else 0
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            import torch

            device = torch.device("cpu")
            if dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            t = torch.tensor([flag], dtype=torch.int32, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            flag = int(t.item())
        return bool(flag)

    @property
    def signal_name(self) -> str | None:
        return None if self.received is None else signal.Signals(self.received).name


def abort_now(signum, frame):  # noqa: ARG001 - signal handler signature
    """A second SIGINT after the CLI left the handler's scope (shutdown): one line, exit 130."""
    import os

    os.write(2, b"aborted by a second SIGINT during shutdown: exiting now (exit code 130)\n")
    os._exit(130)
