"""Triton kernels with autograd wrappers, installed as `megacpt.kernels`.

Public interface (what the model imports):

    rms_norm(x, weight, eps=1e-5)      fused RMSNorm, LLaMA/HF casting      -> [..., n]
    swiglu(gate, up)                   silu(gate) * up                       -> [..., ffn]
    swiglu_fused(gate_up)              same on [..., 2 * ffn] (gate | up)    -> [..., ffn]
    qkv_rope(qkv, cos, sin, num_groups, heads_per_group, head_dim)
                                       split fused QKV [s, b, G*(P+2)*d], rotary on q and k
                                       -> q [b, s, G*P, d], k [b, s, G, d], v [b, s, G, d]
    cross_entropy(logits, target, vocab_size=None, inplace=False)
                                       per-token LM loss, padding cols >= vocab_size ignored
                                       -> loss [...] fp32 (inplace: grad written into logits)
    ce_shard_stats, ce_grad_, ce_scale_rows_   vocab-parallel building blocks (see
                                       kernels/cross_entropy.py; used by the loss,
                                       megacpt/parallel/cross_entropy.py)
    as_rows(t, n_cols)                 [..., n] -> [rows, n] view with unit column stride
    rms_norm_ref, swiglu_ref, swiglu_fused_ref, qkv_rope_ref, cross_entropy_ref
                                       plain-torch references
    kernels_available(device) -> (ok, reason)    can the Triton path run on `device`?

Importing this package never imports triton: the Triton modules load on the first kernel call,
after `kernels_available` has passed, so a machine without triton can import the package and
use the references; calling a kernel there raises KernelUnavailableError with the reason
(e.g. "triton is not installed: pip install triton, or disable --use-kernels").
On CPU the kernels run only under triton's interpreter (TRITON_INTERPRET=1 set before the
first kernel call), which is how the CPU test tier exercises them.

The Triton modules share names with public functions (`swiglu`, `cross_entropy`); importing
a submodule makes Python set the package attribute of that name to the module, so `_kernel`
puts the public function back after each lazy import.
"""
from __future__ import annotations

import importlib

import torch

from ._utils import (KernelUnavailableError, as_rows, cross_entropy_ref, kernels_available, qkv_rope_ref,
                     require_kernels, rms_norm_ref, swiglu_fused_ref, swiglu_ref)

__all__ = [
    "KernelUnavailableError", "as_rows", "ce_grad_", "ce_scale_rows_", "ce_shard_stats", "cross_entropy",
    "cross_entropy_ref", "kernels_available", "qkv_rope", "qkv_rope_ref", "rms_norm",
    "rms_norm_ref", "swiglu", "swiglu_fused", "swiglu_fused_ref", "swiglu_ref",
]


def _device_of(t, op: str) -> torch.device:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"megacpt.kernels.{op}: expected a torch.Tensor, got {type(t).__name__}")
    return t.device


def _kernel(t, op: str, module: str, name: str | None = None):
    """The Triton function `name` (default `op`) of submodule `module`, once the kernels are
    known to run on `t`'s device; keeps this package's public names intact."""
    require_kernels(_device_of(t, op), op)
    public = {k: globals()[k] for k in (module,) if k in globals()}
    mod = importlib.import_module(f"{__name__}.{module}")
    globals().update(public)  # the import just set megacpt.kernels.<module> = the module
    return getattr(mod, name or op)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Fused Triton RMSNorm of `x` [..., n] with `weight` [n] (see `rms_norm_ref`)."""
    return _kernel(x, "rms_norm", "rmsnorm")(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton silu(gate) * up for same-shape tensors [..., ffn] (see `swiglu_ref`)."""
    return _kernel(gate, "swiglu", "swiglu")(gate, up)


def swiglu_fused(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton silu(gate) * up on gate_up [..., 2 * ffn] = [gate | up] (see `swiglu_fused_ref`)."""
    return _kernel(gate_up, "swiglu_fused", "swiglu")(gate_up)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_size: int | None = None,
                  inplace: bool = False) -> torch.Tensor:
    """Triton per-token loss [...] fp32 of logits [..., V_pad] (see `cross_entropy_ref`);
    inplace=True writes the gradient into the logits (they are consumed)."""
    return _kernel(logits, "cross_entropy", "cross_entropy")(logits, target, vocab_size, inplace)


def ce_shard_stats(logits2d: torch.Tensor, target_local: torch.Tensor, n_valid: int):
    """fp32 [n] (row_max, sum_exp, target_logit) of a vocab shard [n, v] (cross_entropy.py)."""
    return _kernel(logits2d, "ce_shard_stats", "cross_entropy")(logits2d, target_local, n_valid)


def ce_grad_(logits2d: torch.Tensor, lse: torch.Tensor, target_local: torch.Tensor,
             n_valid: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """exp(x - lse) - onehot into `out` (default: logits2d in place), 0 on padding."""
    return _kernel(logits2d, "ce_grad_", "cross_entropy")(logits2d, lse, target_local, n_valid, out)


def ce_scale_rows_(g2d: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """g2d[i, :] *= scale[i] in place (a cross-entropy backward)."""
    return _kernel(g2d, "ce_scale_rows_", "cross_entropy")(g2d, scale)


def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_groups: int,
             heads_per_group: int, head_dim: int):
    """Triton split of fused QKV [s, b, G * (P + 2) * d] with rotary on q and k -> contiguous
    (q [b, s, G*P, d], k [b, s, G, d], v [b, s, G, d]) (see `qkv_rope_ref`)."""
    return _kernel(qkv, "qkv_rope", "rope")(qkv, cos, sin, num_groups, heads_per_group, head_dim)
