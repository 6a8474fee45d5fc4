"""Fault handling in the training loop: preemption signals, non-finite steps, dead ranks.

- `PreemptionHandler` (`megacpt.training.signals`, re-exported here): SIGTERM / SIGUSR1 /
  SIGINT set a flag instead of killing the process; the loop saves and exits 0 at the next
  step boundary; a second SIGINT aborts at once.
- `NonFiniteTracker`: counts steps whose loss or gradient norm is not finite (the step is
  skipped: no parameter update); after `max_consecutive` in a row it raises `NonFiniteError`
  naming the step and the last good checkpoint.
- `collective_guard`: turns a failed or timed-out collective (a rank died, or hangs) into a
  `DeadRankError` that says which rank saw it and what the timeout was, instead of a bare
  backend traceback. The timeout itself is the process-group timeout
  (`--distributed-timeout-minutes`), set when the process group is created.
- `Watchdog`: a backstop for peers that hang without closing their connections (a stopped
  process, a stuck node): when the loop reports no progress for the same timeout, it logs
  which rank and iteration are stuck and ends the process with exit code 1. Collectives on
  sub-groups created without an explicit timeout would otherwise wait for torch's 30-minute
  default whatever `--distributed-timeout-minutes` says.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from typing import Callable

import torch.distributed as dist

from megacpt.training.signals import PREEMPTION_SIGNALS, PreemptionHandler  # noqa: F401

log = logging.getLogger("megacpt.train")


class TrainingError(RuntimeError):
    """Training stopped for a reason the message explains; the CLI exits non-zero."""


class NonFiniteError(TrainingError):
    """Too many consecutive steps with non-finite loss or gradient norm."""


class DeadRankError(TrainingError):
    """A collective failed or timed out: another rank most likely died."""


class NonFiniteTracker:
    """Counts skipped (non-finite) steps, total and consecutive."""

    def __init__(self, max_consecutive: int, total: int = 0):
        if max_consecutive < 1:
            raise ValueError(f"training.max_nonfinite_steps must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.total = total
        self.consecutive = 0

    @staticmethod
    def finite(*values: float | None) -> bool:
        return all(v is not None and math.isfinite(v) for v in values)

    def record(self, iteration: int, skipped: bool, loss: float, grad_norm: float | None,
               last_checkpoint: str | None) -> None:
        """Count a step (1-based `iteration`); raise after too many skipped steps in a row."""
        if not skipped:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        log.warning("step %d skipped: loss %s, grad norm %s (%d in a row, %d in total)",
                    iteration, loss, grad_norm, self.consecutive, self.total)
        if self.consecutive >= self.max_consecutive:
            where = last_checkpoint or "none saved (set --save and --save-interval)"
            raise NonFiniteError(
                f"stopping at step {iteration}: {self.consecutive} consecutive steps with "
                f"non-finite loss or gradient norm (last loss {loss}, grad norm {grad_norm}); "
                f"last good checkpoint: {where}. Lower --lr, check the data, or resume from "
                f"that checkpoint")


@contextlib.contextmanager
def collective_guard(rank: int, timeout_minutes: float, what: str = "training"):
    """Re-raise errors of torch.distributed collectives as `DeadRankError` with context."""
    try:
        yield
    except TrainingError:
        raise
    except (RuntimeError, dist.DistError) as e:  # DistBackendError subclasses RuntimeError
        if not (dist.is_available() and dist.is_initialized()) or not _looks_distributed(e):
            raise
        raise DeadRankError(
            f"rank {rank}: a collective failed during {what}: another rank probably died or "
            f"stopped responding (process-group timeout {timeout_minutes:g} min, "
            f"--distributed-timeout-minutes); see the other ranks' logs. Backend error: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


_DIST_MARKERS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket",
                 "broken pipe", "closed", "distbackenderror", "process group", "watchdog")


def _looks_distributed(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):
        return True
    text = f"{type(e).__name__} {e}".lower()
    return any(m in text for m in _DIST_MARKERS)


class Watchdog:
    """Ends the process when `beat()` is not called for `timeout_s` seconds (see module doc).

    `on_timeout(message)` runs on the watchdog thread; by default it logs the message and
    calls `os._exit(1)` (a thread blocked in a collective cannot be interrupted otherwise).
    """

    def __init__(self, timeout_s: float, rank: int, enabled: bool = True,
                 on_timeout: Callable[[str], None] | None = None):
        self.timeout_s, self.rank, self.enabled = float(timeout_s), rank, enabled
        self.on_timeout = on_timeout or _exit_now
        self._last = time.monotonic()
        self._where = "start-up"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, where: str) -> None:
        """Record progress; `where` says what the loop does next (for the message)."""
        self._last, self._where = time.monotonic(), where

    def __enter__(self) -> "Watchdog":
        if self.enabled:
            self.beat(self._where)
            self._thread = threading.Thread(target=self._watch, name="megacpt-watchdog",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        poll = max(0.05, min(5.0, self.timeout_s / 20))
        while not self._stop.wait(poll):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                self.on_timeout(
                    f"rank {self.rank}: no progress for {idle:.0f} s during {self._where} "
                    f"(--distributed-timeout-minutes {self.timeout_s / 60:g}): another rank "
                    f"probably died or hangs; stopping this rank")
                return


def _exit_now(message: str) -> None:
    log.error("%s", message)
    for h in logging.getLogger().handlers + log.handlers:
        h.flush()
    os._exit(1)
