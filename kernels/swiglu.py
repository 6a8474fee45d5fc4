"""SwiGLU (silu(gate) * up) forward/backward in Triton.

Imports triton at module load; use it through `megacpt.kernels.swiglu` / `swiglu_fused`, which
check that the kernels can run first (see `_utils.kernels_available`).

Two entry points share one pair of kernels:
- `swiglu(gate, up)`: gate and up are separate tensors of the same shape [..., ffn].
- `swiglu_fused(gate_up)`: gate_up is [..., 2 * ffn]; gate is the first half of the last dim
  and up the second (so the MLP's gate and up projections are one matmul). Its backward
  returns one gradient of the same [..., 2 * ffn] shape (d_gate in the first half).

Math (per element; casting as torch does it for `F.silu(gate) * up` in the input dtype):
    s   = sigmoid(a);   silu = (a * s).to(dtype)
    c   = silu * b
    db  = dc * silu
    da  = dc * b * s * (1 + a * (1 - s))
The backward recomputes sigmoid(a) from the saved gate instead of storing it, so the forward
saves only its inputs. Grid: (row blocks, column blocks), each program a [BLOCK_M, BLOCK_F]
tile; rows may be strided (non-contiguous leading dims, or the two halves of gate_up).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import as_rows, check_float, check_interpreted, next_pow2, require_kernels, warps_for

_TILE_ELEMS = 2048  # elements per program per tensor: 4 warps x 16 (two 16-byte bf16 vectors)


@triton.jit
def _swiglu_fwd_kernel(A, B, C, stride_a, stride_b, stride_c, n_rows, n_cols,
                       BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)  # [BF]
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    a = tl.load(A + rows64 * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + rows64 * stride_b + cols[None, :], mask=mask, other=0.0)
    silu = (a * tl.sigmoid(a)).to(b.dtype).to(tl.float32)
    c = silu * b.to(tl.float32)
    tl.store(C + rows64 * stride_c + cols[None, :], c.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DC, A, B, DA, DB, stride_dc, stride_a, stride_b, stride_da, stride_db,
                       n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)  # [BF]
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    dc = tl.load(DC + rows64 * stride_dc + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + rows64 * stride_a + cols[None, :], mask=mask, other=0.0)
    b = tl.load(B + rows64 * stride_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    af = a.to(tl.float32)
    sig = tl.sigmoid(af)  # recomputed, never stored
    silu = (af * sig).to(a.dtype).to(tl.float32)
    db = dc * silu
    da = dc * b * sig * (1.0 + af * (1.0 - sig))
    tl.store(DA + rows64 * stride_da + cols[None, :], da.to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + rows64 * stride_db + cols[None, :], db.to(DB.dtype.element_ty), mask=mask)


def _tiles(n_rows: int, n_cols: int) -> tuple[int, int, tuple[int, int], int]:
    """(BLOCK_M, BLOCK_F, grid, num_warps) for a [n_rows, n_cols] elementwise pass.

    BLOCK_F is the power of two in [512, 2048] that wastes the fewest masked lanes on the
    last column block (ties go to the wider block); narrow rows are packed BLOCK_M per tile.
    """
    if n_cols >= 512:
        block_f = min((2048, 1024, 512), key=lambda bf: triton.cdiv(n_cols, bf) * bf)
    else:
        block_f = next_pow2(n_cols)
    block_m = max(1, min(_TILE_ELEMS // block_f, next_pow2(n_rows)))
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_f))
    return block_m, block_f, grid, warps_for(block_m * block_f)


def swiglu_fwd(a2: torch.Tensor, b2: torch.Tensor, c2: torch.Tensor) -> None:
    """c2 = silu(a2) * b2 for [rows, ffn] views with unit column stride."""
    n_rows, n_cols = a2.shape
    if n_rows == 0 or n_cols == 0:
        return
    block_m, block_f, grid, num_warps = _tiles(n_rows, n_cols)
    _swiglu_fwd_kernel[grid](a2, b2, c2, a2.stride(0), b2.stride(0), c2.stride(0), n_rows, n_cols,
                             BLOCK_M=block_m, BLOCK_F=block_f, num_warps=num_warps)


def swiglu_bwd(dc2, a2, b2, da2, db2) -> None:
    """da2, db2 = d(silu(a2) * b2) given dc2; all [rows, ffn] views with unit column stride."""
    n_rows, n_cols = a2.shape
    if n_rows == 0 or n_cols == 0:
        return
    block_m, block_f, grid, num_warps = _tiles(n_rows, n_cols)
    _swiglu_bwd_kernel[grid](dc2, a2, b2, da2, db2, dc2.stride(0), a2.stride(0), b2.stride(0),
                             da2.stride(0), db2.stride(0), n_rows, n_cols,
                             BLOCK_M=block_m, BLOCK_F=block_f, num_warps=num_warps)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor):
        n = gate.shape[-1]
        a2, b2 = as_rows(gate, n), as_rows(up, n)  # [rows, ffn]
        c2 = torch.empty(a2.shape, dtype=gate.dtype, device=gate.device)
        swiglu_fwd(a2, b2, c2)
        ctx.save_for_backward(a2, b2)
        ctx.shape = gate.shape
        return c2.view(gate.shape)

    @staticmethod
    def backward(ctx, dc: torch.Tensor):
        a2, b2 = ctx.saved_tensors
        dc2 = as_rows(dc, a2.shape[1])
        da2 = torch.empty(a2.shape, dtype=a2.dtype, device=a2.device)  # [rows, ffn]
        db2 = torch.empty(b2.shape, dtype=b2.dtype, device=b2.device)
        swiglu_bwd(dc2, a2, b2, da2, db2)
        return da2.view(ctx.shape), db2.view(ctx.shape)


class SwiGLUFusedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor):
        n2 = gate_up.shape[-1]
        n = n2 // 2
        g2 = as_rows(gate_up, n2)  # [rows, 2 * ffn]
        c2 = torch.empty((g2.shape[0], n), dtype=gate_up.dtype, device=gate_up.device)
        swiglu_fwd(g2[:, :n], g2[:, n:], c2)
        ctx.save_for_backward(g2)
        ctx.shape = gate_up.shape
        return c2.view(*gate_up.shape[:-1], n)

    @staticmethod
    def backward(ctx, dc: torch.Tensor):
        (g2,) = ctx.saved_tensors
        n = g2.shape[1] // 2
        dc2 = as_rows(dc, n)
        dg2 = torch.empty((g2.shape[0], 2 * n), dtype=g2.dtype, device=g2.device)
        swiglu_bwd(dc2, g2[:, :n], g2[:, n:], dg2[:, :n], dg2[:, n:])
        return dg2.view(ctx.shape)


def _check_device(t: torch.Tensor, op: str, kernel) -> None:
    require_kernels(t.device, op)
    check_interpreted(kernel, t.device, op)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for same-shape tensors [..., ffn]; autograd-aware, keeps the dtype."""
    check_float(gate, "gate", "swiglu")
    check_float(up, "up", "swiglu")
    if gate.shape != up.shape:
        raise ValueError(f"megacpt.kernels.swiglu: gate {tuple(gate.shape)} and up "
                         f"{tuple(up.shape)} must have the same shape")
    if gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"megacpt.kernels.swiglu: gate ({gate.dtype}, {gate.device}) and up "
                         f"({up.dtype}, {up.device}) must share dtype and device")
    if gate.dim() == 0:
        raise ValueError("megacpt.kernels.swiglu: gate and up must have at least one dimension")
    _check_device(gate, "swiglu", _swiglu_fwd_kernel)
    return SwiGLUFunction.apply(gate, up)


def swiglu_fused(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with gate, up the two halves of gate_up's last dim [..., 2 * ffn]."""
    check_float(gate_up, "gate_up", "swiglu_fused")
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2 != 0:
        raise ValueError(f"megacpt.kernels.swiglu_fused: gate_up has shape "
                         f"{tuple(gate_up.shape)}; expected an even last dim [..., 2 * ffn]")
    _check_device(gate_up, "swiglu_fused", _swiglu_fwd_kernel)
    return SwiGLUFusedFunction.apply(gate_up)
