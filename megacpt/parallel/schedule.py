"""Forward/backward over the micro-batches of one global batch, pipelined with 1F1B when pp > 1
(interleaved 1F1B, `megacpt.parallel.interleaved`, with virtual stages: ctx.vp > 1).

Global-batch rule (every layout consumes the same samples in the same order): the one rule of
`megacpt.data.loader` (`microbatch_samples`): micro-step `m` of the step consumes samples
`[(m dp + r) mbs, (m dp + r + 1) mbs)` on data-parallel rank r; the trainer's loader and
`split_global_batch` (for a global batch already in memory) both follow it. Each dp rank runs
`M = G / (mbs dp)` micro-batches.

Loss scaling: each micro-batch's mean token loss divided by M is back-propagated, so once the
gradients are averaged over dp they are the gradient of the mean of the micro-batch losses of
the whole global batch. `forward_backward` returns that mean (a float, the same on every rank).

1F1B (PipeDream-flush, Megatron's non-interleaved schedule), stage p of P with M micro-batches:
- warm-up: `min(P - p - 1, M)` forward passes (`run_warmup`),
- steady state: the remaining forwards each followed by one backward (`run_steady`),
- cool-down: the backwards left over from warm-up (`run_cooldown`).
At most `P - p` micro-batches' activations are alive on stage p.

Gradient synchronisation is explicit: `forward_backward(..., grad_sync=optimizer.grad_sync)`
tells the optimizer's gradient buffer before each backward whether it is the last one of
its model chunk in this step (so bucket reductions start during the backward) and finishes
the reduction at the end; without it the optimizer step reduces the gradients itself.

Point-to-point (`PipeComm`): stage p sends its output hidden states `[s(/tp), b, h]` to stage
p + 1 of the same (tp rank, dp rank) pipeline and receives the gradient of that output back.
Every exchange posts all its sends and receives first and then waits for all of them, so a
stage sending forward while receiving backward (the steady state) never deadlocks with its
neighbour doing the mirror-image exchange. NCCL posts them as one `batch_isend_irecv` group
(separately launched NCCL sends and receives between a pair can block each other); gloo
posts plain `isend`/`irecv`, tagged by direction. The step functions only call PipeComm's
six exchanges (interleaving: `exchange` on the ring), so tests substitute an in-process
implementation.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

from megacpt.data.loader import split_global_batch  # noqa: F401  (the one batching rule)
from megacpt.parallel.context import ParallelContext
from megacpt.parallel.interleaved import run_interleaved


# ----- point-to-point exchange between pipeline stages -----
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
        self.group = ctx.pp_group
        self.batched = ctx.pp > 1 and dist.get_backend(self.group) == "nccl"
        if self.batched and not ctx.p2p_ready:
            # NCCL: the first operation on a group must involve all of its ranks, so a pair's
            # batch_isend_irecv must not be the first; every stage builds a PipeComm
            dist.all_reduce(torch.zeros(1, device=device), group=self.group)
            ctx.p2p_ready = True

    def _empty(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)

    def _check(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if tuple(t.shape) != self.shape or t.dtype != self.dtype:
            raise RuntimeError(f"pipeline stage {self.ctx.pp_rank}: {what} has shape "
                               f"{tuple(t.shape)} {t.dtype}, expected {self.shape} {self.dtype}")
        return t.detach().contiguous()

    def exchange(self, send_next=None, send_prev=None, recv_prev=False, recv_next=False):
        """Post every requested operation, then wait for all; returns (from_prev, from_next).

        The neighbours are on the ring (stage P - 1's next is stage 0), as interleaving needs;
        sends are posted before receives and forward before backward on every rank, so with
        NCCL (untagged) the pairs match in order even when both neighbours are the same rank.
        """
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
            p2p = [dist.P2POp(dist.isend if kind == "send" else dist.irecv, t, peer,
                              group=self.group, tag=tag) for kind, t, peer, tag in ops]
            works = dist.batch_isend_irecv(p2p)
        else:
            works = [(dist.isend if kind == "send" else dist.irecv)(t, peer, group=self.group,
                                                                    tag=tag)
                     for kind, t, peer, tag in ops]
        for w in works:
            w.wait()
        return from_prev, from_next

    # ----- the six exchanges of the 1F1B schedule -----
    def recv_forward(self) -> torch.Tensor | None:
        """The previous stage's output (None on the first stage)."""
        return None if self.first else self.exchange(recv_prev=True)[0]

    def send_forward(self, y: torch.Tensor) -> None:
        """Send this stage's output to the next stage (no-op on the last stage)."""
        if not self.last:
            self.exchange(send_next=y)

    def recv_backward(self) -> torch.Tensor | None:
        """Gradient of this stage's output from the next stage (None on the last stage)."""
        return None if self.last else self.exchange(recv_next=True)[1]

    def send_backward(self, grad_x: torch.Tensor | None) -> None:
        """Send the gradient of this stage's input back (no-op on the first stage)."""
        if not self.first:
            self.exchange(send_prev=grad_x)

    def send_forward_recv_backward(self, y: torch.Tensor) -> torch.Tensor | None:
        if self.last:
            return None
        return self.exchange(send_next=y, recv_next=True)[1]

    def send_backward_recv_forward(self, grad_x: torch.Tensor | None) -> torch.Tensor | None:
        if self.first:
            return None
        return self.exchange(send_prev=grad_x, recv_prev=True)[0]


# ----- micro-batches -----
def warmup_count(pp: int, pp_rank: int, num_microbatches: int, forward_only: bool) -> int:
    """Forward passes before the first backward on stage `pp_rank` (all of them if no grads)."""
    if forward_only:
        return num_microbatches
    return min(pp - pp_rank - 1, num_microbatches)


def microbatch_loss(per_token: torch.Tensor, mb: dict) -> torch.Tensor:
    """Mean token loss of one micro-batch (over `loss_mask` when given)."""
    mask = mb.get("loss_mask")
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


class StageRunner:
    """Forward and backward steps of one pipeline rank over a list of micro-batches.

    Keeps the (input, output) pairs of forwarded micro-batches in FIFO order per model chunk
    until their backward; the last virtual stage's output is the scaled loss. `grad_sync` (the
    optimizer's gradient buffer, or None) is told before each backward whether it is the
    chunk's last of the step, so it can start reducing gradient buckets during the backward.
    """

    def __init__(self, model, microbatches: list[dict], ctx: ParallelContext,
                 forward_only: bool = False, grad_sync=None, chunks: int = 1,
                 split_backward: bool = False):
        self.model, self.mbs, self.ctx, self.forward_only = model, microbatches, ctx, forward_only
        self.num, self.chunks, self.grad_sync = len(microbatches), chunks, grad_sync
        #: ZB-H1: backward_step computes input gradients only, wgrad_step the weight grads
        self.split_backward = split_backward
        self.wpending: deque = deque()  # per backward done: its deferred W work
        self.wgrads = 0
        self.pending = [deque() for _ in range(chunks)]  # per chunk: (input, output)
        self.forwards, self.backwards = [0] * chunks, [0] * chunks
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)  # no host sync
        self.alive = self.max_pending = 0  # chunk activations held now / at most

    def _remember(self, chunk: int, x, out) -> None:
        self.pending[chunk].append((x, out))
        self.alive += 1
        self.max_pending = max(self.max_pending, self.alive)

    def forward_step(self, x: torch.Tensor | None, chunk: int = 0) -> torch.Tensor:
        """Run chunk `chunk` on its next micro-batch; x is the received activation (None on
        the first virtual stage)."""
        mb = self.mbs[self.forwards[chunk]]
        self.forwards[chunk] += 1
        first = self.ctx.is_first_stage and chunk == 0
        last = self.ctx.is_last_stage and chunk == self.chunks - 1
        kw = {"chunk": chunk} if self.chunks > 1 else {}
        inp = mb["tokens"] if first else x.requires_grad_(not self.forward_only)
        if last:
            per_token = self.model(inp, mb["labels"], **kw)  # [b, s]
            loss = microbatch_loss(per_token, mb)
            self.loss_sum += loss.detach().double()
            out = loss / self.num
        else:
            out = self.model(inp, **kw)  # [s(/tp), b, h]
        if not self.forward_only:
            self._remember(chunk, None if first else inp, out)
        return out

    def backward_step(self, grad_out: torch.Tensor | None, chunk: int = 0):
        """Backward of chunk `chunk`'s oldest pending micro-batch; returns its input grad."""
        x, out = self.pending[chunk].popleft()
        self.alive -= 1
        self.backwards[chunk] += 1
        if self.grad_sync is not None:
            self.grad_sync.set_final_backward(self.backwards[chunk] == self.num)
            if self.split_backward:
                self.grad_sync.begin_wgrad_deferral()
        try:
            if grad_out is None:
                torch.autograd.backward(out)
            else:
                torch.autograd.backward(out, grad_tensors=grad_out)
        finally:
            if self.split_backward:
                self.wpending.append(self.grad_sync.end_wgrad_deferral())
        return None if x is None else x.grad

    def wgrad_step(self) -> None:
        """The W pass (weight gradients of the linear layers) of the oldest backward."""
        entries = self.wpending.popleft()
        self.wgrads += 1
        self.grad_sync.run_wgrad(entries, final=self.wgrads == self.num)


