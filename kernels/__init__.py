"""Triton kernels with autograd wrappers, installed as `megacpt.kernels`.

Public interface (what the model imports):

    rms_norm(x, weight, eps=1e-5)      fused RMSNorm, LLaMA/HF casting      -> [..., n]
    swiglu(gate, up)                   silu(gate) * up                       -> [..., ffn]
    swiglu_fused(gate_up)              same on [..., 2 * ffn] (gate | up)    -> [..., ffn]
    rms_norm_ref, swiglu_ref, swiglu_fused_ref   plain-torch references (same semantics)
    kernels_available(device) -> (ok, reason)    can the Triton path run on `device`?

Importing this package never imports triton: the Triton modules load on the first kernel call,
after `kernels_available` has passed, so a machine without triton can import the package and
use the references; calling a kernel there raises KernelUnavailableError with the reason
(e.g. "triton is not installed: pip install triton, or disable --use-kernels").
On CPU the kernels run only under triton's interpreter (TRITON_INTERPRET=1 set before the
first kernel call), which is how the CPU test tier exercises them.
"""
from __future__ import annotations

import torch

from ._utils import (KernelUnavailableError, kernels_available, require_kernels, rms_norm_ref,
                     swiglu_fused_ref, swiglu_ref)

__all__ = [
    "KernelUnavailableError", "kernels_available", "rms_norm", "rms_norm_ref", "swiglu",
    "swiglu_fused", "swiglu_fused_ref", "swiglu_ref",
]


def _device_of(t, op: str) -> torch.device:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"megacpt.kernels.{op}: expected a torch.Tensor, got {type(t).__name__}")
    return t.device


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Fused Triton RMSNorm of `x` [..., n] with `weight` [n] (see `rms_norm_ref`)."""
    require_kernels(_device_of(x, "rms_norm"), "rms_norm")
    from .rmsnorm import rms_norm as _rms_norm

    return _rms_norm(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton silu(gate) * up for same-shape tensors [..., ffn] (see `swiglu_ref`)."""
    require_kernels(_device_of(gate, "swiglu"), "swiglu")
    from .swiglu import swiglu as _swiglu

    return _swiglu(gate, up)


def swiglu_fused(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton silu(gate) * up on gate_up [..., 2 * ffn] = [gate | up] (see `swiglu_fused_ref`)."""
    require_kernels(_device_of(gate_up, "swiglu_fused"), "swiglu_fused")
    from .swiglu import swiglu_fused as _swiglu_fused

    return _swiglu_fused(gate_up)
