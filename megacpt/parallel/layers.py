"""Tensor-parallel layers: the small pieces that make single-device model code parallel.

- `ColumnParallelLinear`: weight `[out/tp, in]`, output stays sharded on its last dim.
- `RowParallelLinear`: weight `[out, in/tp]`, input sharded on its last dim, output summed.
- `VocabParallelEmbedding`: weight `[padded_vocab/tp, h]`, each rank embeds its id range.
- `vocab_parallel_cross_entropy`: loss from vocab-sharded logits without gathering them.

With sequence parallelism the activations between these layers are `[s/tp, b, h]`: a column
layer all-gathers the sequence before its matmul and a row layer reduce-scatters after it.
With tp = 1 every layer is a plain `torch.nn.functional` call.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megacpt.parallel import comm


def _tp_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _tp_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split along its output rows over the tensor-parallel group."""

    def __init__(self, in_features: int, out_features: int, tp_group=None,
                 sequence_parallel: bool = False, gather_output: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        tp = _tp_size(tp_group)
        if out_features % tp:
            raise ValueError(f"output size {out_features} is not divisible by the "
                             f"tensor-parallel size {tp}")
        self.tp_group, self.sequence_parallel, self.gather_output = (
            tp_group, sequence_parallel, gather_output)
        self.weight = nn.Parameter(torch.empty(out_features // tp, in_features,
                                               dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [s(/tp), b, in]
        if self.sequence_parallel:
            x = comm.gather_from_sp(x, self.tp_group)  # [s, b, in]
        else:
            x = comm.copy_to_tp(x, self.tp_group)
        y = F.linear(x, self.weight)  # [s, b, out/tp]
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
        y = F.linear(x, self.weight)  # [s, b, out] partial sum
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


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group=None,
                                 vocab_size: int | None = None) -> torch.Tensor:
    """Per-token cross entropy from logits sharded on the vocabulary over `tp_group`.

    logits `[..., padded_vocab/tp]`, target `[...]` -> loss `[...]` in fp32. Columns at or past
    `vocab_size` (vocabulary padding) are masked out of the softmax, so the loss equals the
    unpadded model's (e.g. transformers' on an imported checkpoint).
    """
    if vocab_size is None:
        vocab_size = logits.shape[-1] * _tp_size(tp_group)
    if _tp_size(tp_group) == 1:  # one rank: exactly the plain model's loss, at its speed
        flat = logits[..., :vocab_size].float().reshape(-1, vocab_size)  # [n, V]
        return F.cross_entropy(flat, target.reshape(-1), reduction="none").view(target.shape)
    return _VocabParallelCE.apply(logits, target, tp_group, vocab_size)
