"""Tensor-parallel layers: the small pieces that make single-device model code parallel.

- `ColumnParallelLinear`: weight `[out/tp, in]`, output stays sharded on its last dim.
- `RowParallelLinear`: weight `[out, in/tp]`, input sharded on its last dim, output summed.
- `VocabParallelEmbedding`: weight `[padded_vocab/tp, h]`, each rank embeds its id range.

The loss over the vocabulary-sharded output layer has its own home,
`megacpt.parallel.cross_entropy` (`vocab_parallel_cross_entropy` is re-exported here for
existing callers).

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
from megacpt.parallel.cross_entropy import vocab_parallel_cross_entropy  # noqa: F401
from megacpt.parallel.wgrad import linear


def _tp_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _tp_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _per_rank(size: int, group, what: str) -> int:
    """`size` / tp, refused with a message naming `what` when tp does not divide it."""
    tp = _tp_size(group)
    if size % tp:
        raise ValueError(f"{what} {size} is not divisible by the tensor-parallel size {tp}")
    return size // tp


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split along its output rows over the tensor-parallel group."""

    def __init__(self, in_features: int, out_features: int, tp_group=None,
                 sequence_parallel: bool = False, gather_output: bool = False,
                 dtype: torch.dtype = torch.float32, device=None, bias: bool = False,
                 skip_weight_param_allocation: bool = False):
        super().__init__()
        out_per_rank = _per_rank(out_features, tp_group, "output size")
        self.tp_group, self.sequence_parallel, self.gather_output = (
            tp_group, sequence_parallel, gather_output)
        # skip_weight_param_allocation (Megatron's name): the weight is passed to forward,
        # e.g. the input embedding's for a tied output layer
        self.weight = None if skip_weight_param_allocation else nn.Parameter(
            torch.empty(out_per_rank, in_features, dtype=dtype, device=device))
        # bias [out/tp]: split over tp like the weight's rows (never sequence-sharded)
        self.bias = nn.Parameter(torch.zeros(out_per_rank, dtype=dtype, device=device)) \
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
        in_per_rank = _per_rank(in_features, tp_group, "input size")
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.weight = nn.Parameter(torch.empty(out_features, in_per_rank,
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
        self.per_rank = _per_rank(padded_vocab_size, tp_group, "padded vocabulary")
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
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
