"""Rotary tables and causal attention backends (the rotation itself is
`megacpt.kernels.qkv_rope`, fused with the QKV split, or its torch reference).

Backends (`ModelConfig.attention_backend`):
- `flash_attn`: the FlashAttention package (`flash_attn_func`), CUDA + fp16/bf16 only.
- `sdpa`: `torch.nn.functional.scaled_dot_product_attention` (flash / cuDNN / efficient
  kernels on GPU, the math kernel on CPU).
- `eager`: the plain softmax(QK^T / sqrt(d) + mask) V reference, statistics in fp32.
- `auto`: flash_attn when importable and usable, else sdpa.

Layout at this interface: q `[b, s, nh, d]`, k/v `[b, s, ng, d]` (grouped-query attention:
query head i uses key/value head i // (nh / ng)) -> out `[b, s, nh, d]`.
"""
from __future__ import annotations

import functools
import math
import importlib.util
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("flash_attn", "sdpa", "eager")


# ----- rotary embeddings (LLaMA / HF "rotate half" convention) -----

def rotary_inv_freq(head_dim: int, base: float, scaling: dict | None = None,
                    device=None) -> torch.Tensor:
    """Inverse frequencies [d/2] fp32, with transformers' RoPE scaling of the given type:
    "default" (none), "linear" (all divided by factor) or "llama3" (Llama 3.1/3.2: long
    wavelengths divided by factor, short ones kept, a smooth blend between). Other types are
    refused by `megacpt.config.check_rope_scaling`."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device,
                                            dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    if kind != "default":
        raise ValueError(f"rope_scaling type {kind!r} is not implemented")
    return inv_freq


def rotary_tables(seq_len: int, head_dim: int, base: float, device, dtype=torch.float32,
                  scaling: dict | None = None):
    """cos, sin of shape [s, d] (frequencies repeated over both halves)."""
    inv_freq = rotary_inv_freq(head_dim, base, scaling, device)  # [d/2]
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # [s, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [s, d]
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ----- backends -----

@functools.lru_cache(maxsize=None)
def _flash_attn_func():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_func
    except Exception as e:  # broken build (ABI mismatch) is reported, not fatal
        log.warning("flash_attn is installed but failed to import (%s); using sdpa", e)
        return None
    return flash_attn_func


def available_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Backends usable for this device and dtype, fastest first."""
    out = []
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _flash_attn_func():
        out.append("flash_attn")
    out += ["sdpa", "eager"]
    return out


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that will run, with a clear error when the requested one can't."""
    avail = available_backends(device, dtype)
    if requested == "auto":
        return avail[0]
    if requested not in BACKENDS:
        raise ValueError(f"attention backend must be one of auto, {', '.join(BACKENDS)}; "
                         f"got {requested!r}")
    if requested not in avail:
        why = ("the flash_attn package is not installed (pip install 'megacpt[gpu]')"
               if _flash_attn_func() is None else
               f"it needs a CUDA device and fp16/bf16 (have {device.type}, {dtype})")
        raise RuntimeError(f"attention backend 'flash_attn' can't run: {why}; "
                           f"use --attention-backend sdpa")
    return requested


def _expand_kv(k: torch.Tensor, num_heads: int) -> torch.Tensor:
    rep = num_heads // k.shape[2]
    return k if rep == 1 else k.repeat_interleave(rep, dim=2)


def eager_attention(q, k, v):
    """Reference causal attention; q [b, s, nh, d], k/v [b, s, ng, d]."""
    nh, s, d = q.shape[2], q.shape[1], q.shape[3]
    k, v = _expand_kv(k, nh), _expand_kv(v, nh)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / d**0.5  # [b, nh, s, s]
    mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)


def _sdpa_supports_gqa() -> bool:
    """torch >= 2.5 takes enable_gqa (the builtin has no inspectable signature: try it)."""
    x = torch.zeros(1, 2, 1, 8)
    try:
        F.scaled_dot_product_attention(x, x[:, :1], x[:, :1], enable_gqa=True)
        return True
    except (TypeError, RuntimeError):
        return False


_SDPA_GQA = _sdpa_supports_gqa()


def sdpa_attention(q, k, v):
    nh = q.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [b, n, s, d]
    if k.shape[2] != nh:
        if _SDPA_GQA:
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
            return out.transpose(1, 2)
        kt, vt = _expand_kv(k, nh).transpose(1, 2), _expand_kv(v, nh).transpose(1, 2)
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)


def flash_attention(q, k, v):
    return _flash_attn_func()(q, k, v, causal=True)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Causal attention with a resolved backend name."""
    if backend == "flash_attn":
        return flash_attention(q, k, v)
    if backend == "sdpa":
        return sdpa_attention(q, k, v)
    return eager_attention(q, k, v)
