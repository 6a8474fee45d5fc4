"""Tensor-parallel layers: the small pieces that make single-device model code parallel.

- `ColumnParallelLinear`: weight `[out/tp, in]`, output stays sharded on its last dim.
- `RowParallelLinear`: weight `[out, in/tp]`, input sharded on its last dim, output summed.
- `VocabParallelEmbedding`: weight `[padded_vocab/tp, h]`, each rank embeds its id range.
- `vocab_parallel_cross_entropy`: loss from vocab-sharded logits without gathering them.
  With `use_kernels` it runs the fused Triton cross entropy (`megacpt.kernels`): one read of
  each logits shard for the statistics, the gradient written in place into the shard.
  Its tp combine of per-shard statistics, `combine_vocab_stats`, also serves the chunked LM
  head (`megacpt.parallel.lm_head`), which never materialises the whole logits.

With sequence parallelism the activations between these layers are `[s/tp, b, h]`: a column
layer all-gathers the sequence before its matmul and a row layer reduce-scatters after it.
With tp = 1 every layer is a plain `torch.nn.functional` call.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megacpt import kernels
from megacpt.kernels._utils import as_rows
from megacpt.parallel import comm
from megacpt.parallel.wgrad import linear


def _tp_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _tp_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split along its output rows over the tensor-parallel group."""

    def __init__(self, in_features: int, out_features: int, tp_group=None,
                 sequence_parallel: bool = False, gather_output: bool = False,
                 dtype: torch.dtype = torch.float32, device=None, bias: bool = False,
                 skip_weight_param_allocation: bool = False):
        super().__init__()
        tp = _tp_size(tp_group)
        if out_features % tp:
            raise ValueError(f"output size {out_features} is not divisible by the "
                             f"tensor-parallel size {tp}")
        self.tp_group, self.sequence_parallel, self.gather_output = (
            tp_group, sequence_parallel, gather_output)
        # skip_weight_param_allocation (Megatron's name): the weight is passed to forward,
        # e.g. the input embedding's for a tied output layer
        self.weight = None if skip_weight_param_allocation else nn.Parameter(
            torch.empty(out_features // tp, in_features, dtype=dtype, device=device))
        # bias [out/tp]: split over tp like the weight's rows (never sequence-sharded)
        self.bias = nn.Parameter(torch.zeros(out_features // tp, dtype=dtype, device=device)) \
            if bias else None

    def gather_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input comm of `forward`: [s(/tp), b, in] -> [s, b, in] on every tp rank."""
        if self.sequence_parallel:
            return comm.gather_from_sp(x, self.tp_group)  # [s, b, in]
        return comm.copy_to_tp(x, self.tp_group)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        # x: [s(/tp), b, in]; weight [out/tp, in] only with skip_weight_param_allocation
        x = self.gather_input(x)
        if weight is None:
            y = linear(x, self.weight)  # [s, b, out/tp]
        else:  # a shared weight (tied embedding) gets its gradient from two uses: no wgrad
            y = F.linear(x, weight)  # fusion, autograd sums both into .grad for the hook
        if self.bias is not None:
            y = y + self.bias
        if self.gather_output:
            y = comm.gather_from_tp(y, self.tp_group)
        return y


class RowParallelLinear(nn.Module):
    """y = x W^T with W split along its input columns; partial sums reduced over tp."""

    def __init__(self, in_features: int, out_features: int, tp_group=None,
                 sequence_parallel: bool = False, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        tp = _tp_size(tp_group)
        if in_features % tp:
            raise ValueError(f"input size {in_features} is not divisible by the "
                             f"tensor-parallel size {tp}")
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp,
                                               dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [s, b, in/tp]
        y = linear(x, self.weight)  # [s, b, out] partial sum
        if self.sequence_parallel:
            return comm.reduce_scatter_to_sp(y, self.tp_group)  # [s/tp, b, out]
        return comm.reduce_from_tp(y, self.tp_group)


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the padded vocabulary) are split over tp ranks."""

    def __init__(self, padded_vocab_size: int, hidden_size: int, tp_group=None,
                 sequence_parallel: bool = False, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        tp = _tp_size(tp_group)
        if padded_vocab_size % tp:
            raise ValueError(f"padded vocabulary {padded_vocab_size} is not divisible by the "
                             f"tensor-parallel size {tp}")
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.per_rank = padded_vocab_size // tp
        self.start = _tp_rank(tp_group) * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden_size,
                                               dtype=dtype, device=device))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: [b, s]
        ids = tokens.t()  # [s, b]
        if self.tp_group is None:
            out = F.embedding(ids, self.weight)  # [s, b, h]
        else:
            outside = (ids < self.start) | (ids >= self.start + self.per_rank)
            local = (ids - self.start).masked_fill(outside, 0)
            out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return comm.reduce_scatter_to_sp(out, self.tp_group)  # [s/tp, b, h]
        return comm.reduce_from_tp(out, self.tp_group)


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_size):
        # logits: [..., v/tp] (any float dtype), target: [...] global ids
        ctx.in_dtype = logits.dtype
        logits = logits.float()
        per_rank = logits.shape[-1]
        start = _tp_rank(group) * per_rank
        pad_from = vocab_size - start  # local columns >= this are vocabulary padding
        if pad_from < per_rank:
            logits = logits.clone()
            logits[..., max(pad_from, 0):] = float("-inf")
        lmax = logits.max(dim=-1).values
        if group is not None:
            dist.all_reduce(lmax, op=dist.ReduceOp.MAX, group=group)
        logits = logits - lmax.unsqueeze(-1)
        outside = (target < start) | (target >= start + per_rank)
        local = (target - start).masked_fill(outside, 0)
        picked = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = logits.exp_()
        sum_exp = exp.sum(dim=-1)
        if group is not None:
            dist.all_reduce(picked, group=group)
            dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - picked
        exp.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(exp, local, outside)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, local, outside = ctx.saved_tensors
        g = softmax
        onehot_rows = (~outside).to(g.dtype)
        g.scatter_add_(-1, local.unsqueeze(-1), -onehot_rows.unsqueeze(-1))
        g.mul_(grad.unsqueeze(-1))
        return g.to(ctx.in_dtype), None, None, None


def _shard_targets(target: torch.Tensor, start: int, per_rank: int,
                   vocab_size: int) -> torch.Tensor:
    """Global ids [...] -> this shard's column [n] int64: -1 where the id lives on another
    rank, -2 for ids outside [0, vocab_size) (the kernels then give a NaN loss)."""
    t = target.reshape(-1)
    local = t - start
    local = torch.where((local >= 0) & (local < per_rank), local, -1)
    return torch.where((t >= 0) & (t < vocab_size), local, -2)


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


def _kernel_shard_loss(logits2d, target, group, vocab_size, write_grad: bool):
    """Loss [n] fp32 over vocab shards with the Triton stats (and, with write_grad, the
    unscaled gradient softmax - onehot written into logits2d [n, v/tp] in place)."""
    per_rank = logits2d.shape[1]
    start = _tp_rank(group) * per_rank
    n_valid = min(max(vocab_size - start, 0), per_rank)  # columns past it are padding
    local = _shard_targets(target, start, per_rank, vocab_size)
    row_max, sum_exp, tgt = kernels.ce_shard_stats(logits2d, local, n_valid)  # fp32 [n] each
    lse, tgt = combine_vocab_stats(row_max, sum_exp, tgt, group)  # [n] each
    if write_grad:
        kernels.ce_grad_(logits2d, lse, local, n_valid)
    return lse - tgt


class _VocabParallelCEKernels(torch.autograd.Function):
    """`_VocabParallelCE` with the Triton kernels; the gradient lives in the logits shard."""

    @staticmethod
    def forward(ctx, logits, target, group, vocab_size):
        # logits: [..., v/tp], target: [...] global ids
        x2 = as_rows(logits, logits.shape[-1])  # [n, v/tp], a view unless it must copy
        loss = _kernel_shard_loss(x2, target, group, vocab_size, write_grad=True)
        if x2.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr():
            # overwritten by the gradient: autograd must reject other saved uses of them; save
            # the logits, not x2 (a view made here cannot be saved across the version bump)
            torch.autograd.graph.increment_version(logits)
            x2 = logits
        ctx.save_for_backward(x2)
        ctx.shape, ctx.used = logits.shape, False
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad):
        return kernels.ce_backward(ctx, grad)  # scales the saved shard rows by grad[n]


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group=None,
                                 vocab_size: int | None = None,
                                 use_kernels: bool = False) -> torch.Tensor:
    """Per-token cross entropy from logits sharded on the vocabulary over `tp_group`.

    logits `[..., padded_vocab/tp]`, target `[...]` -> loss `[...]` in fp32. Columns at or past
    `vocab_size` (vocabulary padding) are masked out of the softmax, so the loss equals the
    unpadded model's (e.g. transformers' on an imported checkpoint).

    `use_kernels=True` runs the Triton kernels (`megacpt.kernels.cross_entropy`) and, when a
    gradient is needed, OVERWRITES `logits` with it (they must feed only this loss, as the LM
    head's do); a target outside [0, vocab_size) then gives a NaN loss instead of an error.
    """
    if vocab_size is None:
        vocab_size = logits.shape[-1] * _tp_size(tp_group)
    if use_kernels:
        if _tp_size(tp_group) == 1:
            return kernels.cross_entropy(logits, target, vocab_size, inplace=True)
        if torch.is_grad_enabled() and logits.requires_grad:
            return _VocabParallelCEKernels.apply(logits, target, tp_group, vocab_size)
        x2 = as_rows(logits.detach(), logits.shape[-1])  # [n, v/tp]; eval: stats only
        return _kernel_shard_loss(x2, target, tp_group, vocab_size,
                                  write_grad=False).view(target.shape)
    if _tp_size(tp_group) == 1:  # one rank: exactly the plain model's loss, at its speed
        flat = logits[..., :vocab_size].float().reshape(-1, vocab_size)  # [n, V]
        return F.cross_entropy(flat, target.reshape(-1), reduction="none").view(target.shape)
    return _VocabParallelCE.apply(logits, target, tp_group, vocab_size)