def run_warmup(stage: StageRunner, comm, n: int) -> None:
    """n forward passes, each received from the previous stage and sent to the next."""
    for _ in range(n):
        x = comm.recv_forward()
        comm.send_forward(stage.forward_step(x))


def run_steady(stage: StageRunner, comm, n: int, after_backward=None) -> None:
    """n rounds of one forward and one backward (forward only: n plain forwards);
    `after_backward()` runs once the round's gradient is sent (ZB-H1's W passes)."""
    if n == 0:
        return
    x = comm.recv_forward()
    for i in range(n):
        last = i == n - 1
        y = stage.forward_step(x)
        if stage.forward_only:
            comm.send_forward(y)
            x = None if last else comm.recv_forward()
            continue
        grad_y = comm.send_forward_recv_backward(y)
        grad_x = stage.backward_step(grad_y)
        if last:
            comm.send_backward(grad_x)
        else:
            x = comm.send_backward_recv_forward(grad_x)
        if after_backward is not None:
            after_backward()


def run_cooldown(stage: StageRunner, comm, n: int, after_backward=None) -> None:
    """n backward passes of the micro-batches left over from warm-up."""
    for _ in range(n):
        grad_y = comm.recv_backward()
        comm.send_backward(stage.backward_step(grad_y))
        if after_backward is not None:
            after_backward()


