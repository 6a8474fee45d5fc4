"""Fused RMSNorm forward/backward in Triton (LLaMA/HF casting semantics).

Imports triton at module load; use it through `megacpt.kernels.rms_norm`, which checks that
the kernels can run first (see `_utils.kernels_available`).

Semantics (same as `_utils.rms_norm_ref`), per row of `x` [..., n]:
    rstd = rsqrt(mean(x.float() ** 2) + eps)                 # fp32
    y    = weight * (x.float() * rstd).to(x.dtype)           # dtype promote(x, weight)

Forward: one program per BLOCK_M rows (BLOCK_M = 1 for wide rows, up to 16 for narrow ones),
the block covering the whole row; it writes y and rstd ([rows] fp32, saved for backward).

Backward: a persistent grid of ~SM-count programs, each owning a contiguous run of rows. For
each row it reads x and dy once and writes dx:
    xhat = x * rstd;  g = dy * w
    dx   = rstd * (g - xhat * mean(g * xhat))
and accumulates dW = sum_rows dy * xhat(as x.dtype) in fp32 registers. Each program stores its
partial dW row to a [programs, n] fp32 buffer; one torch sum over programs finishes dW, so no
atomics are involved.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (MAX_BLOCK, as_rows, check_float, check_interpreted, next_pow2,
                     require_kernels, rows_per_block, sm_count, warps_for)


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, n_rows, n_cols, eps,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = tl.arange(0, BLOCK_N)  # [BN]
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]  # [BM, BN]
    rows64 = rows.to(tl.int64)

    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    xf = x.to(tl.float32)  # [BM, BN]
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)  # [BM] fp32
    xhat = (xf * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)  # LLaMA cast
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)  # [BN]
    y = w[None, :] * xhat
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, stride_dy, stride_x, stride_dx,
                         n_rows, n_cols, rows_per_prog,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)  # [BN]
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)  # [BN]
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, n_rows)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)  # [BM]
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        dyf = dy.to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)  # [BM]

        xhat = x.to(tl.float32) * rstd[:, None]  # [BM, BN]
        # dW sees the normalised value exactly as forward multiplied it (cast to x.dtype)
        dw_acc += dyf * xhat.to(X.dtype.element_ty).to(tl.float32)
        g = dyf * w[None, :]
        c = tl.sum(g * xhat, axis=1) / n_cols  # [BM]
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty),
                 mask=mask)

    dw = tl.sum(dw_acc, axis=0)  # [BN]
    tl.store(DW_PART + pid.to(tl.int64) * n_cols + cols, dw, mask=col_mask)


def _block_n(n_cols: int) -> int:
    block_n = next_pow2(n_cols)
    if block_n > MAX_BLOCK:
        raise ValueError(f"megacpt.kernels.rms_norm: hidden size {n_cols} exceeds the largest "
                         f"supported row ({MAX_BLOCK} elements)")
    return block_n


def rms_norm_fwd(x2: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
    """x2 [rows, n] (unit column stride) -> (y [rows, n] out_dtype, rstd [rows] fp32)."""
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x2.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x2.device)
    if n_rows == 0:
        return y, rstd
    block_n = _block_n(n_cols)
    block_m = rows_per_block(block_n, n_rows)
    grid = (triton.cdiv(n_rows, block_m),)
    _rms_norm_fwd_kernel[grid](x2, weight, y, rstd, x2.stride(0), y.stride(0), n_rows, n_cols,
                               float(eps), BLOCK_M=block_m, BLOCK_N=block_n,
                               num_warps=warps_for(block_m * block_n))
    return y, rstd


def rms_norm_bwd(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                 programs: int | None = None):
    """Returns (dx [rows, n] x.dtype, dweight [n] weight.dtype)."""
    n_rows, n_cols = x2.shape
    dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    if n_rows == 0:
        return dx, torch.zeros_like(weight)
    block_n = _block_n(n_cols)
    block_m = rows_per_block(block_n, n_rows)
    num_warps = warps_for(block_m * block_n)
    if programs is None:  # persistent grid: a few resident programs per SM
        programs = sm_count(x2.device) * max(1, 16 // num_warps)
    programs = max(1, min(programs, triton.cdiv(n_rows, block_m)))
    rows_per_prog = triton.cdiv(triton.cdiv(n_rows, programs), block_m) * block_m
    programs = triton.cdiv(n_rows, rows_per_prog)
    dw_part = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device)
    _rms_norm_bwd_kernel[(programs,)](dy2, x2, weight, rstd, dx, dw_part, dy2.stride(0),
                                      x2.stride(0), dx.stride(0), n_rows, n_cols, rows_per_prog,
                                      BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    dw = dw_part.sum(0).to(weight.dtype)  # [n]
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float):
        n_cols = x.shape[-1]
        x2 = as_rows(x, n_cols)  # [rows, n]
        w = weight.contiguous()
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y2, rstd = rms_norm_fwd(x2, w, eps, out_dtype)
        ctx.save_for_backward(x2, w, rstd)
        ctx.x_shape = x.shape
        return y2.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w, rstd = ctx.saved_tensors
        dy2 = as_rows(dy, x2.shape[1])
        dx2, dw = rms_norm_bwd(dy2, x2, w, rstd)
        dx = dx2.view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return dx, (dw if ctx.needs_input_grad[1] else None), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Fused RMSNorm over the last dim of `x` [..., n] with `weight` [n]; autograd-aware."""
    check_float(x, "x", "rms_norm")
    check_float(weight, "weight", "rms_norm")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"megacpt.kernels.rms_norm: x has shape {tuple(x.shape)}; expected "
                         "[..., hidden] with hidden >= 1")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"megacpt.kernels.rms_norm: weight has shape {tuple(weight.shape)}; "
                         f"expected ({x.shape[-1]},) to match x's last dim (x {tuple(x.shape)})")
    if weight.device != x.device:
        raise ValueError(f"megacpt.kernels.rms_norm: weight is on {weight.device}, x on {x.device}")
    if not eps >= 0.0:
        raise ValueError(f"megacpt.kernels.rms_norm: eps must be >= 0, got {eps}")
    require_kernels(x.device, "rms_norm")
    check_interpreted(_rms_norm_fwd_kernel, x.device, "rms_norm")
    return RMSNormFunction.apply(x, weight, float(eps))
