"""Tensor- and sequence-parallel communication primitives as autograd functions (one file).

Each maps a tensor into or out of the tensor-parallel region; the backward does the dual op:

| function               | forward                         | backward                        |
|------------------------|---------------------------------|---------------------------------|
| copy_to_tp             | identity                        | all-reduce                      |
| reduce_from_tp         | all-reduce                      | identity                        |
| scatter_to_tp          | keep this rank's last-dim chunk | all-gather along last dim       |
| gather_from_tp         | all-gather along last dim       | keep this rank's chunk          |
| scatter_to_sp          | keep this rank's dim-0 chunk    | all-gather along dim 0          |
| gather_from_sp         | all-gather along dim 0          | reduce-scatter along dim 0      |
| reduce_scatter_to_sp   | reduce-scatter along dim 0      | all-gather along dim 0          |

With `group=None` (tp = 1) every function is the identity. Sequence-parallel tensors are laid
out `[s, b, h]`, so dim 0 is the sequence.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the "
                         f"tensor-parallel size {n}")
    return x.chunk(n, dim=dim)[_rank(group)].contiguous()


def reduce_scatter(x: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    chunks = [c.contiguous() for c in x.chunk(n, dim=dim)]
    out = torch.empty_like(chunks[0])
    if dist.get_backend(group) == "gloo":  # gloo has no reduce_scatter
        total = all_reduce(x.clone(), group)
        return total.chunk(n, dim=dim)[_rank(group)].contiguous()
    dist.reduce_scatter(out, chunks, group=group)
    return out


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split(x, group, -1)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.group, -1), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, group, -1)

    @staticmethod
    def backward(ctx, g):
        return split(g, ctx.group, -1), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split(x, group, 0)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.group, 0), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, group, 0)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter(g, ctx.group, 0), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter(x, group, 0)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.group, 0), None


def copy_to_tp(x, group):
    return x if _size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    return x if _size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp(x, group):
    return x if _size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp(x, group):
    return x if _size(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_sp(x, group):
    return x if _size(group) == 1 else _ScatterToSP.apply(x, group)


def gather_from_sp(x, group):
    return x if _size(group) == 1 else _GatherFromSP.apply(x, group)


def reduce_scatter_to_sp(x, group):
    return x if _size(group) == 1 else _ReduceScatterToSP.apply(x, group)
