"""How each model parameter is split over tensor-parallel ranks: the one source of truth.

Parameter names are global (layer indices count from 0 over the whole model, whatever the
pipeline stage), so a name means the same tensor in every layout:

| name                                   | full shape                    | split over tp      |
|----------------------------------------|-------------------------------|--------------------|
| embedding.weight                       | [padded_vocab, h]             | dim 0 (rows)       |
| layers.{i}.input_norm.weight           | [h]                           | replicated         |
| layers.{i}.attention.qkv.weight        | [(nh + 2 ng) * d, h]          | dim 0, by groups   |
| layers.{i}.attention.proj.weight       | [h, nh * d]                   | dim 1              |
| layers.{i}.post_attention_norm.weight  | [h]                           | replicated         |
| layers.{i}.mlp.gate_up.weight          | [2 ffn, h] = cat[gate; up]    | each half on dim 0 |
| layers.{i}.mlp.down.weight             | [h, ffn]                      | dim 1              |
| final_norm.weight                      | [h]                           | replicated         |
| output.weight                          | [padded_vocab, h]             | dim 0 (rows)       |

The fused QKV rows are interleaved per query group (Megatron's LLaMA layout): for each group
g, its nh/ng query heads, then its key head, then its value head, each `d` rows. A contiguous
dim-0 chunk is then whole groups, so GQA shards cleanly when tp divides ng. The fused gate-up
is `cat[gate; up]` (Megatron's fc1); rank r holds `cat[gate_r; up_r]`.
"""
from __future__ import annotations

import re
import zlib

import torch

ROW, COL, GATE_UP, REPLICATED = "row", "col", "gate_up", "replicated"

_RULES = [
    (re.compile(r"(^|\.)embedding\.weight$"), ROW),
    (re.compile(r"(^|\.)output\.weight$"), ROW),
    (re.compile(r"attention\.qkv\.weight$"), ROW),
    (re.compile(r"attention\.qkv\.bias$"), ROW),
    (re.compile(r"attention\.proj\.weight$"), COL),
    (re.compile(r"mlp\.gate_up\.weight$"), GATE_UP),
    (re.compile(r"mlp\.down\.weight$"), COL),
    (re.compile(r"norm\.weight$"), REPLICATED),
]


def shard_kind(name: str) -> str:
    """The split rule for a parameter name (see the table above)."""
    for pattern, kind in _RULES:
        if pattern.search(name):
            return kind
    raise KeyError(f"no tensor-parallel rule for parameter {name!r}")


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
    kind = shard_kind(name)
    shape = list(local_shape)
    if kind in (ROW, GATE_UP):
        shape[0] *= tp
    elif kind == COL:
        shape[1] *= tp
    return torch.Size(shape)


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
