"""Fused cross entropy for the LM head in Triton: single-device and vocab-parallel pieces.

Imports triton at module load; use it through `megacpt.kernels.cross_entropy` (and the
`ce_shard_stats` / `ce_grad_` / `ce_scale_rows_` wrappers there), which check that the kernels
can run first (see `_utils.kernels_available`). The file is not named cross_entropy.py on
purpose: importing a submodule binds its name on the package, which would replace the public
`megacpt.kernels.cross_entropy` function with this module after the first kernel call.

Semantics. Rows are the tokens, columns the vocabulary; all statistics are fp32 whatever the
logits dtype. Of a row x of `logits2d` [n, v] (unit column stride, any row stride) only the
first `n_valid` columns are vocabulary; columns >= n_valid are padding, excluded from the
softmax, and get a zero gradient. A row's target is given as a local column `t`:
    0 <= t < n_valid : the target is column t of this shard
    t == -1          : the target lives in another vocabulary shard
    anything else    : an invalid target (out of the vocabulary): its target logit is NaN,
                       so the loss is NaN instead of a silently wrong number (no host sync)

- `ce_shard_stats(logits2d, target_local, n_valid) -> (row_max, sum_exp, target_logit)`,
  each fp32 [n]:  row_max = max(x[:n_valid]),  sum_exp = sum(exp(x[:n_valid] - row_max)),
  target_logit = x[t] (0 when t == -1). One pass over each row, an online max / rescaled
  sum over column blocks (rows up to ~150k columns; a row is never held whole).
  With n_valid == 0: row_max = -inf, sum_exp = 0.
- `ce_grad_(logits2d, lse, target_local, n_valid, out=None)`: writes
  g = exp(x - lse) - [col == t] (softmax minus one-hot when lse is the row's logsumexp) in
  the logits' dtype into `out` (default: in place into logits2d); padding columns get 0.
- `ce_scale_rows_(g2d, scale)`: g2d[i, :] *= scale[i] in place (fp32 math).
- `cross_entropy(logits, target, vocab_size=None, inplace=False)`: logits [..., V_pad],
  target [...] int64 global ids in [0, vocab_size) -> loss [...] fp32
      loss = logsumexp(x[:vocab_size]) - x[target]
  (`_utils.cross_entropy_ref`; NaN for a target outside [0, vocab_size), no ignore_index).
  When a gradient is needed (grad mode on and logits.requires_grad) the forward also writes
  the unscaled gradient softmax - onehot, into a fresh buffer or, with inplace=True, into the
  logits themselves (then they are overwritten: use only for logits consumed by this loss
  alone, as the LM head's are); its version counter is bumped so autograd rejects any other
  saved use of them. Backward scales each row by its upstream gradient in place and returns
  it in the logits' dtype, so it can run once per forward (retain_graph is refused). With no
  gradient needed only the statistics are computed and the logits are left untouched.

Rounding: the gradient is rounded to the logits' dtype in forward and again after the row
scale in backward (the reference rounds once), within a half-type ulp or two.

Grid: one program per row; both passes walk the row in BLOCK_V-column blocks. At tp = 1 the
forward is one kernel (stats pass, then the gradient pass over the same row, which may still
be in L2), so the logits are read twice and the gradient written once; at tp > 1 the
statistics and gradient kernels run on either side of the group's all-reduces.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import as_rows, check_float, check_interpreted, next_pow2, require_kernels

_MAX_BLOCK_V = 4096  # columns per loop step: 8 warps x 16 elements


@triton.jit
def _row_stats(x_row, t, n_valid, BLOCK_V: tl.constexpr):
    """(row_max, sum_exp, target_logit) of one row, fp32 scalars (see module docstring)."""
    cols = tl.arange(0, BLOCK_V)
    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)  # running max
    s = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)  # sum of exp(x - m)
    for start in range(0, n_valid, BLOCK_V):
        c = start + cols
        x = tl.load(x_row + c, mask=c < n_valid, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))  # finite: the block has a valid column
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    here = (t >= 0) & (t < n_valid)
    xt = tl.load(x_row + tl.where(here, t, 0), mask=here, other=0.0).to(tl.float32)
    tgt = tl.where(here, xt, tl.where(t == -1, 0.0, float("nan")))
    return m, s, tgt


@triton.jit
def _row_grad(x_row, g_row, lse, t, n_valid, n_cols, BLOCK_V: tl.constexpr):
    """g_row[:] = exp(x - lse) - [col == t], 0 on padding columns (g_row may be x_row)."""
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        c = start + cols
        x = tl.load(x_row + c, mask=c < n_valid, other=float("-inf")).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(c == t, 1.0, 0.0)
        tl.store(g_row + c, g.to(g_row.dtype.element_ty), mask=c < n_cols)


@triton.jit
def _ce_stats_kernel(X, T, MAX, SUM, TGT, G, stride_x, stride_g, n_valid, n_cols,
                     WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    x_row = X + row64 * stride_x
    t = tl.load(T + row)
    m, s, tgt = _row_stats(x_row, t, n_valid, BLOCK_V)
    tl.store(MAX + row, m)
    tl.store(SUM + row, s)
    tl.store(TGT + row, tgt)
    if WRITE_GRAD:  # single shard: lse is known now, write the gradient in the same program
        _row_grad(x_row, G + row64 * stride_g, m + tl.log(s), t, n_valid, n_cols, BLOCK_V)


@triton.jit
def _ce_grad_kernel(X, G, LSE, T, stride_x, stride_g, n_valid, n_cols, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    _row_grad(X + row64 * stride_x, G + row64 * stride_g, tl.load(LSE + row), tl.load(T + row),
              n_valid, n_cols, BLOCK_V)


@triton.jit
def _scale_rows_kernel(G, SCALE, stride_g, n_cols, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    col0 = tl.program_id(1) * BLOCK_V
    c = col0 + tl.arange(0, BLOCK_V)
    ptr = G + row.to(tl.int64) * stride_g + c
    g = tl.load(ptr, mask=c < n_cols, other=0.0).to(tl.float32)
    tl.store(ptr, (g * tl.load(SCALE + row)).to(G.dtype.element_ty), mask=c < n_cols)


# ----------------------------------------------------------------------------- launch helpers
def _block_v(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of n_cols columns."""
    block = min(_MAX_BLOCK_V, next_pow2(max(n_cols, 16)))
    return block, max(1, min(8, block // 512))


def _check_2d(logits2d: torch.Tensor, target_local: torch.Tensor, n_valid: int, op: str):
    check_float(logits2d, "logits2d", op)
    if logits2d.dim() != 2 or (logits2d.shape[1] > 1 and logits2d.stride(1) != 1):
        raise ValueError(f"megacpt.kernels.{op}: logits2d must be 2-D [n, v] with unit column "
                         f"stride, got shape {tuple(logits2d.shape)} strides {logits2d.stride()}")
    n, v = logits2d.shape
    if target_local.dtype != torch.int64 or tuple(target_local.shape) != (n,):
        raise ValueError(f"megacpt.kernels.{op}: target_local must be int64 [{n}], got "
                         f"{target_local.dtype} {tuple(target_local.shape)}")
    if target_local.device != logits2d.device:
        raise ValueError(f"megacpt.kernels.{op}: target_local is on {target_local.device}, "
                         f"logits2d on {logits2d.device}")
    if not 0 <= int(n_valid) <= v:
        raise ValueError(f"megacpt.kernels.{op}: n_valid must be in [0, {v}] (the shard's "
                         f"columns), got {n_valid}")
    require_kernels(logits2d.device, op)
    check_interpreted(_ce_stats_kernel, logits2d.device, op)


def _stats(logits2d, target_local, n_valid, grad_out=None):
    n, v = logits2d.shape
    stats = torch.empty((3, n), dtype=torch.float32, device=logits2d.device)  # max, sum, tgt
    if n == 0:
        return stats[0], stats[1], stats[2]
    block, warps = _block_v(v)
    g = grad_out if grad_out is not None else logits2d
    _ce_stats_kernel[(n,)](logits2d, target_local.contiguous(), stats[0], stats[1], stats[2], g,
                           logits2d.stride(0), g.stride(0), int(n_valid), v,
                           WRITE_GRAD=grad_out is not None, BLOCK_V=block, num_warps=warps)
    return stats[0], stats[1], stats[2]


def ce_shard_stats(logits2d: torch.Tensor, target_local: torch.Tensor, n_valid: int):
    """fp32 [n] (row_max, sum_exp, target_logit) of a [n, v] logits shard (module docstring)."""
    _check_2d(logits2d, target_local, n_valid, "ce_shard_stats")
    return _stats(logits2d, target_local, n_valid)


def ce_grad_(logits2d: torch.Tensor, lse: torch.Tensor, target_local: torch.Tensor,
             n_valid: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Write exp(x - lse) - onehot(target) (0 on padding) into `out` (default logits2d)."""
    _check_2d(logits2d, target_local, n_valid, "ce_grad_")
    n, v = logits2d.shape
    if lse.dtype != torch.float32 or tuple(lse.shape) != (n,):
        raise ValueError(f"megacpt.kernels.ce_grad_: lse must be float32 [{n}], got "
                         f"{lse.dtype} {tuple(lse.shape)}")
    if out is None:
        out = logits2d
    elif (out.shape != logits2d.shape or out.dtype != logits2d.dtype
          or (v > 1 and out.stride(1) != 1)):
        raise ValueError(f"megacpt.kernels.ce_grad_: out must be {logits2d.dtype} "
                         f"{tuple(logits2d.shape)} with unit column stride, got {out.dtype} "
                         f"{tuple(out.shape)} strides {out.stride()}")
    if n:
        block, warps = _block_v(v)
        _ce_grad_kernel[(n,)](logits2d, out, lse.contiguous(), target_local.contiguous(),
                              logits2d.stride(0), out.stride(0), int(n_valid), v,
                              BLOCK_V=block, num_warps=warps)
    return out


def ce_scale_rows_(g2d: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """g2d[i, :] *= scale[i] in place ([n, v] unit column stride; scale [n], any float)."""
    n, v = g2d.shape
    scale = scale.reshape(-1).to(torch.float32).contiguous()
    if scale.numel() != n:
        raise ValueError(f"megacpt.kernels.ce_scale_rows_: scale has {scale.numel()} elements, "
                         f"expected one per row ({n})")
    if n and v:
        block, warps = _block_v(v)
        _scale_rows_kernel[(n, triton.cdiv(v, block))](g2d, scale, g2d.stride(0), v,
                                                        BLOCK_V=block, num_warps=warps)
    return g2d


# ----------------------------------------------------------------------------- autograd
def _target_local(target: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Global ids [...] -> int64 [n]; ids outside [0, vocab_size) become -2 (NaN loss)."""
    t = target.reshape(-1)
    return torch.where((t >= 0) & (t < vocab_size), t, -2).to(torch.int64)


def _claim_gradient(logits: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """What a Function saves for its backward when forward wrote the gradient into g2.

    g2 in the logits' own storage: their values are gone, so their version is bumped (autograd
    then rejects any other saved use of them) and the logits themselves are saved (a view
    made inside forward cannot be saved across that bump); as_rows recovers g2 from them.
    """
    if g2.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():
        return g2
    torch.autograd.graph.increment_version(logits)
    return logits


def _loss(row_max, sum_exp, tgt):
    return torch.log(sum_exp).add_(row_max).sub_(tgt)  # lse - x[target], fp32 [n]


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, vocab_size: int,
                inplace: bool):
        x2 = as_rows(logits, logits.shape[-1])  # [n, V_pad], a view unless it must copy
        g2 = x2 if inplace else torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        row_max, sum_exp, tgt = _stats(x2, _target_local(target, vocab_size), vocab_size, g2)
        ctx.save_for_backward(_claim_gradient(logits, g2))
        ctx.shape, ctx.used = logits.shape, False
        return _loss(row_max, sum_exp, tgt).view(target.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _ce_backward(ctx, grad)


def _ce_backward(ctx, grad: torch.Tensor):
    """Backward of `CrossEntropyFunction`: the forward saved the unscaled gradient (one
    tensor) and set ctx.shape, ctx.used = False; rows are scaled in place by the per-token
    upstream grad [...]. (The vocab-parallel loss, megacpt/parallel/cross_entropy.py, does
    the same with the public `ce_scale_rows_`.)"""
    if ctx.used:
        raise RuntimeError("megacpt.kernels cross entropy: backward ran twice over one "
                           "forward; its gradient buffer is scaled in place, so "
                           "retain_graph=True is not supported")
    ctx.used = True
    (saved,) = ctx.saved_tensors
    g2 = as_rows(saved.detach(), ctx.shape[-1])  # [n, V_pad], the buffer forward wrote
    ce_scale_rows_(g2, grad)  # *= grad[n]
    return g2.view(ctx.shape), None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_size: int | None = None,
                  inplace: bool = False) -> torch.Tensor:
    """Per-token loss [...] fp32 of logits [..., V_pad] and int64 target [...] (docstring)."""
    op = "cross_entropy"
    check_float(logits, "logits", op)
    if logits.dim() == 0:
        raise ValueError(f"megacpt.kernels.{op}: logits must be [..., vocab], got a scalar")
    v_pad = logits.shape[-1]
    vocab_size = v_pad if vocab_size is None else int(vocab_size)
    if not 0 < vocab_size <= v_pad:
        raise ValueError(f"megacpt.kernels.{op}: vocab_size must be in [1, {v_pad}] (the "
                         f"logits' last dim), got {vocab_size}")
    if not isinstance(target, torch.Tensor) or target.dtype != torch.int64:
        raise TypeError(f"megacpt.kernels.{op}: target must be an int64 tensor of token ids, "
                        f"got {getattr(target, 'dtype', type(target).__name__)}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"megacpt.kernels.{op}: target {tuple(target.shape)} must match the "
                         f"logits' leading dims {tuple(logits.shape[:-1])}")
    if target.device != logits.device:
        raise ValueError(f"megacpt.kernels.{op}: target is on {target.device}, logits on "
                         f"{logits.device}")
    require_kernels(logits.device, op)
    check_interpreted(_ce_stats_kernel, logits.device, op)
    if torch.is_grad_enabled() and logits.requires_grad:
        return CrossEntropyFunction.apply(logits, target, vocab_size, bool(inplace))
    x2 = as_rows(logits, v_pad)  # [n, V_pad]
    stats = _stats(x2, _target_local(target, vocab_size), vocab_size)
    return _loss(*stats).view(target.shape)
