"""fp32 main-gradient buffers in buckets, reduced over data-parallel ranks during backward.

Every trainable parameter gets a slice of a flat fp32 bucket (`main_grad`). A hook that runs
after autograd has accumulated a parameter's gradient adds it into the slice and frees
`param.grad`, so micro-batches accumulate in fp32 whatever the parameter dtype (bf16 params,
fp32 main grads). Buckets hold parameters in reverse registration order (roughly the order
backward produces them) up to `bucket_size_mb`; during the last micro-batch's backward a
bucket whose parameters are all done starts its data-parallel reduction asynchronously
(overlapping the rest of the backward on GPU):

- plain data parallelism: all-reduce of the averaged bucket,
- ZeRO-1 (`shard_over_dp`): reduce-scatter, after which dp rank r holds the reduced
  gradients of elements `[r S, (r + 1) S)` of each bucket (bucket length padded to a multiple
  of dp, S = padded / dp). gloo has no reduce-scatter: there the bucket is all-reduced and
  rank r reads its range.

Each parameter carries `main_grad` (its slice) and `grad_buffer` (this buffer; a new buffer
over the same parameters removes the old one's hooks). With `fuse_wgrad` the linear layers add their weight gradients into `main_grad` themselves
(`megacpt.parallel.wgrad`); the hook then only counts the parameter as ready.

Tied embeddings under pipeline parallelism (`tied` names, `tied_group`): those parameters
get a bucket of their own, which backward never launches; `finish()` first sums it over
`tied_group` (the first and last stage's copies: Megatron's embedding-group all-reduce) and
then reduces it over dp like the others. Summing the local gradients before the dp reduction
gives the same total, and the bucket is laid out identically on both stages, so ZeRO-1 shards
it the same way there too.

Split backward (the ZB-H1 schedule): between `begin_wgrad_deferral()` and
`end_wgrad_deferral()` the fused linear layers compute only their input gradient and leave
(param, dy, x) here; the hook does not count such a parameter as ready. `run_wgrad(entries,
final)` later adds the weight gradients (the W pass) and counts them, so a bucket's reduction
starts only when the last micro-batch's W has run.

Reset without a memset: `zero()` only marks every parameter `main_grad_empty = True`; the
first gradient of the step is then written into `main_grad` (copied, or the fused GEMM
with beta = 0) instead of added to zeros, and `finish()` zeroes the main grads of parameters
that got no gradient at all. So between `zero()` and a parameter's first gradient its
`main_grad` holds stale values; read main grads after `forward_backward` (or `finish()`).

`finish()` waits for every bucket, then all-reduces over tp the gradients of parameters marked
`sequence_parallel=True` (norm weights under sequence parallelism see only s/tp tokens). The
schedule calls it when the step's backward is done, so after `forward_backward` the main
grads are final (reduced, averaged over dp); one `forward_backward` per `zero()`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megacpt.parallel.context import ParallelContext


@dataclass
class Bucket:
    """A flat fp32 gradient buffer shared by consecutive parameters."""

    index: int
    held: bool = False  # tied embedding: launched by finish() after the embedding all-reduce
    names: list[str] = field(default_factory=list)
    params: list[torch.nn.Parameter] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    numel: int = 0
    grad: torch.Tensor | None = None  # [padded numel] fp32
    ready: int = 0
    work: object = None
    launched: bool = False

    @property
    def padded(self) -> int:
        return self.grad.numel()


@dataclass(frozen=True)
class Piece:
    """The part of one parameter (flat elements `[lo, hi)`) that this rank owns and updates;
    it sits at `[start, start + hi - lo)` in its bucket."""

    name: str
    param: torch.nn.Parameter
    bucket: int
    lo: int
    hi: int
    start: int

    @property
    def whole(self) -> bool:
        return self.lo == 0 and self.hi == self.param.numel()


class GradBuffer:
    """Main gradients of `named_params`, bucketed and reduced over `ctx.dp_group`."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], ctx: ParallelContext,
                 bucket_size_mb: float = 25.0, shard_over_dp: bool = False,
                 fuse_wgrad: bool = False, tied: tuple[str, ...] = (), tied_group=None):
        if bucket_size_mb <= 0:
            raise ValueError(f"grad_bucket_size_mb must be > 0, got {bucket_size_mb}")
        self.ctx, self.shard_over_dp, self.fuse_wgrad = ctx, shard_over_dp, fuse_wgrad
        self.tied_group = tied_group
        held = [(n, p) for n, p in named_params if n in tied]
        named_params = [(n, p) for n, p in named_params if n not in tied] + held
        self.final_backward = self.finished = False
        self.defer_wgrad, self.deferred = False, []  # split backward: W work left for later
        self.buckets: list[Bucket] = []
        self.location: dict[str, tuple[int, int]] = {}  # name -> (bucket, offset)
        limit = int(bucket_size_mb * 2**20 / 4)
        current = Bucket(0)
        for name, p in reversed(named_params):
            hold = name in tied
            if current.params and (current.numel + p.numel() > limit or hold != current.held):
                self.buckets.append(current)
                current = Bucket(len(self.buckets))
            current.held = hold
            self.location[name] = (current.index, current.numel)
            p.grad_name = name
            current.names.append(name)
            current.params.append(p)
            current.offsets.append(current.numel)
            current.numel += p.numel()
        if current.params:
            self.buckets.append(current)
        mult = ctx.dp if shard_over_dp else 1
        for b in self.buckets:
            padded = -(-b.numel // mult) * mult
            b.grad = torch.zeros(padded, dtype=torch.float32, device=named_params[0][1].device)
        self._hooks = []
        for old in {id(p.grad_buffer): p.grad_buffer for _, p in named_params
                    if "grad_buffer" in p.__dict__}.values():
            old.remove_hooks()  # the parameters move to this buffer
        for b in self.buckets:
            for p, off in zip(b.params, b.offsets):
                p.grad_buffer, p.wgrad_deferred = self, False
                view = b.grad[off: off + p.numel()].view(p.shape)
                p.main_grad = view
                p.fuse_wgrad, p.grad_added_to_main_grad = fuse_wgrad, False
                p.main_grad_empty = True  # the next gradient is written, not added
                self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(b, view)))
        self._backend = dist.get_backend(ctx.dp_group) if ctx.dp_group is not None else None

    # ----- backward hooks -----
    def _make_hook(self, bucket: Bucket, view: torch.Tensor):
        def hook(p: torch.Tensor) -> None:
            if p.wgrad_deferred:  # its W pass adds and counts it later
                p.wgrad_deferred, p.grad = False, None
                return
            if p.grad_added_to_main_grad:  # the fused linear backward already added it
                p.grad_added_to_main_grad = False
            elif p.main_grad_empty:
                view.copy_(p.grad)  # fp32 = grad: the step's first gradient
            else:
                view.add_(p.grad)  # fp32 += grad (any dtype)
            p.main_grad_empty = False
            p.grad = None
            if self.final_backward:
                bucket.ready += 1
                if bucket.ready == len(bucket.params) and not bucket.held:
                    self._launch(bucket)
        return hook

    def begin_wgrad_deferral(self) -> None:
        """The next backward computes input gradients only (fused linears' W is kept)."""
        if not self.fuse_wgrad:
            raise RuntimeError("a split backward (zero-bubble schedule) needs gradient-"
                               "accumulation fusion; drop --no-gradient-accumulation-fusion")
        self.defer_wgrad, self.deferred = True, []

    def end_wgrad_deferral(self) -> list:
        """The (param, dy [n, out], x [n, in]) triples the backward left for its W pass."""
        out, self.defer_wgrad, self.deferred = self.deferred, False, []
        return out

    @torch.no_grad()
    def run_wgrad(self, entries: list, final: bool) -> None:
        """The W pass of one micro-batch: main_grad += dy^T x for each deferred linear;
        `final`: the step's last micro-batch (its parameters count towards the buckets)."""
        from megacpt.parallel.wgrad import accumulate_wgrad

        for p, dy2, x2 in entries:
            accumulate_wgrad(p.main_grad, dy2, x2, overwrite=p.main_grad_empty)
            p.main_grad_empty = False
            if final:
                bucket = self.buckets[self.location[p.grad_name][0]]
                bucket.ready += 1
                if bucket.ready == len(bucket.params):
                    self._launch(bucket)

    def set_final_backward(self, final: bool) -> None:
        """Called by the schedule before each backward: is it the step's last micro-batch?"""
        self.final_backward = final

    # ----- data-parallel reduction -----
    def shard_range(self, bucket: Bucket) -> tuple[int, int]:
        """Elements of `bucket` this dp rank owns (all of them without ZeRO-1)."""
        if not self.shard_over_dp:
            return 0, bucket.padded
        size = bucket.padded // self.ctx.dp
        return self.ctx.dp_rank * size, (self.ctx.dp_rank + 1) * size

    def _launch(self, bucket: Bucket) -> None:
        if bucket.launched:
            return
        bucket.launched = True
        group = self.ctx.dp_group
        if group is None:
            return
        bucket.grad.mul_(1.0 / self.ctx.dp)
        if self.shard_over_dp and self._backend == "nccl":
            lo, hi = self.shard_range(bucket)
            bucket.work = dist.reduce_scatter_tensor(bucket.grad[lo:hi], bucket.grad,
                                                     group=group, async_op=True)
        else:
            bucket.work = dist.all_reduce(bucket.grad, group=group, async_op=True)

    def finish(self) -> None:
        """Complete every bucket's reduction and the sequence-parallel norm-grad all-reduce.

        Called at the end of `forward_backward` and again by the optimizer step; only the
        first call after `zero()` does anything."""
        if self.finished:
            return
        for b in self.buckets:
            if not b.launched:  # launched buckets had every gradient; others may have holes
                for p in b.params:
                    if p.main_grad_empty:  # no gradient this step: its main grad is zero
                        p.main_grad.zero_()
                        p.main_grad_empty = False
            if b.held and self.tied_group is not None:  # first + last stage's tied copies
                dist.all_reduce(b.grad, group=self.tied_group)
            self._launch(b)  # buckets not started during backward (e.g. unused parameters)
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
                b.work = None
        self._reduce_sequence_parallel()
        self.final_backward = False
        self.finished = True

    def _reduce_sequence_parallel(self) -> None:
        if self.ctx.tp_group is None:
            return
        views = [p.main_grad for b in self.buckets for p in b.params
                 if getattr(p, "sequence_parallel", False)]
        if not views:
            return
        flat = torch.cat([v.reshape(-1) for v in views])
        dist.all_reduce(flat, group=self.ctx.tp_group)
        for v, part in zip(views, flat.split([v.numel() for v in views])):
            v.copy_(part.view_as(v))

    def zero(self) -> None:
        """Clear every main gradient (lazily: see the module docstring) and the per-step
        bucket state."""
        for b in self.buckets:
            if b.work is not None:  # a reduction still in flight must not write later
                b.work.wait()
                b.work = None
            for p in b.params:
                p.main_grad_empty = True
            b.ready, b.launched = 0, False
        self.final_backward = self.finished = False

    # ----- what this rank owns -----
    def pieces(self) -> list[Piece]:
        """Parts of parameters whose reduced gradient this rank holds and whose update it
        computes: whole parameters without ZeRO-1, the intersection with its shard with it."""
        out = []
        for b in self.buckets:
            s_lo, s_hi = self.shard_range(b)
            for name, p, off in zip(b.names, b.params, b.offsets):
                lo, hi = max(s_lo, off), min(s_hi, off + p.numel())
                if lo < hi:
                    out.append(Piece(name, p, b.index, lo - off, hi - off, lo))
        return out

    def piece_grad(self, piece: Piece) -> torch.Tensor:
        """The piece's reduced fp32 gradient (a view; parameter-shaped for whole pieces)."""
        g = self.buckets[piece.bucket].grad[piece.start: piece.start + piece.hi - piece.lo]
        return g.view(piece.param.shape) if piece.whole and not self.shard_over_dp else g

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for b in self.buckets:  # without the hooks, gradients must land in .grad again
            for p in b.params:
                p.fuse_wgrad = False
