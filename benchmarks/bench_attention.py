"""Attention backends: forward and forward+backward TFLOP/s, causal, bf16.

Backends: flash_attn (the package), SDPA restricted to its flash kernel, SDPA restricted to
cuDNN, SDPA's efficient kernel, and the eager reference (skipped where it would not fit).
Rows (benchmarks/common.py file format): {"op": "attention", "pass": "fwd"|"fwd+bwd",
"impl", "seq", "head_dim", "heads", "batch", "dtype", "ms", "tflops"}. FLOPs count the causal
half: fwd 2 * 2 * b * h * s^2 * d / 2, fwd+bwd 3.5x that (backward = 2.5x forward).

    python benchmarks/bench_attention.py                 # GPU: the full grid
    python benchmarks/bench_attention.py --quick --out /tmp/a.json   # CPU smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import time_fn, write_results  # noqa: E402
from megacpt.model import attention as A  # noqa: E402


def _sdpa_with(backend_name):
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        return None

    def run(q, k, v):
        with sdpa_kernel([backend]):
            return A.sdpa_attention(q, k, v)

    return run


def implementations(device: torch.device, dtype: torch.dtype) -> dict:
    impls = {}
    if "flash_attn" in A.available_backends(device, dtype):
        impls["flash_attn"] = A.flash_attention
    if device.type == "cuda":
        for name, key in (("sdpa_flash", "FLASH_ATTENTION"), ("sdpa_cudnn", "CUDNN_ATTENTION"),
                          ("sdpa_efficient", "EFFICIENT_ATTENTION")):
            fn = _sdpa_with(key)
            if fn is not None:
                impls[name] = fn
    else:
        impls["sdpa"] = A.sdpa_attention
    impls["eager"] = A.eager_attention
    return impls


def bench_one(fn, b, s, h, d, dtype, device, with_backward: bool) -> float:
    q = torch.randn(b, s, h, d, dtype=dtype, device=device, requires_grad=with_backward)
    k = torch.randn(b, s, h, d, dtype=dtype, device=device, requires_grad=with_backward)
    v = torch.randn(b, s, h, d, dtype=dtype, device=device, requires_grad=with_backward)
    if not with_backward:
        with torch.no_grad():
            return time_fn(lambda: fn(q, k, v), warmup=3, iters=10)
    grad = torch.randn(b, s, h, d, dtype=dtype, device=device)
    return time_fn(lambda: fn(q, k, v).backward(grad), warmup=3, iters=10)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--tokens", type=int, default=16384, help="batch * seq per measurement")
    p.add_argument("--hidden", type=int, default=2048, help="heads = hidden / head_dim")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.quick:
        args.seqs, args.head_dims, args.tokens, args.hidden = [64], [16], 128, 64
    rows = []
    for d in args.head_dims:
        h = args.hidden // d
        for s in args.seqs:
            b = max(1, args.tokens // s)
            fwd_flops = 2 * 2 * b * h * s * s * d / 2
            for impl, fn in implementations(device, dtype).items():
                if impl == "eager" and b * h * s * s * 4 > 8 * 2**30:
                    continue  # the [b, h, s, s] fp32 score matrix would not fit
                for name, bwd, mult in (("fwd", False, 1.0), ("fwd+bwd", True, 3.5)):
                    with contextlib.suppress(RuntimeError):  # backend refuses this shape
                        ms = bench_one(fn, b, s, h, d, dtype, device, bwd)
                        rows.append({"op": "attention", "pass": name, "impl": impl, "seq": s,
                                     "head_dim": d, "heads": h, "batch": b,
                                     "dtype": str(dtype).replace("torch.", ""), "ms": ms,
                                     "tflops": mult * fwd_flops / (ms * 1e-3) / 1e12})
                        print(f"{impl:15s} {name:8s} s={s:5d} d={d:3d} {ms:8.3f} ms "
                              f"{rows[-1]['tflops']:7.1f} TFLOP/s", flush=True)
    return write_results("attention", rows, args.out)


if __name__ == "__main__":
    main()
