"""Asynchronous checkpoint saves (`--async-save`, Megatron's flag).

A save is split in two. In the training thread, collectively: `snapshot_checkpoint` prepares
`iter_*.tmp`, gathers the optimizer state (ZeRO-1: over dp) and copies this rank's tensors
into CPU buffers reused from save to save (pinned memory when they live on a GPU). Training
then goes on while a background thread writes the files (`write_snapshot`: no collectives).

Completion needs no collective either: each rank's thread hashes the files it wrote (the
same per-file checksums a synchronous save records, `megacpt.checkpoint.integrity`) and
leaves them in a marker in `iter_*.tmp/.async/` (`rank_{r}.done`, JSON {relpath: digest},
published by rename so it is never read half-written; or `rank_{r}.failed` holding the
error); rank 0's thread waits for every rank's marker (at most the distributed timeout),
records all checksums in meta.json, removes the markers and publishes exactly as a
synchronous save does: rename to `iter_*`, then the tracker, then retention. A crash at any
point leaves the previous checkpoint and the tracker untouched; a failed rank makes rank 0
drop the temporary directory.

`prepare` (the trainer calls it at start-up) allocates the snapshot buffers once and touches
their pages in the background, so a snapshot, the first one included, is only a copy.

At most one save is in flight: `save` first finishes the previous one, and so does `finish`,
which the trainer calls at the end of the run (after the final save, also the one a SIGTERM
asks for). `finish` is collective: every rank learns whether any rank failed.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time

from megacpt.checkpoint import checkpointing as ckpt
from megacpt.checkpoint import integrity
from megacpt.checkpoint.format import CheckpointError
from megacpt.config import Config
from megacpt.parallel.context import ParallelContext

log = logging.getLogger(__name__)

MARKERS = ".async"


class AsyncCheckpointSaver:
    """One background writer per rank; every rank calls `save` and `finish` together."""

    def __init__(self, ctx: ParallelContext, timeout_s: float = 600.0, poll_s: float = 0.02):
        self.ctx, self.timeout_s, self.poll_s = ctx, timeout_s, poll_s
        self.buffers = ckpt.SnapshotBuffers()
        self._thread: threading.Thread | None = None
        self._snap: ckpt.Snapshot | None = None
        self._error: BaseException | None = None
        self.last_blocked_s = 0.0  # time the snapshot of the last `save` kept the caller
        self.last_wait_s = 0.0  # time the last `save` first waited for the previous one to
        #                         finish (0 when saves are further apart than a write takes)

    def prepare(self, model, optimizer, cfg: Config) -> None:
        """Allocate the snapshot buffers before the first save and touch their pages in the
        background, so that no save (the first included) pays for fresh memory."""
        specs = ckpt.snapshot_specs(model, optimizer, cfg, self.ctx)
        self.buffers.prepare(specs, cuda=any(p.is_cuda for p in model.parameters()))

    @property
    def in_flight(self) -> bool:
        """A save was started and `finish` has not been called for it yet."""
        return self._thread is not None

    @property
    def writing(self) -> bool:
        """The background write of the save in flight is still running."""
        return self._thread is not None and self._thread.is_alive()

    def save(self, save_dir: str, iteration: int, model, optimizer, cfg: Config,
             state: dict) -> str:
        """Finish the save in flight, snapshot this one and start writing it; returns the
        iteration directory it will be published as."""
        start = time.perf_counter()
        self.finish()
        self.last_wait_s = time.perf_counter() - start
        start = time.perf_counter()
        snap = ckpt.snapshot_checkpoint(save_dir, iteration, model, optimizer, cfg, self.ctx,
                                        state, buffers=self.buffers)
        self._snap, self._error = snap, None
        self._thread = threading.Thread(target=self._write, args=(snap,), daemon=True,
                                        name=f"async-save-{iteration}")
        self._thread.start()
        self.last_blocked_s = time.perf_counter() - start
        return snap.final

    def _write(self, snap: ckpt.Snapshot) -> None:
        markers = os.path.join(snap.tmp, MARKERS)
        try:
            written = ckpt.write_snapshot(snap)
            sums = integrity.digests(snap.tmp, written)  # off the training thread
            _mark(markers, snap.rank, "done", json.dumps(sums))
        except BaseException as e:  # noqa: BLE001 - reported by finish() on every rank
            self._error = e
            try:
                _mark(markers, snap.rank, "failed", f"{type(e).__name__}: {e}")
            except OSError:
                pass
            if snap.rank != 0:
                return
        if snap.rank == 0:
            try:
                self._publish_when_complete(snap, markers)
            except BaseException as e:  # noqa: BLE001
                self._error = self._error or e
                shutil.rmtree(snap.tmp, ignore_errors=True)  # unpublished: free its space

    def _publish_when_complete(self, snap: ckpt.Snapshot, markers: str) -> None:
        """Rank 0: wait for every rank's marker, then publish (or drop the temp dir)."""
        world = self.ctx.world_size
        deadline = time.monotonic() + self.timeout_s
        while True:
            names = set(os.listdir(markers)) if os.path.isdir(markers) else set()
            failed = sorted(int(n[5:-7]) for n in names if n.endswith(".failed"))
            done = sum(n.endswith(".done") for n in names)
            if failed or done + len(failed) >= world:
                break
            if time.monotonic() > deadline:
                raise CheckpointError(f"async save of {snap.tmp}: only {done} of {world} ranks "
                                      f"finished writing within {self.timeout_s:.0f}s")
            time.sleep(self.poll_s)
        if failed:
            why = open(os.path.join(markers, f"rank_{failed[0]}.failed")).read()
            shutil.rmtree(snap.tmp, ignore_errors=True)
            raise CheckpointError(f"async save of {snap.tmp} failed on rank(s) {failed} "
                                  f"({why}); the previous checkpoint and the tracker are "
                                  f"untouched")
        sums = {}
        for r in range(world):
            with open(os.path.join(markers, f"rank_{r}.done"), encoding="utf-8") as f:
                sums.update(json.load(f))
        integrity.record_checksums(snap.tmp, sums)
        shutil.rmtree(markers)
        ckpt.publish_snapshot(snap)

    def finish(self, collective: bool = True) -> None:
        """Wait for the save in flight (if any). `collective`: every rank raises a
        CheckpointError if any rank failed (all ranks must call it); otherwise (on the way
        out of a failed run) only wait and log."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        error, snap = self._error, self._snap
        self._error = None
        if error is not None and not isinstance(error, CheckpointError):
            error = CheckpointError(f"async save of {snap.tmp} failed: {type(error).__name__}: "
                                    f"{error}; the previous checkpoint and the tracker are "
                                    f"untouched")
        if collective:
            ckpt.agree_on_errors(self.ctx, error, f"async save of checkpoint {snap.tmp}")
        elif error is not None:
            log.error("async save of %s failed: %s", snap.tmp, error)


def _mark(markers: str, rank: int, kind: str, text: str) -> None:
    """Leave rank's marker; written under another name and renamed, so rank 0 never reads a
    half-written one."""
    os.makedirs(markers, exist_ok=True)
    path = os.path.join(markers, f"rank_{rank}.{kind}")
    with open(path + ".part", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".part", path)
