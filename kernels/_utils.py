"""Torch-only half of `megacpt.kernels`: availability checks, references and launch helpers.

Nothing here imports triton, so `import megacpt.kernels` works on a machine without it; the
Triton modules (`rmsnorm.py`, `swiglu.py`, `rope.py`) are imported lazily by the public
wrappers in `__init__.py` only after `require_kernels` has said they can run.

References (plain torch, the semantics the kernels reproduce):

- `rms_norm_ref(x, weight, eps)`: LLaMA/HF casting, statistics in fp32, the normalised value
  cast back to `x.dtype` before the weight multiply:
  `y = weight * (x.float() * rsqrt(mean(x.float() ** 2, -1) + eps)).to(x.dtype)`.
  The output dtype is `torch.promote_types(x.dtype, weight.dtype)` (x.dtype when they match).
- `swiglu_ref(gate, up) = silu(gate) * up`, computed in the input dtype.
- `swiglu_fused_ref(gate_up)`: the same on `[..., 2 * ffn]`, gate = first half, up = second.
- `qkv_rope_ref(qkv, cos, sin, num_groups, heads_per_group, head_dim)`: `Attention.forward`'s
  split of the fused QKV projection [s, b, G * (P + 2) * d] into q [b, s, G*P, d], k and v
  [b, s, G, d], q and k rotated (rotate half) in fp32 with the first s rows of cos/sin [s, d]:
  `(x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)`; v is copied.
- `cross_entropy_ref(logits, target, vocab_size=None)`: per-token loss [...] fp32 =
  `F.cross_entropy(logits[..., :vocab_size].float(), target, reduction="none")`; columns at or
  past vocab_size are vocabulary padding (logits [..., V_pad], target [...] int64).

Rounding: the kernels compute in fp32 and round to half types where torch does; compiled
(GPU) Triton rounds to nearest even like torch, but triton's CPU interpreter truncates
fp32 -> bf16, so interpreted bf16 results may differ from the references by one ulp.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
from functools import lru_cache

import torch
import torch.nn.functional as F

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_BLOCK = 65536  # widest row a single program holds in registers (elements)

_NO_TRITON_HINT = "pip install triton, or disable --use-kernels"


class KernelUnavailableError(RuntimeError):
    """Raised when a Triton kernel is called where it cannot run."""


# ----------------------------------------------------------------------------- availability
def _triton_missing() -> str | None:
    """Why triton cannot be imported, or None. Does not import it: importing triton fixes
    interpreter-or-compiled for the whole process, so that is left to the first kernel call."""
    try:
        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError) as exc:
        return str(exc)
    return None if spec is not None else "no module named 'triton'"


def _triton_compiled_already() -> bool:
    """True when triton was already imported in compiled (not interpreter) mode."""
    lang = sys.modules.get("triton.language")
    return lang is not None and type(getattr(lang, "sum", None)).__name__ != "InterpretedFunction"


def interpret_mode() -> bool:
    """True when TRITON_INTERPRET asks triton to run kernels in its numpy interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def kernels_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether the Triton kernels can run on `device`, and a human reason when they cannot.

    They run on CUDA when triton is installed, and on CPU when TRITON_INTERPRET=1 was set
    before triton was first imported (triton then interprets them with numpy). `device=None` means the current default
    CUDA device if there is one, else CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    err = _triton_missing()
    if err is not None:
        return False, f"triton is not installed: {_NO_TRITON_HINT} ({err})"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, ("CUDA device requested but torch.cuda.is_available() is False "
                           f"(torch {torch.__version__}); run on a GPU or disable --use-kernels")
        return True, ""
    if device.type == "cpu":
        if interpret_mode() and _triton_compiled_already():
            return False, ("triton was imported before TRITON_INTERPRET=1 was set, so it runs "
                           "compiled and cannot take CPU tensors; set TRITON_INTERPRET=1 at "
                           "process start, or disable --use-kernels")
        if interpret_mode():
            return True, ""
        return False, ("Triton kernels need a CUDA device; on CPU they only run in triton's "
                       "interpreter: set TRITON_INTERPRET=1 at process start, before triton is "
                       "imported (slow, meant for tests), or disable --use-kernels")
    return False, f"device type {device.type!r} is not supported by the Triton kernels (cuda or cpu)"


def require_kernels(device: torch.device, op: str) -> None:
    """Raise KernelUnavailableError naming `op` and the reason when kernels cannot run."""
    ok, reason = kernels_available(device)
    if not ok:
        raise KernelUnavailableError(f"megacpt.kernels.{op}: {reason}")


