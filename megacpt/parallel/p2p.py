"""Point-to-point exchange of activations and their gradients between pipeline stages.

Stage `p` sends its output hidden states `[s(/tp), b, h]` to stage `p + 1` of the same
(tp rank, dp rank) pipeline and receives the gradient of that output back from it. Every
exchange posts all its sends and receives first and then waits for all of them, so a stage
that sends forward while receiving backward (the 1F1B steady state) never deadlocks with its
neighbour doing the mirror-image exchange.

NCCL posts the operations as one `batch_isend_irecv` group (separately launched NCCL sends and
receives between the same pair can block each other); gloo posts plain `isend`/`irecv`.
Tags keep the two directions apart on transports that match by tag (gloo).

`PipeComm` is the interface the schedule uses; `megacpt.parallel.schedule` never calls
torch.distributed directly, so tests can substitute an in-process implementation.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megacpt.parallel.context import ParallelContext

_TAG_FORWARD, _TAG_BACKWARD = 1, 2


class PipeComm:
    """Activation/gradient exchange with the neighbouring pipeline stages of this rank.

    `shape` is the activation shape `[s(/tp), b, h]` every stage sends and receives; the first
    stage receives nothing forward and the last nothing backward (those calls return None).
    """

    def __init__(self, ctx: ParallelContext, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device):
        self.ctx, self.shape, self.dtype, self.device = ctx, tuple(shape), dtype, device
        self.first, self.last = ctx.is_first_stage, ctx.is_last_stage
        self.next_rank, self.prev_rank = ctx.next_stage_rank, ctx.prev_stage_rank
        self.batched = ctx.pp > 1 and dist.get_backend() == "nccl"

    def _empty(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)

    def _check(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if tuple(t.shape) != self.shape or t.dtype != self.dtype:
            raise RuntimeError(f"pipeline stage {self.ctx.pp_rank}: {what} has shape "
                               f"{tuple(t.shape)} {t.dtype}, expected {self.shape} {self.dtype}")
        return t.detach().contiguous()

    def _exchange(self, send_next=None, send_prev=None, recv_prev=False, recv_next=False):
        """Post every requested operation, then wait for all; returns (from_prev, from_next)."""
        ops, from_prev, from_next = [], None, None
        if send_next is not None:
            ops.append(("send", self._check(send_next, "output activation"), self.next_rank,
                        _TAG_FORWARD))
        if send_prev is not None:
            ops.append(("send", self._check(send_prev, "input gradient"), self.prev_rank,
                        _TAG_BACKWARD))
        if recv_prev:
            from_prev = self._empty()
            ops.append(("recv", from_prev, self.prev_rank, _TAG_FORWARD))
        if recv_next:
            from_next = self._empty()
            ops.append(("recv", from_next, self.next_rank, _TAG_BACKWARD))
        if not ops:
            return from_prev, from_next
        if self.batched:
            p2p = [dist.P2POp(dist.isend if kind == "send" else dist.irecv, t, peer, tag=tag)
                   for kind, t, peer, tag in ops]
            works = dist.batch_isend_irecv(p2p)
        else:
            works = [(dist.isend if kind == "send" else dist.irecv)(t, peer, tag=tag)
                     for kind, t, peer, tag in ops]
        for w in works:
            w.wait()
        return from_prev, from_next

    # ----- the six exchanges of the 1F1B schedule -----
    def recv_forward(self) -> torch.Tensor | None:
        """The previous stage's output (None on the first stage)."""
        return None if self.first else self._exchange(recv_prev=True)[0]

    def send_forward(self, y: torch.Tensor) -> None:
        """Send this stage's output to the next stage (no-op on the last stage)."""
        if not self.last:
            self._exchange(send_next=y)

    def recv_backward(self) -> torch.Tensor | None:
        """Gradient of this stage's output from the next stage (None on the last stage)."""
        return None if self.last else self._exchange(recv_next=True)[1]

    def send_backward(self, grad_x: torch.Tensor | None) -> None:
        """Send the gradient of this stage's input back (no-op on the first stage)."""
        if not self.first:
            self._exchange(send_prev=grad_x)

    def send_forward_recv_backward(self, y: torch.Tensor) -> torch.Tensor | None:
        if self.last:
            return None
        return self._exchange(send_next=y, recv_next=True)[1]

    def send_backward_recv_forward(self, grad_x: torch.Tensor | None) -> torch.Tensor | None:
        if self.first:
            return None
        return self._exchange(send_prev=grad_x, recv_prev=True)[0]
