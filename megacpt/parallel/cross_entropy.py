"""The language-model loss, in one place: per-token cross entropy over vocabulary-sharded logits.

Public functions (loss [...] fp32 per token; columns at or past `vocab_size` are vocabulary
padding and take no part in the softmax, so the loss equals the unpadded model's):

    vocab_parallel_cross_entropy(logits [..., v_pad/tp], target [...], tp_group, vocab_size,
                                 use_kernels)
    chunked_lm_head_loss(x [n, h], weight [v_pad/tp, h], target [n], tp_group, vocab_size,
                         chunk_tokens, use_kernels)        LM head + loss, logits never whole

and their building blocks, used by both: `shard_targets` (global ids -> this shard's
columns), `shard_bounds`, `shard_stats` (a shard's per-row max / sum of exp / target logit),
`combine_vocab_stats` (the tp combine: one MAX and one SUM all-reduce) and `shard_grad`
((softmax - onehot) * grad from the combined log-sum-exp).

Paths. Every loss is lse - x[target] with lse the log-sum-exp over the whole (unpadded)
vocabulary, from per-shard statistics combined over tp; nothing gathers the logits.
- torch (default): the statistics are computed `_ROWS_PER_CHUNK`-bounded row blocks at a time
  in fp32, reading the logits in place (no fp32 copy of the whole logits, no copy to drop the
  padding columns); forward saves the logits and lse [n], backward writes
  (softmax - onehot) * grad into a fresh gradient of the logits' dtype, again block by block.
- kernels (`use_kernels=True`, `megacpt.kernels`' public Triton ops): at tp = 1 the fused
  `kernels.cross_entropy(inplace=True)`; at tp > 1 `kernels.ce_shard_stats`, the combine, then
  `kernels.ce_grad_` writes the unscaled gradient into the logits shard in place and backward
  scales its rows (`kernels.ce_scale_rows_`). The logits are OVERWRITTEN: they must feed only
  this loss, as the LM head's do; a second backward over one forward is refused.
- chunked LM head (`chunked_lm_head_loss`): see its section below.

A target outside [0, vocab_size) gives a NaN loss on every path (no host sync to check it).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megacpt import kernels

#: torch path: rows per block are chosen so one fp32 block holds at most this many elements
_BLOCK_ELEMS = 1 << 24  # 64 MiB of fp32


def _tp_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _tp_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _rows_per_block(n_cols: int) -> int:
    return max(1, _BLOCK_ELEMS // max(n_cols, 1))


# ----------------------------------------------------------------------------- building blocks
def shard_bounds(per_rank: int, group, vocab_size: int) -> tuple[int, int]:
    """(first global column of this rank's vocabulary shard of `per_rank` columns, how many of
    its columns are real vocabulary; the rest are padding)."""
    start = _tp_rank(group) * per_rank
    return start, min(max(vocab_size - start, 0), per_rank)


def shard_targets(target: torch.Tensor, start: int, per_rank: int,
                  vocab_size: int) -> torch.Tensor:
    """Global ids [...] -> this shard's column [n] int64: -1 where the id lives on another
    rank, -2 for ids outside [0, vocab_size) (the loss is then NaN)."""
    t = target.reshape(-1)
    local = t - start
    local = torch.where((local >= 0) & (local < per_rank), local, -1)
    return torch.where((t >= 0) & (t < vocab_size), local, -2)


def shard_stats(logits2d: torch.Tensor, local: torch.Tensor, n_valid: int,
                use_kernels: bool = False):
    """fp32 [n] (row max, sum of exp(x - row max), target logit or 0 when the target is on
    another shard, NaN when invalid) of a logits shard [n, v/tp] whose first `n_valid` columns
    are vocabulary: `kernels.ce_shard_stats`, or plain torch with the same semantics, reading
    the logits in place (fp32 temporaries of at most one row block)."""
    if use_kernels:
        return kernels.ce_shard_stats(logits2d, local, n_valid)
    n, dev = logits2d.shape[0], logits2d.device
    stats = torch.empty(3, n, dtype=torch.float32, device=dev)  # max, sum, tgt
    if n_valid == 0:  # this shard is all padding
        stats[0].fill_(float("-inf"))
        stats[1].zero_()
    else:
        step = _rows_per_block(n_valid)
        for i in range(0, n, step):
            j = min(i + step, n)
            z = logits2d[i:j, :n_valid]  # [c, n_valid], a view
            row_max = stats[0, i:j].copy_(z.amax(dim=1))  # [c] (exact in fp32)
            e = z.float().sub_(row_max.unsqueeze(1)) if z.dtype != torch.float32 \
                else z - row_max.unsqueeze(1)  # [c, n_valid] fp32, one block
            torch.sum(e.exp_(), dim=1, out=stats[1, i:j])  # [c]
    picked = logits2d.gather(1, local.clamp(0, max(n_valid - 1, 0)).unsqueeze(1)).squeeze(1)
    nan = torch.full_like(stats[2], float("nan"))
    stats[2] = torch.where(local >= 0, picked.float(), torch.where(local == -1, 0.0, nan))
    return stats[0], stats[1], stats[2]


def combine_vocab_stats(row_max: torch.Tensor, sum_exp: torch.Tensor, tgt: torch.Tensor,
                        group) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-shard cross-entropy statistics fp32 [n] (this shard's row max, sum of exp(x - row
    max), target logit or 0) -> (lse, target logit) fp32 [n] over the whole vocabulary: one MAX
    and one SUM all-reduce over `group` (none when tp = 1)."""
    if _tp_size(group) == 1:
        return row_max + torch.log(sum_exp), tgt
    gmax = row_max.clone()
    dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
    sums = torch.stack([sum_exp * torch.exp(row_max - gmax), tgt])  # [2, n]
    dist.all_reduce(sums, group=group)  # one collective for both sums
    return gmax + torch.log(sums[0]), sums[1]