def run_1f1b(stage: StageRunner, comm, pp: int, pp_rank: int) -> None:
    """The whole non-interleaved 1F1B schedule of one stage."""
    n_warm = warmup_count(pp, pp_rank, stage.num, stage.forward_only)
    run_warmup(stage, comm, n_warm)
    run_steady(stage, comm, stage.num - n_warm)
    if not stage.forward_only:
        run_cooldown(stage, comm, n_warm)


def run_zb_h1(stage: StageRunner, comm, pp: int, pp_rank: int) -> None:
    """ZB-H1 (Qi et al. 2023): 1F1B's forwards, input-gradient backwards and messages, with
    each backward's weight-gradient pass W moved: rank p keeps its first p W passes back in
    the steady state (so gradients reach earlier stages sooner), runs one W after each
    cool-down backward (where 1F1B waits for the next gradient) and the rest at the end.
    The order is `megacpt.parallel.simulate.order_zb_h1`."""
    n_warm = warmup_count(pp, pp_rank, stage.num, False)

    def steady_w():
        if stage.backwards[0] - stage.wgrads > pp_rank:
            stage.wgrad_step()

    def cooldown_w():
        if stage.wgrads < stage.backwards[0]:
            stage.wgrad_step()

    run_warmup(stage, comm, n_warm)
    run_steady(stage, comm, stage.num - n_warm, steady_w)
    run_cooldown(stage, comm, n_warm, cooldown_w)
    while stage.wpending:
        stage.wgrad_step()


