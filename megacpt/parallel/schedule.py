"""Forward/backward over the micro-batches of one global batch, pipelined with 1F1B when pp > 1.

Global-batch rule (every layout consumes the same samples in the same order):
`split_global_batch` cuts the global batch `[G, s]` into `G / mbs` micro-batches of `mbs`
consecutive samples, numbered 0, 1, ...; data-parallel rank `r` takes micro-batches
`r, r + dp, r + 2 dp, ...` (Megatron's sampler order: micro-step `m` of the step consumes
samples `[(m dp + r) mbs, (m dp + r + 1) mbs)` on rank r). Each dp rank runs
`M = G / (mbs dp)` micro-batches.

Loss scaling: each micro-batch's mean token loss divided by M is back-propagated, so once the
gradients are averaged over dp they are the gradient of the mean of the micro-batch losses of
the whole global batch. `forward_backward` returns that mean (a float, the same on every rank).

1F1B (PipeDream-flush, Megatron's non-interleaved schedule), stage p of P with M micro-batches:
- warm-up: `min(P - p - 1, M)` forward passes (`run_warmup`),
- steady state: the remaining forwards each followed by one backward (`run_steady`),
- cool-down: the backwards left over from warm-up (`run_cooldown`).
At most `P - p` micro-batches' activations are alive on stage p. Interleaved (virtual)
stages are not implemented.

Point-to-point (`PipeComm`): stage p sends its output hidden states `[s(/tp), b, h]` to stage
p + 1 of the same (tp rank, dp rank) pipeline and receives the gradient of that output back.
Every exchange posts all its sends and receives first and then waits for all of them, so a
stage sending forward while receiving backward (the steady state) never deadlocks with its
neighbour doing the mirror-image exchange. NCCL posts them as one `batch_isend_irecv` group
(separately launched NCCL sends and receives between a pair can block each other); gloo
posts plain `isend`/`irecv`, tagged by direction. The step functions only call PipeComm's
six exchanges, so tests substitute an in-process implementation.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

from megacpt.parallel.context import ParallelContext


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
        if self.batched and not getattr(ctx, "_p2p_ready", False):
            # NCCL: the first operation on a group must involve all of its ranks, so a pair's
            # batch_isend_irecv must not be the first; every stage builds a PipeComm
            dist.all_reduce(torch.zeros(1, device=device), group=self.group)
            ctx._p2p_ready = True

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


# ----- micro-batches -----
def split_global_batch(tokens: torch.Tensor, labels: torch.Tensor, micro_batch_size: int,
                       ctx: ParallelContext, loss_mask: torch.Tensor | None = None,
                       device=None) -> list[dict]:
    """This dp rank's micro-batches of a global batch (the rule in the module docstring).

    tokens/labels (and loss_mask) `[G, s]`; returns dicts with "tokens", "labels" (and
    "loss_mask") of `[mbs, s]`, moved to `device` (default ctx.device).
    """
    g = tokens.shape[0]
    if labels.shape != tokens.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} differs from tokens shape "
                         f"{tuple(tokens.shape)}")
    if g % (micro_batch_size * ctx.dp):
        raise ValueError(f"global batch of {g} samples is not divisible by micro-batch size "
                         f"{micro_batch_size} x data-parallel size {ctx.dp}; change "
                         f"--global-batch-size or --micro-batch-size")
    device = ctx.device if device is None else device
    out = []
    for j in range(ctx.dp_rank, g // micro_batch_size, ctx.dp):
        rows = slice(j * micro_batch_size, (j + 1) * micro_batch_size)
        mb = {"tokens": tokens[rows].to(device), "labels": labels[rows].to(device)}
        if loss_mask is not None:
            mb["loss_mask"] = loss_mask[rows].to(device)
        out.append(mb)
    return out


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
    """Forward and backward steps of one pipeline stage over a list of micro-batches.

    Keeps the (input, output) pairs of forwarded micro-batches in FIFO order until their
    backward; the last stage's output is the scaled loss. `grad_sync` (the optimizer's
    gradient buffer, when any) is told which backward is the last of the step so it can start
    reducing gradient buckets while the backward runs.
    """

    def __init__(self, model, microbatches: list[dict], ctx: ParallelContext,
                 forward_only: bool = False):
        self.model, self.mbs, self.ctx, self.forward_only = model, microbatches, ctx, forward_only
        self.num = len(microbatches)
        self.pending: deque = deque()  # (input, output) awaiting backward
        self.forwards = self.backwards = 0
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)  # no host sync
        self.max_pending = 0
        self.grad_sync = getattr(model, "grad_sync", None)

    def forward_step(self, x: torch.Tensor | None) -> torch.Tensor:
        """Run the next micro-batch; x is the received activation (None on the first stage)."""
        mb = self.mbs[self.forwards]
        self.forwards += 1
        if self.ctx.is_first_stage:
            inp = mb["tokens"]
        else:
            inp = x.requires_grad_(not self.forward_only)
        if self.ctx.is_last_stage:
            per_token = self.model(inp, mb["labels"])  # [b, s]
            loss = microbatch_loss(per_token, mb)
            self.loss_sum += loss.detach().double()
            out = loss / self.num
        else:
            out = self.model(inp)  # [s(/tp), b, h]
        if not self.forward_only:
            self.pending.append((None if self.ctx.is_first_stage else inp, out))
            self.max_pending = max(self.max_pending, len(self.pending))
        return out

    def backward_step(self, grad_out: torch.Tensor | None) -> torch.Tensor | None:
        """Backward of the oldest pending micro-batch; returns the gradient of its input."""
        x, out = self.pending.popleft()
        self.backwards += 1
        if self.grad_sync is not None:
            self.grad_sync.set_final_backward(self.backwards == self.num)
        if grad_out is None:
            torch.autograd.backward(out)
        else:
            torch.autograd.backward(out, grad_tensors=grad_out)
        return None if x is None else x.grad


def run_warmup(stage: StageRunner, comm, n: int) -> None:
    """n forward passes, each received from the previous stage and sent to the next."""
    for _ in range(n):
        x = comm.recv_forward()
        comm.send_forward(stage.forward_step(x))


def run_steady(stage: StageRunner, comm, n: int) -> None:
    """n rounds of one forward and one backward (forward only: n plain forwards)."""
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


def run_cooldown(stage: StageRunner, comm, n: int) -> None:
    """n backward passes of the micro-batches left over from warm-up."""
    for _ in range(n):
        grad_y = comm.recv_backward()
        comm.send_backward(stage.backward_step(grad_y))


def run_1f1b(stage: StageRunner, comm, pp: int, pp_rank: int) -> None:
    """The whole non-interleaved 1F1B schedule of one stage."""
    n_warm = warmup_count(pp, pp_rank, stage.num, stage.forward_only)
    run_warmup(stage, comm, n_warm)
    run_steady(stage, comm, stage.num - n_warm)
    if not stage.forward_only:
        run_cooldown(stage, comm, n_warm)


def _activation_shape(model, mb: dict, ctx: ParallelContext) -> tuple[int, int, int]:
    b, s = mb["tokens"].shape
    if ctx.sequence_parallel:
        s //= ctx.tp
    return (s, b, model.cfg.hidden_size)


def forward_backward(model, microbatches: list[dict], ctx: ParallelContext, *,
                     forward_only: bool = False) -> float:
    """Run all micro-batches through this rank's stage (1F1B when pp > 1), backward unless
    `forward_only`; return the mean micro-batch loss over all micro-batches and dp ranks,
    identical on every rank."""
    if not microbatches:
        raise ValueError("forward_backward needs at least one micro-batch")
    stage = StageRunner(model, microbatches, ctx, forward_only)
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
            run_1f1b(stage, comm, ctx.pp, ctx.pp_rank)
    if stage.grad_sync is not None and not forward_only:
        stage.grad_sync.finish()  # main grads final (dp-reduced) when this returns
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