def shard_grad(logits2d: torch.Tensor, lse: torch.Tensor, local: torch.Tensor, n_valid: int,
               grad: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(softmax - onehot) * grad [n, v/tp] in the logits' dtype (0 on padding columns), into
    `out` (default: a new tensor), computed in fp32 one row block at a time."""
    n, v = logits2d.shape
    out = torch.empty_like(logits2d) if out is None else out
    out[:, n_valid:] = 0
    if n_valid == 0:
        return out
    fp32 = logits2d.dtype == torch.float32
    onehot = -(local >= 0).float().unsqueeze(1)  # [n, 1]
    col = local.clamp(min=0).unsqueeze(1)  # [n, 1]
    step = _rows_per_block(n_valid)
    for i in range(0, n, step):
        j = min(i + step, n)
        dst = out[i:j, :n_valid]  # [c, n_valid]
        g = dst if fp32 else torch.empty(dst.shape, dtype=torch.float32, device=dst.device)
        torch.sub(logits2d[i:j, :n_valid], lse[i:j].unsqueeze(1), out=g).exp_()
        g.scatter_add_(1, col[i:j], onehot[i:j])
        g.mul_(grad[i:j].float().unsqueeze(1))
        if not fp32:
            dst.copy_(g)
    return out


def _check_not_reused(ctx) -> None:
    if ctx.used:
        raise RuntimeError("megacpt cross entropy (kernels): backward ran twice over one "
                           "forward; its gradient buffer is scaled in place, so "
                           "retain_graph=True is not supported")
    ctx.used = True


# ----------------------------------------------------------------------------- whole logits
class _VocabParallelCE(torch.autograd.Function):
    """Loss [n] from logits [..., v/tp]; the torch path saves the logits, the kernel path the
    gradient it wrote into them (see the module docstring)."""

    @staticmethod
    def forward(ctx, logits, target, group, vocab_size, use_kernels):
        # logits: [..., v/tp], target: [...] global ids
        x2 = kernels.as_rows(logits, logits.shape[-1])  # [n, v/tp], a view unless it must copy
        start, n_valid = shard_bounds(x2.shape[1], group, vocab_size)
        local = shard_targets(target, start, x2.shape[1], vocab_size)  # [n]
        stats = shard_stats(x2, local, n_valid, use_kernels)
        lse, tgt = combine_vocab_stats(*stats, group)  # [n] each
        ctx.shape, ctx.use_kernels, ctx.used, ctx.n_valid = logits.shape, use_kernels, False, \
            n_valid
        if not use_kernels:
            ctx.save_for_backward(x2, lse, local)
        else:
            kernels.ce_grad_(x2, lse, local, n_valid)  # in place: the logits are consumed
            if x2.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr():
                # overwritten: autograd must reject other saved uses of them; save the logits,
                # not x2 (a view made here cannot be saved across the version bump)
                torch.autograd.graph.increment_version(logits)
                x2 = logits
            ctx.save_for_backward(x2)
        return (lse - tgt).view(target.shape)

    @staticmethod
    def backward(ctx, grad):  # grad: [...] upstream gradient of each token's loss
        grad = grad.reshape(-1)
        if not ctx.use_kernels:
            x2, lse, local = ctx.saved_tensors
            g = shard_grad(x2, lse, local, ctx.n_valid, grad)
        else:
            _check_not_reused(ctx)
            (saved,) = ctx.saved_tensors
            g = kernels.as_rows(saved.detach(), ctx.shape[-1])  # the buffer forward wrote
            kernels.ce_scale_rows_(g, grad)
        return g.view(ctx.shape), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group=None,
                                 vocab_size: int | None = None,
                                 use_kernels: bool = False) -> torch.Tensor:
    """Per-token cross entropy from logits sharded on the vocabulary over `tp_group`.

    logits `[..., padded_vocab/tp]`, target `[...]` -> loss `[...]` in fp32. Columns at or past
    `vocab_size` (vocabulary padding) are masked out of the softmax, so the loss equals the
    unpadded model's (e.g. transformers' on an imported checkpoint).

    `use_kernels=True` runs the Triton kernels and, when a gradient is needed, OVERWRITES
    `logits` with it (they must feed only this loss, as the LM head's do).
    """
    if vocab_size is None:
        vocab_size = logits.shape[-1] * _tp_size(tp_group)
    vocab_size = int(vocab_size)
    if use_kernels and _tp_size(tp_group) == 1:
        return kernels.cross_entropy(logits, target, vocab_size, inplace=True)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _VocabParallelCE.apply(logits, target, tp_group, vocab_size, bool(use_kernels))
    x2 = kernels.as_rows(logits.detach(), logits.shape[-1])  # [n, v/tp]; eval: stats only
    start, n_valid = shard_bounds(x2.shape[1], tp_group, vocab_size)
    local = shard_targets(target, start, x2.shape[1], vocab_size)
    lse, tgt = combine_vocab_stats(*shard_stats(x2, local, n_valid, use_kernels), tp_group)
    return (lse - tgt).view(target.shape)


# ----------------------------------------------------------------------------- chunked LM head
# chunked_lm_head_loss(x, weight, target, tp_group, vocab_size, chunk_tokens, use_kernels)
#
#     x       [n, h]        the LM head's input, already through its tp comm (`copy_to_tp`,
#                           or `gather_from_sp` with sequence parallelism; see
#                           `ColumnParallelLinear.gather_input`)
#     weight  [v_pad/tp, h] this rank's vocabulary shard of the output layer
#     target  [n] int64     global token ids in [0, vocab_size)
#     ->      loss [n] fp32, loss_i = logsumexp(logits_i[:vocab_size]) - logits_i[target_i]
#
# with logits = x @ weight^T gathered over the vocabulary: the same values as
# `vocab_parallel_cross_entropy(F.linear(x, weight), ...)`, and gradients for x and weight under
# any per-token upstream gradient [n] (zeros included), as the unchunked path gives.
#
# Forward walks the rows `chunk_tokens` at a time: logits_c = x_c @ W^T [c, v/tp], then this
# shard's statistics (`shard_stats`); the logits chunk is dropped. The statistics of all rows
# are combined over tp at once (`combine_vocab_stats`) into lse [n]; only x, weight, target and
# lse are saved. Backward recomputes each logits_c, turns it into (softmax - onehot) * grad_c
# (`kernels.ce_grad_` in place then `kernels.ce_scale_rows_`, or `shard_grad` in place), and
# does dx_c = g_c @ W and dW += g_c^T @ x_c, dW accumulated in fp32 over the chunks and cast to
# the weight's dtype at the end. Backward needs no collective: the caller's comm reduces dx
# over tp, dW is this shard's.
#
# Cost: one more LM-head matmul than the unchunked path; peak extra memory O(chunk_tokens *
# v/tp) instead of O(n * v/tp), plus a fp32 dW buffer ([v/tp, h]).
# Rounding: fp32 equals the unchunked path up to summation order; in bf16/fp16 the logits and
# matmuls are in the weight's dtype, g_c is rounded to it before its matmuls, and each chunk's
# dW product is rounded once before the fp32 sum (within a half-type ulp or two).
class _ChunkedLMHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, group, vocab_size, chunk_tokens, use_kernels):
        # x: [n, h], weight: [v/tp, h], target: [n] global ids
        n = x.shape[0]
        start, n_valid = shard_bounds(weight.shape[0], group, vocab_size)
        stats = torch.empty(3, n, dtype=torch.float32, device=x.device)  # max, sum, tgt
        for i in range(0, n, chunk_tokens):
            j = min(i + chunk_tokens, n)
            logits = F.linear(x[i:j], weight)  # [c, v/tp]
            local = shard_targets(target[i:j], start, weight.shape[0], vocab_size)  # [c]
            for row, s in zip(stats, shard_stats(logits, local, n_valid, use_kernels)):
                row[i:j] = s
        lse, tgt = combine_vocab_stats(stats[0], stats[1], stats[2], group)  # [n] each
        ctx.save_for_backward(x, weight, target, lse)
        ctx.group, ctx.vocab_size = group, vocab_size
        ctx.chunk_tokens, ctx.use_kernels = chunk_tokens, use_kernels
        return lse - tgt

    @staticmethod
    def backward(ctx, grad):  # grad: [n], the upstream gradient of each token's loss
        x, weight, target, lse = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[:2]
        start, n_valid = shard_bounds(weight.shape[0], ctx.group, ctx.vocab_size)
        dx = torch.empty_like(x) if need_dx else None  # [n, h]
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw \
            else None  # [v/tp, h] fp32 accumulator
        for i in range(0, x.shape[0], ctx.chunk_tokens):
            j = min(i + ctx.chunk_tokens, x.shape[0])
            x_c = x[i:j]  # [c, h]
            logits = F.linear(x_c, weight)  # [c, v/tp], recomputed
            local = shard_targets(target[i:j], start, weight.shape[0], ctx.vocab_size)
            if ctx.use_kernels:
                g = kernels.ce_grad_(logits, lse[i:j], local, n_valid)  # in place
                kernels.ce_scale_rows_(g, grad[i:j])
            else:
                g = shard_grad(logits, lse[i:j], local, n_valid, grad[i:j], out=logits)
            if need_dx:
                dx[i:j] = g @ weight  # [c, h]
            if need_dw:
                if g.dtype == torch.float32:
                    dw.addmm_(g.t(), x_c)
                else:  # the product at the weight's (tensor-core) precision, summed in fp32
                    dw.add_(g.t() @ x_c)
        if need_dw:
            dw = dw.to(weight.dtype)
        return dx, dw, None, None, None, None, None


def chunked_lm_head_loss(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         tp_group=None, vocab_size: int | None = None, chunk_tokens: int = 1024,
                         use_kernels: bool = False) -> torch.Tensor:
    """Per-token loss [n] fp32 of the LM head `weight` [v_pad/tp, h] on `x` [n, h] (already
    through the head's tp comm) and global ids `target` [n], computed `chunk_tokens` rows at
    a time so the logits never exist whole (see the section comment above)."""
    if int(chunk_tokens) < 1:
        raise ValueError(f"chunked_lm_head_loss: chunk_tokens must be >= 1 (rows of logits "
                         f"per step), got {chunk_tokens}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"chunked_lm_head_loss: expected x [n, h] and weight [v/tp, h] with "
                         f"the same h, got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    if target.dtype != torch.int64 or tuple(target.shape) != (x.shape[0],):
        raise ValueError(f"chunked_lm_head_loss: target must be int64 [{x.shape[0]}] (one "
                         f"global id per row of x), got {target.dtype} {tuple(target.shape)}")
    if vocab_size is None:
        vocab_size = weight.shape[0] * _tp_size(tp_group)  # no padding
    return _ChunkedLMHeadLoss.apply(x, weight, target, tp_group, int(vocab_size),
                                    int(chunk_tokens), bool(use_kernels))
