"""Every Triton kernel megacpt launches compiles for an H100 (sm_90), checked without a GPU.

The CPU tier runs the kernels under triton's interpreter, which accepts some code a real GPU
build rejects; this test runs tests/kernels/aot_compile_sm90.py in a fresh process without
TRITON_INTERPRET, where each launch of the public ops (bf16, fp32, fp16; forward and
backward; the shapes of the paper's models) is compiled ahead of time with triton's own
ptxas for GPUTarget("cuda", 90, 32) instead of being run.
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_swiglu_fwd_kernel",
           "_swiglu_bwd_kernel", "_qkv_rope_fwd_kernel", "_qkv_rope_bwd_kernel",
           "_ce_stats_kernel", "_ce_grad_kernel", "_scale_rows_kernel"}


def _aot_tools_missing() -> str | None:
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        return f"triton's ahead-of-time compiler API is not available: {exc}"
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return None if os.path.exists(ptxas) else f"triton ships no ptxas at {ptxas}"


def test_every_kernel_compiles_for_sm90():
    why = _aot_tools_missing()
    if why:
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "aot_compile_sm90.py"),
                           "bfloat16", "float32", "float16"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failed"] == [], result["failed"]
    compiled = {name for name, _ in result["compiled"]}
    assert compiled == KERNELS, compiled ^ KERNELS  # every kernel was reached and built
    for ptr in ("*bf16", "*fp16", "*fp32"):  # in every dtype
        assert any(sig.startswith(ptr) for _, sig in result["compiled"]), ptr
