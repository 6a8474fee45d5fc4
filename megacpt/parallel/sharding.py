"""How each model parameter is split over tensor-parallel ranks (split, unsplit, shapes).

Which rule applies to which parameter is a column of the parameter table in `megacpt.params`
(the one place the layout is described; see its docstring for the table). Kinds:

- ROW: contiguous chunks of dim 0 (embedding, output, the fused QKV: its rows are interleaved
  per query group, so a chunk is whole groups and GQA shards cleanly when tp divides ng)
- COL: contiguous chunks of dim 1 (attention proj, MLP down)
- GATE_UP: the fused `cat[gate; up]` (Megatron's fc1); rank r holds `cat[gate_r; up_r]`
- REPLICATED: every rank holds the whole tensor (norms)
"""
from __future__ import annotations

import zlib

import torch

from megacpt.params import COL, GATE_UP, REPLICATED, ROW, split_dim  # noqa: F401 - re-exported
from megacpt.params import shard_kind  # noqa: F401 - re-exported: the rule of a name


def shard(name: str, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's part of the full tensor `full` of parameter `name`."""
    kind = shard_kind(name)
    if tp == 1 or kind == REPLICATED:
        return full
    if kind == ROW:
        return _chunk(name, full, 0, tp)[tp_rank]
    if kind == COL:
        return _chunk(name, full, 1, tp)[tp_rank]
    gate, up = _chunk(name, full, 0, 2)
    return torch.cat([_chunk(name, gate, 0, tp)[tp_rank], _chunk(name, up, 0, tp)[tp_rank]])


def unshard(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor from every tp rank's part (in tp-rank order)."""
    kind = shard_kind(name)
    if len(parts) == 1 or kind == REPLICATED:
        return parts[0]
    if kind == ROW:
        return torch.cat(parts, 0)
    if kind == COL:
        return torch.cat(parts, 1)
    halves = [p.chunk(2, 0) for p in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)


def full_shape(name: str, local_shape: torch.Size, tp: int) -> torch.Size:
    """The full tensor's shape from one rank's part."""
    dim = split_dim(shard_kind(name))
    shape = list(local_shape)
    if dim is not None:
        shape[dim] *= tp
    return torch.Size(shape)


def segments(name: str, size: int, tp: int, tp_rank: int) -> tuple[int | None, list]:
    """Where rank `tp_rank`'s part lies in the full tensor: (split dim, [(start, stop)] along
    it, in the order the part holds them); `size` is the full tensor's size on that dim.
    (None, []) for a replicated parameter. The resharding loader intersects these ranges of
    a saved layout with those of the new one and reads only the overlap."""
    kind = shard_kind(name)
    dim = split_dim(kind)
    if dim is None:
        return None, []
    if kind == GATE_UP:
        half = size // 2
        n = half // tp
        lo = tp_rank * n
        return dim, [(lo, lo + n), (half + lo, half + lo + n)]
    n = size // tp
    return dim, [(tp_rank * n, (tp_rank + 1) * n)]


def _chunk(name: str, t: torch.Tensor, dim: int, n: int):
    if t.shape[dim] % n:
        raise ValueError(f"{name}: dim {dim} of shape {tuple(t.shape)} is not divisible by {n}")
    return t.chunk(n, dim)


def param_seed(seed: int, name: str) -> int:
    """Per-parameter seed from the run seed and the global name: layout-independent init."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


# ----- fused QKV layout (per query group) -----

def qkv_from_separate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      num_heads: int, num_groups: int) -> torch.Tensor:
    """Fuse q [nh*d, h], k [ng*d, h], v [ng*d, h] into our per-group QKV [(nh+2ng)*d, h]
    (biases: the same without the h dim)."""
    d = q.shape[0] // num_heads
    rest = tuple(q.shape[1:])  # (h,) for weights, () for biases
    per = num_heads // num_groups
    qg = q.reshape(num_groups, per * d, *rest)
    kg = k.reshape(num_groups, d, *rest)
    vg = v.reshape(num_groups, d, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def qkv_to_separate(qkv: torch.Tensor, num_heads: int, num_groups: int):
    """Inverse of `qkv_from_separate`: (q, k, v)."""
    per = num_heads // num_groups
    d = qkv.shape[0] // (num_heads + 2 * num_groups)
    rest = tuple(qkv.shape[1:])  # (h,) for weights, () for biases
    g = qkv.reshape(num_groups, (per + 2) * d, *rest)
    q = g[:, : per * d].reshape(-1, *rest)
    k = g[:, per * d: (per + 1) * d].reshape(-1, *rest)
    v = g[:, (per + 1) * d:].reshape(-1, *rest)
    return q, k, v
