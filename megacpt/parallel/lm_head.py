"""Chunked LM head + cross entropy: the per-token loss without the whole logits in memory.

`chunked_lm_head_loss(x, weight, target, tp_group, vocab_size, chunk_tokens, use_kernels)`

    x       [n, h]        the LM head's input, already through its tp comm (`copy_to_tp`,
                          or `gather_from_sp` with sequence parallelism; see
                          `ColumnParallelLinear.gather_input`)
    weight  [v_pad/tp, h] this rank's vocabulary shard of the output layer
    target  [n] int64     global token ids in [0, vocab_size)
    ->      loss [n] fp32, loss_i = logsumexp(logits_i[:vocab_size]) - logits_i[target_i]

with logits = x @ weight^T gathered over the vocabulary: the same values as
`vocab_parallel_cross_entropy(F.linear(x, weight), target, tp_group, vocab_size, use_kernels)`
(columns at or past `vocab_size` are padding and excluded), and gradients for x and weight
under any per-token upstream gradient [n] (zeros included), as the unchunked path gives.

How. Forward walks the rows `chunk_tokens` at a time: logits_c = x_c @ W^T [c, v/tp], then
this shard's per-row statistics (row max, sum of exp(x - row max), target logit), fp32:
`kernels.ce_shard_stats` with `use_kernels`, else plain torch. The logits chunk is then
dropped. Once every row has its statistics they are combined over the tp group (one MAX and
one SUM all-reduce for all rows: `layers.combine_vocab_stats`, shared with the unchunked
kernel path) into lse [n]. Only x, weight, target and lse [n] are saved. Backward recomputes
each logits_c, turns it into (softmax - onehot) * grad_c (`kernels.ce_grad_` in place then
`kernels.ce_scale_rows_`, or torch), and does dx_c = g_c @ W and dW += g_c^T @ x_c; dW is
accumulated in fp32 over the chunks and cast to the weight's dtype at the end. Backward needs
no collective: the caller's comm reduces dx over tp, dW is this shard's.

Cost: one more LM-head matmul than the unchunked path (logits are recomputed in backward);
peak extra memory is O(chunk_tokens * v/tp) instead of O(n * v/tp), plus a fp32 dW buffer
([v/tp, h]; it is the gradient itself when the weight is fp32).

Rounding: in fp32 the results equal the unchunked path's up to summation order. In bf16/fp16
the logits and the matmuls are in the weight's dtype as in the unchunked path, the gradient
g_c is rounded to that dtype before its matmuls, and each chunk's dW product is rounded once
before the fp32 sum (within a half-type ulp or two of the unchunked gradients).

A target outside [0, vocab_size) gives a NaN loss (both paths; no host sync to check it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megacpt import kernels
from megacpt.parallel.layers import _shard_targets, _tp_rank, _tp_size, combine_vocab_stats


def _torch_stats(logits: torch.Tensor, local: torch.Tensor, n_valid: int):
    """fp32 [c] (row_max, sum_exp, target_logit) of a logits chunk [c, v/tp], with the
    semantics of `kernels.ce_shard_stats` (local -1: target on another shard, -2: invalid)."""
    c = logits.shape[0]
    nan = torch.full((c,), float("nan"), device=logits.device)
    if n_valid == 0:  # this shard is all padding
        return (torch.full((c,), float("-inf"), device=logits.device),
                torch.zeros(c, device=logits.device),
                torch.where(local == -1, 0.0, nan))
    z = logits[:, :n_valid].float()  # [c, n_valid]
    row_max = z.max(dim=1).values  # [c]
    sum_exp = torch.exp(z - row_max.unsqueeze(1)).sum(dim=1)  # [c]
    picked = z.gather(1, local.clamp(min=0).unsqueeze(1)).squeeze(1)  # [c]
    tgt = torch.where(local >= 0, picked, torch.where(local == -1, 0.0, nan))
    return row_max, sum_exp, tgt


def _torch_grad(logits: torch.Tensor, lse: torch.Tensor, local: torch.Tensor, n_valid: int,
                grad: torch.Tensor) -> torch.Tensor:
    """(softmax - onehot) * grad [c, v/tp] in the logits' dtype; 0 on padding columns."""
    g = torch.exp(logits.float() - lse.unsqueeze(1))  # [c, v/tp] fp32
    g[:, n_valid:] = 0.0
    g.scatter_add_(1, local.clamp(min=0).unsqueeze(1), -(local >= 0).float().unsqueeze(1))
    g.mul_(grad.float().unsqueeze(1))
    return g.to(logits.dtype)


def _shard(weight: torch.Tensor, group, vocab_size: int) -> tuple[int, int]:
    """(first global column of this shard, how many of its columns are real vocabulary)."""
    per_rank = weight.shape[0]
    start = _tp_rank(group) * per_rank
    return start, min(max(vocab_size - start, 0), per_rank)


class _ChunkedLMHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, group, vocab_size, chunk_tokens, use_kernels):
        # x: [n, h], weight: [v/tp, h], target: [n] global ids
        n = x.shape[0]
        start, n_valid = _shard(weight, group, vocab_size)
        stats = torch.empty(3, n, dtype=torch.float32, device=x.device)  # max, sum, tgt
        for i in range(0, n, chunk_tokens):
            j = min(i + chunk_tokens, n)
            logits = F.linear(x[i:j], weight)  # [c, v/tp]
            local = _shard_targets(target[i:j], start, weight.shape[0], vocab_size)  # [c]
            if use_kernels:
                chunk = kernels.ce_shard_stats(logits, local, n_valid)
            else:
                chunk = _torch_stats(logits, local, n_valid)
            for row, s in zip(stats, chunk):
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
        start, n_valid = _shard(weight, ctx.group, ctx.vocab_size)
        dx = torch.empty_like(x) if need_dx else None  # [n, h]
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw \
            else None  # [v/tp, h] fp32 accumulator
        for i in range(0, x.shape[0], ctx.chunk_tokens):
            j = min(i + ctx.chunk_tokens, x.shape[0])
            x_c = x[i:j]  # [c, h]
            logits = F.linear(x_c, weight)  # [c, v/tp], recomputed
            local = _shard_targets(target[i:j], start, weight.shape[0], ctx.vocab_size)
            if ctx.use_kernels:
                g = kernels.ce_grad_(logits, lse[i:j], local, n_valid)  # in place
                kernels.ce_scale_rows_(g, grad[i:j])
            else:
                g = _torch_grad(logits, lse[i:j], local, n_valid, grad[i:j])
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
    a time so the logits never exist whole (see the module docstring)."""
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
