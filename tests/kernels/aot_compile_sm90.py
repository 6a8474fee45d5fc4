"""Compile every Triton kernel megacpt launches for an H100 (sm_90) without a GPU.

Run as a script in a process WITHOUT TRITON_INTERPRET (tests/kernels/test_compile_sm90.py
does): the public ops run on CPU tensors with the availability checks switched off, every
kernel launch is intercepted, turned into an ahead-of-time `triton.compile` for
GPUTarget("cuda", 90, 32) with the launch's argument types, constexprs and num_warps, and
never executed (outputs stay uninitialised; only compilation is checked). This catches what
triton's CPU interpreter lets through: code that does not compile for a real GPU.
Prints one JSON line: {"compiled": [[kernel, signature], ...], "failed": [[kernel, error]]}.
"""
import json
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

TARGET = GPUTarget("cuda", 90, 32)
PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
       torch.int64: "*i64", torch.int32: "*i32", torch.bool: "*i1"}
COMPILED, FAILED, SEEN = [], [], set()


def _arg_type(value):
    if isinstance(value, torch.Tensor):
        return PTR[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {type(value).__name__}")


def _fake_run(self, *args, grid, warmup, **kwargs):
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    signature, constexprs = {}, {}
    for i, param in enumerate(self.params):
        value = args[i] if i < len(args) else kwargs.get(param.name, param.default)
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
        else:
            signature[param.name] = _arg_type(value)
    key = (self.fn.__name__, tuple(signature.items()), tuple(constexprs.items()),
           tuple(options.items()))
    if key in SEEN:
        return None
    SEEN.add(key)
    try:
        triton.compile(ASTSource(self, signature, constexprs), target=TARGET, options=options)
        COMPILED.append([self.fn.__name__, " ".join(f"{v}" for v in signature.values())])
    except Exception as exc:  # noqa: BLE001 - reported, the test fails on it
        FAILED.append([self.fn.__name__, f"{type(exc).__name__}: {str(exc)[-600:]}"])
    return None


def _enable_cpu_launches():
    import importlib

    import megacpt.kernels as K
    from megacpt.kernels import _utils

    _utils.kernels_available = lambda device=None: (True, "")
    K.require_kernels = _utils.require_kernels = lambda device, op: None
    for name in ("cross_entropy", "rmsnorm", "rope", "swiglu"):  # the modules, not the ops
        mod = importlib.import_module(f"megacpt.kernels.{name}")
        for fn in ("check_interpreted", "require_kernels"):
            if hasattr(mod, fn):
                setattr(mod, fn, lambda *a, **k: None)
    importlib.reload(K)  # the imports above rebound K.swiglu / K.cross_entropy to modules
    JITFunction.run = _fake_run
    return K


def _backward(out, *inputs):
    outs = out if isinstance(out, tuple) else (out,)
    grads = [torch.ones_like(o) for o in outs]
    torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], grads)


def run_ops(K, dtype):
    def leaf(*shape, dt=dtype):
        return torch.randn(*shape).to(dt).requires_grad_()

    x, w = leaf(16, 1792), leaf(1792)
    _backward(K.rms_norm(x, w, 1e-5), x, w)
    g, u, gu = leaf(16, 9728), leaf(16, 9728), leaf(16, 2 * 9728)
    _backward(K.swiglu(g, u), g, u)
    _backward(K.swiglu_fused(gu), gu)
    s, b = 16, 2
    for groups, per, d in ((14, 1, 128), (4, 2, 64), (3, 1, 80)):
        qkv = leaf(s, b, groups * (per + 2) * d)
        cos, sin = torch.randn(s, d), torch.randn(s, d)
        q, k, v = K.qkv_rope(qkv, cos, sin, groups, per, d)
        _backward((q, k, v), qkv)
        q, k, v = K.qkv_rope(qkv, cos, sin, groups, per, d)
        torch.autograd.grad((q, k), [qkv], [torch.ones_like(q), torch.ones_like(k)])  # dv None
    logits = leaf(16, 36224)
    loss = K.cross_entropy(logits, torch.randint(0, 36152, (16,)), 36152, inplace=False)
    torch.autograd.grad(loss, [logits], torch.ones_like(loss))
    with torch.no_grad():
        K.cross_entropy(logits.detach(), torch.randint(0, 36152, (16,)), 36152)
        local = torch.randint(-1, 18112, (16,))
        shard = torch.randn(16, 18112).to(dtype)
        K.ce_shard_stats(shard, local, 18000)
        K.ce_grad_(shard, torch.randn(16), local, 18000)
        K.ce_scale_rows_(shard, torch.randn(16))


def main() -> None:
    K = _enable_cpu_launches()
    for name in sys.argv[1:] or ["bfloat16"]:
        run_ops(K, getattr(torch, name))
    print(json.dumps({"compiled": COMPILED, "failed": FAILED}))


if __name__ == "__main__":
    main()