PIPELINE_SCHEDULES = ("1f1b", "zb-h1")


def _activation_shape(model, mb: dict, ctx: ParallelContext) -> tuple[int, int, int]:
    b, s = mb["tokens"].shape
    if ctx.sequence_parallel:
        s //= ctx.tp
    return (s, b, model.cfg.hidden_size)


def forward_backward(model, microbatches: list[dict], ctx: ParallelContext, *,
                     forward_only: bool = False, grad_sync=None,
                     schedule: str = "1f1b") -> float:
    """Run all micro-batches through this rank's stage (1F1B when pp > 1, interleaved with
    virtual stages), backward unless `forward_only`; return the mean micro-batch loss over all
    micro-batches and dp ranks, identical on every rank.

    `grad_sync`: the optimizer's gradient buffer (`optimizer.grad_sync`); given, its
    data-parallel reduction overlaps the backward and is complete when this returns.
    `schedule`: "1f1b" (interleaved when ctx.vp > 1) or "zb-h1" (split backward, pp > 1,
    needs grad_sync with gradient-accumulation fusion)."""
    if not microbatches:
        raise ValueError("forward_backward needs at least one micro-batch")
    if schedule not in PIPELINE_SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose from "
                         f"{', '.join(PIPELINE_SCHEDULES)}")
    zb = schedule == "zb-h1" and ctx.pp > 1 and not forward_only
    if zb and (ctx.vp > 1 or grad_sync is None):
        raise ValueError("the zb-h1 schedule runs without virtual stages and needs the "
                         "optimizer's grad_sync (it defers weight gradients into it)")
    stage = StageRunner(model, microbatches, ctx, forward_only, grad_sync, ctx.vp,
                        split_backward=zb)
    with torch.set_grad_enabled(not forward_only):
        if ctx.pp == 1:
            for _ in range(stage.num):
                stage.forward_step(None)
                if not forward_only:
                    stage.backward_step(None)
        else:
            dtype = next(model.parameters()).dtype
            comm = PipeComm(ctx, _activation_shape(model, microbatches[0], ctx), dtype,
                            ctx.device)
            if ctx.vp > 1:
                run_interleaved(stage, comm, ctx.pp, ctx.pp_rank, ctx.vp)
            elif zb:
                run_zb_h1(stage, comm, ctx.pp, ctx.pp_rank)
            else:
                run_1f1b(stage, comm, ctx.pp, ctx.pp_rank)
    if grad_sync is not None and not forward_only:
        grad_sync.finish()  # main grads final (dp-reduced) when this returns
    return _reduce_loss(stage.loss_sum / stage.num, ctx)


def _reduce_loss(local_mean: torch.Tensor, ctx: ParallelContext) -> float:
    """Average the last stage's loss over dp, then give it to every pipeline stage."""
    if not ctx.distributed:
        return float(local_mean.item())
    t = local_mean.reshape(1).clone()  # zero on stages other than the last
    if ctx.dp_group is not None and ctx.is_last_stage:
        dist.all_reduce(t, group=ctx.dp_group)
        t /= ctx.dp
    if ctx.pp_group is not None:
        src = ctx.global_rank(ctx.tp_rank, ctx.dp_rank, ctx.pp - 1)
        dist.broadcast(t, src=src, group=ctx.pp_group)
    return float(t.item())
