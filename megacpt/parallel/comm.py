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


def _mapping(name: str, forward, backward):
    """`name(x, group)`: an autograd function running `forward(x, group)` whose backward is
    `backward(grad, group)`; the identity when the group has one rank. (The callables look
    the primitives up by name at call time, so tests can wrap them to count bytes.)"""

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, group):
            ctx.group = group
            return forward(x, group)

        @staticmethod
        def backward(ctx, g):
            return backward(g, ctx.group), None

    _Fn.__name__ = _Fn.__qualname__ = f"_{name}"

    def apply(x, group):
        return x if _size(group) == 1 else _Fn.apply(x, group)

    apply.__name__ = apply.__qualname__ = name
    return apply


# the table in the module docstring, row by row
copy_to_tp = _mapping("copy_to_tp", lambda x, grp: x,
                      lambda g, grp: all_reduce(g.clone(), grp))
reduce_from_tp = _mapping("reduce_from_tp", lambda x, grp: all_reduce(x.clone(), grp),
                          lambda g, grp: g)
scatter_to_tp = _mapping("scatter_to_tp", lambda x, grp: split(x, grp, -1),
                         lambda g, grp: all_gather(g, grp, -1))
gather_from_tp = _mapping("gather_from_tp", lambda x, grp: all_gather(x, grp, -1),
                          lambda g, grp: split(g, grp, -1))
scatter_to_sp = _mapping("scatter_to_sp", lambda x, grp: split(x, grp, 0),
                         lambda g, grp: all_gather(g, grp, 0))
gather_from_sp = _mapping("gather_from_sp", lambda x, grp: all_gather(x, grp, 0),
                          lambda g, grp: reduce_scatter(g, grp, 0))
reduce_scatter_to_sp = _mapping("reduce_scatter_to_sp", lambda x, grp: reduce_scatter(x, grp, 0),
                                lambda g, grp: all_gather(g, grp, 0))