def check_interpreted(kernel, device: torch.device, op: str) -> None:
    """CPU tensors need kernels built for the interpreter; they are built once, at first use.

    (CUDA tensors run either way: interpreted kernels are slow there but correct.)
    """
    interpreted = type(kernel).__name__ == "InterpretedFunction"
    if device.type == "cpu" and not interpreted:
        raise KernelUnavailableError(
            f"megacpt.kernels.{op}: CPU tensors need triton's interpreter, but the kernels were "
            "built compiled because TRITON_INTERPRET=1 was not set before their first use; "
            "set it at process start")


# ----------------------------------------------------------------------------- references
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LLaMA/HF RMSNorm in plain torch (stats in fp32, normalised value back in x.dtype)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1] fp32
    return weight * (xf * rstd).to(x.dtype)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in plain torch."""
    return F.silu(gate) * up


def swiglu_fused_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up where gate, up = gate_up.chunk(2, dim=-1)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (HF rotate-half): x [b, s, n, d]; cos/sin [s, d]; computed in fp32.

    x.float() is taken twice, as there: autograd then casts each term's gradient to x.dtype
    before adding them (the kernel adds in fp32 and rounds once; <= 1 ulp apart)."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def qkv_rope_ref(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_groups: int,
                 heads_per_group: int, head_dim: int):
    """Attention.forward's QKV split + rotary in plain torch -> (q, k, v).

    qkv [s, b, G * (P + 2) * d] -> q [b, s, G*P, d], k [b, s, G, d] (rotated), v [b, s, G, d]
    (contiguous); cos/sin [>= s, d], first s rows used. q and k may be non-contiguous (torch
    keeps qkv's [s, b] memory order); the values are what the kernel must reproduce.
    """
    s, b = qkv.shape[:2]
    per = heads_per_group
    x = qkv.view(s, b, num_groups, per + 2, head_dim).transpose(0, 1)  # [b, s, G, P+2, d]
    q = x[:, :, :, :per].reshape(b, s, -1, head_dim)  # [b, s, G*P, d]
    k = x[:, :, :, per]  # [b, s, G, d]
    v = x[:, :, :, per + 1].contiguous()
    cos, sin = cos[:s], sin[:s]
    return _rotary_ref(q, cos, sin), _rotary_ref(k, cos, sin), v


def cross_entropy_ref(logits: torch.Tensor, target: torch.Tensor,
                      vocab_size: int | None = None) -> torch.Tensor:
    """Per-token loss [...] fp32 of logits [..., V_pad] over the first vocab_size columns."""
    v = logits.shape[-1] if vocab_size is None else vocab_size
    flat = logits[..., :v].float().reshape(-1, v)  # [n, V]
    return F.cross_entropy(flat, target.reshape(-1), reduction="none").view(target.shape)


# ----------------------------------------------------------------------------- launch helpers
def check_float(t: torch.Tensor, name: str, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"megacpt.kernels.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"megacpt.kernels.{op}: {name} has dtype {t.dtype}; expected one of "
                        "float32, bfloat16, float16")


def as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """View `t` as [rows, n_cols] with unit column stride (copies only when it must)."""
    if t.dim() == 0 or t.shape[-1] != n_cols:
        raise ValueError(f"expected last dim {n_cols}, got shape {tuple(t.shape)}")
    if t.stride(-1) != 1:
        t = t.contiguous()
    t2 = t.reshape(math.prod(t.shape[:-1]), n_cols)  # a view when the dims collapse
    if t2.shape[0] > 1 and t2.stride(0) < n_cols:  # overlapping rows (e.g. expanded): densify
        t2 = t2.contiguous()
    return t2


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def warps_for(block_elems: int) -> int:
    """num_warps for a program holding `block_elems` elements per tensor.

    Aims at 8-16 elements per thread (one or two 16-byte bf16 vectors): 4 warps up to 2K
    elements, 8 up to 4K, 16 up to 16K, 32 beyond.
    """
    if block_elems <= 2048:
        return 4
    if block_elems <= 4096:
        return 8
    if block_elems <= 16384:
        return 16
    return 32


def rows_per_block(block_n: int, n_rows: int, target_elems: int = 4096, cap: int = 16) -> int:
    """Rows one program handles at once: several for narrow rows, one for wide rows."""
    bm = max(1, min(cap, target_elems // block_n))
    return min(bm, next_pow2(max(n_rows, 1)))


@lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors on a CUDA device; a small stand-in (4) on CPU."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_sm_count(index)
    return 4
