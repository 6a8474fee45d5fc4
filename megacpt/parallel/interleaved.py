"""Interleaved 1F1B (Megatron's schedule with virtual pipeline stages), for one pipeline rank.

With vp model chunks per rank (`ParallelContext.chunk_layers`: chunk v of rank p is virtual
stage v P + p), the M micro-batches of a step become T = M vp virtual micro-batches per rank.
Virtual step k (0 <= k < T) works on

    chunk      c(k) = (k mod P vp) // P           (backward: vp - 1 - c(k))
    micro-batch m(k) = (k // (P vp)) P + k mod P

i.e. groups of P micro-batches go through chunk 0, then chunk 1, ... (Megatron's
`get_model_chunk_id`, micro-batch group size P). Rank p runs
`min(2 (P - p - 1) + (vp - 1) P, T)` warm-up forwards (all T when M == P or forward only),
then one forward and one backward per step, then the remaining backwards. Chunk outputs
travel around the ring: rank P - 1's chunk v feeds rank 0's chunk v + 1, and gradients go the
other way. Every exchange is one `comm.exchange(send_next, send_prev, recv_prev, recv_next)`
posted as in Megatron's `forward_backward_pipelining_with_interleaving` (the same pairs of
sends and receives in the same order on neighbouring ranks, so it cannot deadlock); received
tensors queue per chunk until their step runs. The bubble shrinks from (P - 1) / (M + P - 1)
of the step to (P - 1) / (vp M + P - 1) for vp times the P2P traffic (every chunk boundary
sends a whole activation) and more warm-up activations: rank p keeps up to `2 (P - p - 1) + (vp - 1) P + 1` chunk activations, each 1/vp
of a stage's (`megacpt.parallel.simulate` draws both).

Megatron's constraint holds here: M must be a multiple of P.
"""
from __future__ import annotations

from collections import deque


def chunk_of(k: int, pp: int, vp: int, forward: bool) -> int:
    """Model chunk of virtual step k (Megatron's get_model_chunk_id)."""
    c = (k % (pp * vp)) // pp
    return c if forward else vp - 1 - c


def microbatch_of(k: int, pp: int, vp: int) -> int:
    """Micro-batch that virtual step k works on (in its chunk)."""
    return (k // (pp * vp)) * pp + k % pp


def interleaved_warmup(pp: int, pp_rank: int, vp: int, num_microbatches: int,
                       forward_only: bool) -> int:
    """Virtual forward steps before the first backward on rank `pp_rank`."""
    total = num_microbatches * vp
    if forward_only or num_microbatches == pp:
        return total
    return min(2 * (pp - pp_rank - 1) + (vp - 1) * pp, total)


def check_interleaved(pp: int, vp: int, num_microbatches: int) -> None:
    if num_microbatches % pp:
        raise ValueError(
            f"the interleaved schedule needs the number of micro-batches per data-parallel rank "
            f"({num_microbatches} = global batch / (micro-batch size x dp)) to be a multiple of "
            f"--pipeline-model-parallel-size {pp}; change --global-batch-size or drop the "
            f"virtual stages")


class _Inbox:
    """Received activations / gradients waiting for their chunk's next step."""

    def __init__(self, vp: int):
        self.fwd = [deque() for _ in range(vp)]
        self.bwd = [deque() for _ in range(vp)]


def run_interleaved(stage, comm, pp: int, pp_rank: int, vp: int) -> None:
    """The whole interleaved 1F1B schedule of one rank (`stage`: a StageRunner with vp
    chunks; `comm`: PipeComm or a stand-in with `exchange` on the ring)."""
    num = stage.num
    check_interleaved(pp, vp, num)
    total = num * vp
    first, last = pp_rank == 0, pp_rank == pp - 1
    warm = interleaved_warmup(pp, pp_rank, vp, num, stage.forward_only)
    remaining = total - warm
    box = _Inbox(vp)

    def forward(k):
        c = chunk_of(k, pp, vp, True)
        x = None if (first and c == 0) else box.fwd[c].popleft()
        y = stage.forward_step(x, c)
        return None if (last and c == vp - 1) else y  # the loss goes nowhere

    def backward(k):
        c = chunk_of(k, pp, vp, False)
        g = None if (last and c == vp - 1) else box.bwd[c].popleft()
        gx = stage.backward_step(g, c)
        return None if (first and c == 0) else gx  # the embedding's input has no gradient

    if not first:
        box.fwd[0].append(comm.exchange(recv_prev=True)[0])
    for k in range(warm):  # ----- warm-up
        y = forward(k)
        nxt = chunk_of(k + 1, pp, vp, True)
        recv_prev = not (first and nxt == 0) and k != total - 1
        if k == warm - 1 and remaining > 0:
            x, g = comm.exchange(send_next=y, recv_prev=recv_prev, recv_next=not last)
            if not last:
                box.bwd[vp - 1].append(g)
        else:
            x, _ = comm.exchange(send_next=y, recv_prev=recv_prev)
        if recv_prev:
            box.fwd[nxt].append(x)
    for k in range(remaining):  # ----- steady state: one forward, one backward
        fk = k + warm
        y = forward(fk)
        gx = backward(k)
        if first:  # the first rank runs P - 1 steps ahead of the last
            nf = chunk_of(fk - (pp - 1), pp, vp, True)
            recv_prev = nf != vp - 1
            nf += 1
        else:
            nf, recv_prev = chunk_of(fk + 1, pp, vp, True), True
        if last:
            nb = chunk_of(k - (pp - 1), pp, vp, False)
            recv_next = nb != 0
            nb -= 1
        else:
            nb, recv_next = chunk_of(k + 1, pp, vp, False), True
        if k == remaining - 1:
            recv_prev = False
        x, g = comm.exchange(send_next=y, send_prev=gx, recv_prev=recv_prev,
                             recv_next=recv_next)
        if recv_prev:
            box.fwd[nf].append(x)
        if recv_next:
            box.bwd[nb].append(g)
    if stage.forward_only:
        return
    if remaining == 0 and not last:  # all warm-up: the first gradient was not received yet
        box.bwd[vp - 1].append(comm.exchange(recv_next=True)[1])
    for k in range(remaining, total):  # ----- cool-down
        gx = backward(k)
        nb = chunk_of(k + 1, pp, vp, False)
        recv_next = not (last and nb == vp - 1) and k != total - 1
        _, g = comm.exchange(send_prev=gx, recv_next=recv_next)
        if recv_next:
            box.bwd[nb].append(g)
