"""Gradient-accumulation fusion: weight gradients of linear layers go straight into the fp32
main-gradient buffer (Megatron's `--gradient-accumulation-fusion`, without Apex).

Without it, backward of `y = x W^T` produces `dW = dy^T x` in the parameter's dtype (a new
[out, in] tensor), autograd hands it to `GradBuffer`'s hook, and the hook adds it into the
fp32 `main_grad` and frees it: an extra write and read of every weight gradient per
micro-batch, and bf16 rounding of each micro-batch's `dW` before the fp32 sum. With it, the
linear's backward does `main_grad += dy^T x` itself:

- fp32 parameters: `main_grad.addmm_(dy^T, x)`, one GEMM accumulating in place;
- half parameters on CUDA: one GEMM with bf16/fp16 inputs accumulating into fp32
  (`torch.addmm(..., out_dtype=torch.float32, out=main_grad)`), when a one-time probe on the
  device shows this torch build computes it correctly in place; else
- `main_grad.add_(dy^T @ x)` (the GEMM in the parameter's dtype, then the fp32 add);
- half parameters on CPU: `main_grad.addmm_(dy^T.float(), x.float())`, the same product
  accumulated in fp32 (as on CUDA), because CPUs without bf16 instructions run bf16 GEMMs in
  a fallback many times slower than fp32 (profile at 49M: the backward GEMMs were ~90% of a
  bf16 step). The input-gradient GEMM `dy @ W` is upcast the same way on CPU and rounded
  once to the parameter's dtype (what the bf16 GEMM's fp32 accumulation gives too).

The step's first gradient (`weight.main_grad_empty`, set by `GradBuffer.zero()`) is written
instead of added (beta = 0, or a copy), so the buffer needs no memset between steps.
`wgrad_path(device, dtype)` says which one runs. Backward then returns a placeholder gradient
(uninitialised, from the caching allocator) and marks `weight.grad_added_to_main_grad`, so
autograd still calls the hook - which keeps counting the bucket's ready parameters and starts
its data-parallel reduction - and the hook skips the add.

Split backward (zero-bubble schedules): while the parameter's `grad_buffer` defers weight
gradients, backward stores (dy, x) there instead of accumulating; `GradBuffer.run_wgrad`
does the GEMM later.

`linear(x, weight)` is what the tensor-parallel layers call: the fused path when the weight
was enrolled by a `GradBuffer` built with `fuse_wgrad=True` (`weight.fuse_wgrad`) and a
gradient is being recorded, else `F.linear`. Inside `torch.compile`d code it is always
`F.linear` (the fused backward mutates a buffer the compiler does not see).
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

PATHS = ("addmm_", "addmm out_dtype", "mm + add_", "upcast addmm_")


@functools.lru_cache(maxsize=None)
def _out_dtype_works(device: torch.device, dtype: torch.dtype) -> bool:
    """One-time check that addmm with out_dtype=fp32 accumulates in place correctly here."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(67, 96, device=device, generator=gen).to(dtype)  # [n, out]
    b = torch.randn(67, 48, device=device, generator=gen).to(dtype)  # [n, in]
    acc = torch.randn(96, 48, device=device, generator=gen)  # fp32 [out, in]
    want = acc + a.float().t() @ b.float()
    fresh = torch.full_like(acc, float("nan"))  # beta=0 (a step's first gradient) ignores it
    try:
        torch.addmm(acc, a.t(), b, out_dtype=torch.float32, out=acc)
        torch.addmm(fresh, a.t(), b, beta=0.0, out_dtype=torch.float32, out=fresh)
    except (RuntimeError, TypeError) as exc:  # unsupported here (also its RuntimeError subclass)
        log.info("gradient-accumulation fusion: addmm out_dtype unavailable (%s)", exc)
        return False
    product = a.float().t() @ b.float()
    ok = bool(torch.allclose(acc, want, rtol=1e-3, atol=1e-3)) and bool(
        torch.allclose(fresh, product, rtol=1e-3, atol=1e-3))
    if not ok:
        log.warning("gradient-accumulation fusion: addmm out_dtype gave wrong results on %s; "
                    "using mm + add_", device)
    return ok


def wgrad_path(device: torch.device, dtype: torch.dtype) -> str:
    """Which of PATHS `accumulate_wgrad` takes for parameters of `dtype` on `device`."""
    if dtype == torch.float32:
        return "addmm_"
    if torch.device(device).type == "cpu":
        return "upcast addmm_"
    if torch.device(device).type == "cuda" and _out_dtype_works(torch.device(device), dtype):
        return "addmm out_dtype"
    return "mm + add_"


def accumulate_wgrad(main_grad: torch.Tensor, dy2: torch.Tensor, x2: torch.Tensor,
                     overwrite: bool = False) -> None:
    """main_grad [out, in] fp32 += dy2^T @ x2, with dy2 [n, out] and x2 [n, in]; with
    `overwrite`, main_grad = dy2^T @ x2 (its old values, NaN included, are ignored: beta=0)."""
    path = wgrad_path(dy2.device, dy2.dtype)
    beta = 0.0 if overwrite else 1.0
    if path == "addmm_":
        main_grad.addmm_(dy2.t(), x2, beta=beta)
    elif path == "upcast addmm_":
        main_grad.addmm_(dy2.t().float(), x2.float(), beta=beta)
    elif path == "addmm out_dtype":
        torch.addmm(main_grad, dy2.t(), x2, beta=beta, out_dtype=torch.float32, out=main_grad)
    elif overwrite:
        main_grad.copy_(dy2.t() @ x2)
    else:
        main_grad.add_(dy2.t() @ x2)


class _LinearFusedWGrad(torch.autograd.Function):
    """y = x W^T whose backward adds dW into W.main_grad (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        # the Parameter itself (its main_grad): under activation checkpointing saved_tensors
        # gives back a recomputed alias without the Parameter's attributes
        ctx.param = weight
        return F.linear(x, weight)  # [..., out]

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            if dy.device.type == "cpu" and dy.dtype != torch.float32:  # see module docstring
                dx = (dy.float() @ weight.float()).to(dy.dtype)  # [..., in]
            else:
                dx = dy @ weight  # [..., in]
        if not ctx.needs_input_grad[1]:
            return dx, None
        dy2 = dy.reshape(-1, dy.shape[-1])  # [n, out]
        x2 = x.reshape(-1, x.shape[-1])  # [n, in]
        p = ctx.param
        buf = p.grad_buffer
        if buf.defer_wgrad:  # split backward: the W pass adds it later (GradBuffer.run_wgrad)
            buf.deferred.append((p, dy2, x2))
            p.wgrad_deferred = True
        else:
            accumulate_wgrad(p.main_grad, dy2, x2,
                             overwrite=getattr(p, "main_grad_empty", False))
            p.grad_added_to_main_grad, p.main_grad_empty = True, False
        # a placeholder for autograd to hand to the GradBuffer hook, which ignores its values
        return dx, torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight), with gradient-accumulation fusion when `weight` is enrolled."""
    if (getattr(weight, "fuse_wgrad", False) and weight.requires_grad
            and torch.is_grad_enabled() and not torch.compiler.is_compiling()):
        return _LinearFusedWGrad.apply(x, weight)
    return F.linear(x, weight)
