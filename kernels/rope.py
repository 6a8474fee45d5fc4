"""Fused QKV split + rotary embedding (forward/backward) in Triton.

Imports triton at module load; use it through `megacpt.kernels.qkv_rope`, which checks that
the kernels can run first (see `_utils.kernels_available`).

Semantics (same values as `_utils.qkv_rope_ref`, which is `Attention.forward`'s torch code):
    qkv [s, b, G * (P + 2) * d]; per query group g the columns hold P query heads, then one
    key head, then one value head, each d wide (G = num_groups, P = heads_per_group,
    d = head_dim, even). Outputs, all contiguous:
        q [b, s, G * P, d]   query head g * P + j = qkv[:, :, g, j]       rotated
        k [b, s, G, d]       key head g           = qkv[:, :, g, P]       rotated
        v [b, s, G, d]       value head g         = qkv[:, :, g, P + 1]   copied unchanged
    Rotation ("rotate half", LLaMA/HF), per token at position t (its index in s) with
    c = cos[t], s_ = sin[t] ([d] rows of the fp32 tables, first s rows used), in fp32:
        y = (x.float() * c + rotate_half(x.float()) * s_).to(x.dtype),  rotate_half(x) = [-x2, x1]
    i.e. with halves x = [x1, x2], c = [c1, c2], s_ = [s1, s2]:
        y1 = x1 * c1 - x2 * s1;   y2 = x2 * c2 + x1 * s2
    (the kernel reads both halves of the tables, so any [s, d] table works, not only the
    duplicated-frequency ones `rotary_tables` builds).

Backward (the rotation is linear, so nothing of qkv is saved; only the two tables): given
dq, dk, dv (any of them None, read as zeros) it writes dqkv [s, b, G * (P + 2) * d] in qkv's
dtype, rotating back in fp32 and casting once:
    dx = dy * c + rotate_half^T(dy * s_),  rotate_half^T([g1, g2]) = [g2, -g1]
    dx1 = dy1 * c1 + dy2 * s2;   dx2 = dy2 * c2 - dy1 * s1
and copies dv into the value columns. cos and sin get no gradient. (The reference, like
the model's original rotary code, takes x.float() twice, so torch's autograd rounds the two terms of dx to the
half dtype before adding them; the kernel's single rounding differs from it by <= ~1 ulp.)

Grid: (token-row blocks over the s * b rows of qkv, query groups). A program holds a
[BLOCK_M, BLOCK_H] tile per half (BLOCK_H = next_pow2(d / 2), masked for d = 80, 96, ...),
loads its rows' cos/sin halves once and reuses them for the group's P + 1 rotated heads,
looping over the P query heads, then the key and value heads. Every element of qkv is read
once and every element of q, k, v written once (dq, dk, dv read and dqkv written once in
backward). qkv may have strided s and b dims (e.g. a slice of a wider projection output);
only a non-unit last-dim stride costs a copy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (MAX_BLOCK, check_float, check_interpreted, next_pow2, require_kernels,
                     warps_for)

_TILE_ELEMS = 1024  # elements per half-tile per program: [BLOCK_M, BLOCK_H]
_OP = "qkv_rope"


@triton.jit
def _load_tables(COS, SIN, t64, cols, mask, stride_cos, stride_sin, HALF: tl.constexpr):
    """cos/sin halves [BM, BH] fp32 for token positions t64 [BM]."""
    c_ptr = COS + t64[:, None] * stride_cos + cols[None, :]
    s_ptr = SIN + t64[:, None] * stride_sin + cols[None, :]
    c1 = tl.load(c_ptr, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s_ptr, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    return c1, c2, s1, s2


@triton.jit
def _rotate_head(SRC, DST, c1, c2, s1, s2, mask, HALF: tl.constexpr):
    """DST = rotate(SRC) for one head: [BM, BH] pointer tiles to the first half."""
    x1 = tl.load(SRC, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(SRC + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(DST, (x1 * c1 - x2 * s1).to(DST.dtype.element_ty), mask=mask)
    tl.store(DST + HALF, (x2 * c2 + x1 * s2).to(DST.dtype.element_ty), mask=mask)


@triton.jit
def _qkv_rope_fwd_kernel(QKV, COS, SIN, Q, K, V, stride_s, stride_b, stride_cos, stride_sin,
                         n_rows, batch, seq, groups, per,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM // 2
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] token rows, s-major
    g = tl.program_id(1).to(tl.int64)  # query group
    cols = tl.arange(0, BLOCK_H)  # [BH] offsets within a half
    mask = (rows < n_rows)[:, None] & (cols < HALF)[None, :]  # [BM, BH]
    rows64 = rows.to(tl.int64)
    t = rows64 // batch  # [BM] position in s
    bi = rows64 % batch  # [BM] index in b
    c1, c2, s1, s2 = _load_tables(COS, SIN, t, cols, mask, stride_cos, stride_sin, HALF)

    src = QKV + (t * stride_s + bi * stride_b)[:, None] + cols[None, :]  # [BM, BH]
    src += g * (per + 2) * HEAD_DIM
    tok = bi * seq + t  # [BM] token index in [b, s] order
    dst_q = Q + ((tok * groups * per + g * per) * HEAD_DIM)[:, None] + cols[None, :]
    for j in range(0, per):  # the group's query heads
        _rotate_head(src + j * HEAD_DIM, dst_q + j * HEAD_DIM, c1, c2, s1, s2, mask, HALF)
    dst_kv = ((tok * groups + g) * HEAD_DIM)[:, None] + cols[None, :]  # [BM, BH]
    _rotate_head(src + per * HEAD_DIM, K + dst_kv, c1, c2, s1, s2, mask, HALF)
    src_v = src + (per + 1) * HEAD_DIM
    tl.store(V + dst_kv, tl.load(src_v, mask=mask, other=0.0), mask=mask)
    tl.store(V + dst_kv + HALF, tl.load(src_v + HALF, mask=mask, other=0.0), mask=mask)


@triton.jit
def _unrotate_head(DY, DX, c1, c2, s1, s2, mask, HAS_DY: tl.constexpr, HALF: tl.constexpr):
    """DX = rotate^T(DY) for one head (zeros when there is no upstream gradient)."""
    if HAS_DY:
        dy1 = tl.load(DY, mask=mask, other=0.0).to(tl.float32)
        dy2 = tl.load(DY + HALF, mask=mask, other=0.0).to(tl.float32)
        dx1 = dy1 * c1 + dy2 * s2
        dx2 = dy2 * c2 - dy1 * s1
    else:
        dx1 = tl.zeros_like(c1)
        dx2 = dx1
    tl.store(DX, dx1.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + HALF, dx2.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _qkv_rope_bwd_kernel(DQ, DK, DV, COS, SIN, DQKV,
                         sq_b, sq_s, sq_n, sk_b, sk_s, sk_n, sv_b, sv_s, sv_n,
                         stride_cos, stride_sin, n_rows, batch, per, row_width,
                         HAS_DQ: tl.constexpr, HAS_DK: tl.constexpr, HAS_DV: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM // 2
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] rows of dqkv (contiguous)
    g = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)  # [BH]
    mask = (rows < n_rows)[:, None] & (cols < HALF)[None, :]
    rows64 = rows.to(tl.int64)
    t = rows64 // batch  # [BM]
    bi = rows64 % batch  # [BM]
    c1, c2, s1, s2 = _load_tables(COS, SIN, t, cols, mask, stride_cos, stride_sin, HALF)

    dst = DQKV + (rows64 * row_width + g * (per + 2) * HEAD_DIM)[:, None] + cols[None, :]
    dq = DQ + (bi * sq_b + t * sq_s + g * per * sq_n)[:, None] + cols[None, :]  # [BM, BH]
    for j in range(0, per):
        _unrotate_head(dq + j * sq_n, dst + j * HEAD_DIM, c1, c2, s1, s2, mask, HAS_DQ, HALF)
    dk = DK + (bi * sk_b + t * sk_s + g * sk_n)[:, None] + cols[None, :]
    _unrotate_head(dk, dst + per * HEAD_DIM, c1, c2, s1, s2, mask, HAS_DK, HALF)
    dst_v = dst + (per + 1) * HEAD_DIM
    if HAS_DV:
        dv = DV + (bi * sv_b + t * sv_s + g * sv_n)[:, None] + cols[None, :]
        tl.store(dst_v, tl.load(dv, mask=mask, other=0.0).to(DQKV.dtype.element_ty), mask=mask)
        tl.store(dst_v + HALF, tl.load(dv + HALF, mask=mask, other=0.0)
                 .to(DQKV.dtype.element_ty), mask=mask)
    else:
        zero = tl.zeros([BLOCK_M, BLOCK_H], dtype=DQKV.dtype.element_ty)
        tl.store(dst_v, zero, mask=mask)
        tl.store(dst_v + HALF, zero, mask=mask)


# ----------------------------------------------------------------------------- launch helpers
def _tiles(n_rows: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_H, num_warps): BLOCK_H covers half a head, rows fill the tile."""
    block_h = next_pow2(head_dim // 2)
    block_m = max(1, min(_TILE_ELEMS // block_h, next_pow2(max(n_rows, 1))))
    return block_m, block_h, warps_for(2 * block_m * block_h)


def qkv_rope_fwd(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: int, per: int,
                 head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [s, b, W] (unit last stride), cos/sin [s, d] -> contiguous q, k, v (see module doc)."""
    s, b, _ = qkv.shape
    kw = dict(dtype=qkv.dtype, device=qkv.device)
    q = torch.empty((b, s, groups * per, head_dim), **kw)  # [b, s, G*P, d]
    k = torch.empty((b, s, groups, head_dim), **kw)  # [b, s, G, d]
    v = torch.empty((b, s, groups, head_dim), **kw)
    n_rows = s * b
    if n_rows == 0:
        return q, k, v
    block_m, block_h, num_warps = _tiles(n_rows, head_dim)
    grid = (triton.cdiv(n_rows, block_m), groups)
    _qkv_rope_fwd_kernel[grid](qkv, cos, sin, q, k, v, qkv.stride(0), qkv.stride(1),
                               cos.stride(0), sin.stride(0), n_rows, b, s, groups, per,
                               HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_H=block_h,
                               num_warps=num_warps)
    return q, k, v


def _grad_arg(g: torch.Tensor | None, fallback: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """(tensor, (stride_b, stride_s, stride_n)) for an upstream grad [b, s, n, d]; None ->
    a dummy pointer the kernel never reads. Expanded (zero-stride) grads are read in place."""
    if g is None:
        return fallback, (0, 0, 0)
    if g.stride(-1) != 1:
        g = g.contiguous()
    return g, (g.stride(0), g.stride(1), g.stride(2))


def qkv_rope_bwd(dq, dk, dv, cos: torch.Tensor, sin: torch.Tensor, shape: torch.Size,
                 dtype: torch.dtype, groups: int, per: int, head_dim: int) -> torch.Tensor:
    """dq [b, s, G*P, d], dk/dv [b, s, G, d] (any None) -> dqkv [s, b, W] contiguous, dtype."""
    s, b, width = shape
    dqkv = torch.empty((s, b, width), dtype=dtype, device=cos.device)  # [s, b, W]
    n_rows = s * b
    if n_rows == 0:
        return dqkv
    (dq_t, sq), (dk_t, sk), (dv_t, sv) = (_grad_arg(g, dqkv) for g in (dq, dk, dv))
    block_m, block_h, num_warps = _tiles(n_rows, head_dim)
    grid = (triton.cdiv(n_rows, block_m), groups)
    _qkv_rope_bwd_kernel[grid](dq_t, dk_t, dv_t, cos, sin, dqkv, *sq, *sk, *sv,
                               cos.stride(0), sin.stride(0), n_rows, b, per, width,
                               HAS_DQ=dq is not None, HAS_DK=dk is not None,
                               HAS_DV=dv is not None, HEAD_DIM=head_dim, BLOCK_M=block_m,
                               BLOCK_H=block_h, num_warps=num_warps)
    return dqkv


class QKVRopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, groups: int, per: int, head_dim: int):
        if qkv.stride(-1) != 1:
            qkv = qkv.contiguous()
        q, k, v = qkv_rope_fwd(qkv, cos, sin, groups, per, head_dim)
        ctx.save_for_backward(cos, sin)  # the rotation is linear: qkv itself is not needed
        ctx.meta = (qkv.shape, qkv.dtype, groups, per, head_dim)
        ctx.set_materialize_grads(False)  # unused outputs arrive as None, read as zeros
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        cos, sin = ctx.saved_tensors
        dqkv = qkv_rope_bwd(dq, dk, dv, cos, sin, *ctx.meta)
        return dqkv, None, None, None, None, None


# ----------------------------------------------------------------------------- public entry
def _check_dims(num_groups, heads_per_group, head_dim) -> None:
    for name, val in (("num_groups", num_groups), ("heads_per_group", heads_per_group),
                      ("head_dim", head_dim)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"megacpt.kernels.{_OP}: {name} must be a positive int, got {val!r}")
    if head_dim % 2 != 0:
        raise ValueError(f"megacpt.kernels.{_OP}: head_dim must be even (rotate-half splits "
                         f"each head into two halves), got {head_dim}")
    if head_dim // 2 > MAX_BLOCK:
        raise ValueError(f"megacpt.kernels.{_OP}: head_dim {head_dim} exceeds the largest "
                         f"supported head ({2 * MAX_BLOCK})")


def _check_table(t: torch.Tensor, name: str, qkv: torch.Tensor, head_dim: int) -> None:
    check_float(t, name, _OP)
    s = qkv.shape[0]
    if t.dim() != 2 or t.shape[0] < s or t.shape[1] != head_dim:
        raise ValueError(f"megacpt.kernels.{_OP}: {name} has shape {tuple(t.shape)}; expected "
                         f"[>= s, head_dim] = [>= {s}, {head_dim}] (its first s rows are used)")
    if t.device != qkv.device:
        raise ValueError(f"megacpt.kernels.{_OP}: {name} is on {t.device}, qkv on {qkv.device}")


def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_groups: int,
             heads_per_group: int, head_dim: int):
    """Split qkv [s, b, G * (P + 2) * d] into rotated q [b, s, G*P, d], rotated k [b, s, G, d]
    and v [b, s, G, d] (all contiguous, qkv's dtype); autograd-aware in qkv only.

    cos/sin: [>= s, d] tables (fp32, bf16 or fp16; math in fp32), first s rows used.
    """
    check_float(qkv, "qkv", _OP)
    _check_dims(num_groups, heads_per_group, head_dim)
    width = num_groups * (heads_per_group + 2) * head_dim
    if qkv.dim() != 3 or qkv.shape[-1] != width:
        raise ValueError(
            f"megacpt.kernels.{_OP}: qkv has shape {tuple(qkv.shape)}; expected [s, b, "
            f"num_groups * (heads_per_group + 2) * head_dim] = [s, b, {width}] ({num_groups} "
            f"groups x ({heads_per_group} query + 1 key + 1 value heads) x {head_dim})")
    _check_table(cos, "cos", qkv, head_dim)
    _check_table(sin, "sin", qkv, head_dim)
    require_kernels(qkv.device, _OP)
    check_interpreted(_qkv_rope_fwd_kernel, qkv.device, _OP)
    s = qkv.shape[0]
    cos, sin = cos[:s], sin[:s]  # [s, d]
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    return QKVRopeFunction.apply(qkv, cos, sin, num_groups, heads_per_group, head_dim)
