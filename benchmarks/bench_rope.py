"""Benchmark the fused QKV split + rotary fwd / bwd / fwd+bwd: megacpt Triton vs torch eager,
torch.compile, Liger.

    python benchmarks/bench_rope.py                      # GPU: s=2048, b=4, heads/head_dim of
                                                         # 137M (d 64), 1393M, 4016M (d 128), bf16
    python benchmarks/bench_rope.py --quick --out /tmp/r.json   # CPU smoke run (interpreter)

Op "qkv_rope": qkv [s, b, G * (P + 2) * d] (the fused QKV projection output) -> rotated
q [b, s, G*P, d], rotated k [b, s, G, d], v [b, s, G, d]. GQA groups G default to the size's
num_query_groups (= heads for the paper's sizes, so P = 1); --num-query-groups overrides it.
Implementations:
- megacpt: `megacpt.kernels.qkv_rope`, one kernel reading qkv once and writing q, k, v once.
- torch: `megacpt.kernels.qkv_rope_ref`, i.e. Attention.forward today (view / transpose /
  reshape, the fp32 rotary math on q and k, v.contiguous()).
- compile: torch.compile of that reference.
- liger: `liger_kernel.ops.rope.LigerRopeFunction` on q [b, G*P, s, d] and k [b, G, s, d] in
  HF layout (transposed views of contiguous [b, s, n, d] tensors, which it rotates in place).
  It does the rotation only: no split of qkv and no copy of v, so it does less work than the
  other three; its gbps counts its own bytes (below), not the fused op's.

Result rows (benchmarks/common.write_results("rope", rows)), bench_swiglu's schema with
"hidden" = the total qkv width W = G * (P + 2) * d and "rows" = s * b tokens, plus the shape:
    {"op": "qkv_rope", "pass": "fwd" | "bwd" | "fwd+bwd", "rows": int, "hidden": int,
     "dtype": "bfloat16", "impl": "megacpt" | "torch" | "compile" | "liger", "ms": float,
     "gbps": float, "frac_of_copy_bw": float, "timer": "graph" | "events" | "cpu",
     "size": str, "seq": int, "batch": int, "groups": int, "heads_per_group": int,
     "head_dim": int, "bytes_model": "qkv_split" | "qk_inplace"}
Bytes model (T = s * b tokens, e = element size; the two fp32 [s, d] tables are read once per
pass, 8 * s * d bytes):
- qkv_split (megacpt, torch, compile; the ideal fused op): fwd reads qkv and writes q, k, v
  (2 * T * W * e); bwd reads dq, dk, dv and writes dqkv (2 * T * W * e); fwd+bwd the sum.
- qk_inplace (liger): fwd reads and rewrites q and k (2 * T * (G*P + G) * d * e); bwd the
  same on dq, dk; fwd+bwd the sum.
Timing and the per-implementation inputs work as in bench_rmsnorm.py, whose helpers it uses.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_rmsnorm import (check_against_reference, compile_static, measure,  # noqa: E402
                                      parse_run_args, pass_rows, run_setup, setup_device)

PAPER_SIZES = ["137M", "1393M", "4016M"]  # head_dim 64, 128, 128 (4016M: kv_channels 128)


def shape_of(size: str, groups: int | None) -> tuple[int, int, int]:
    """(G, P, d) of a registered size; `groups` overrides its query groups."""
    from megacpt.sizes import get_size

    shape = get_size(size)
    heads = shape.num_attention_heads
    d = shape.kv_channels or shape.hidden_size // heads
    g = groups or shape.num_query_groups or heads
    if heads % g != 0:
        raise SystemExit(f"--num-query-groups {g} must divide the {heads} heads of {size}")
    return g, heads // g, d


def ideal_bytes(seq: int, batch: int, g: int, p: int, d: int, elem: int, model: str) -> dict:
    tokens, tables = seq * batch, 2 * seq * d * 4
    heads = g * (p + 2) if model == "qkv_split" else g * (p + 1)
    one = 2 * tokens * heads * d * elem + tables  # read + write each element once
    return {"fwd": one, "bwd": one, "fwd+bwd": 2 * one}


def _flat(fn):
    """fn -> (q, k, v) seen as one flat output, so check_against_reference can compare it."""
    import torch

    return lambda *a: torch.cat([o.reshape(-1) for o in fn(*a)])


def _qkv_inputs(seq, batch, g, p, d, dtype, device):
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(seq, batch, g * (p + 2) * d, device=device, generator=gen)
    dys = tuple(torch.randn(batch, seq, n, d, device=device, generator=gen).to(dtype)
                for n in (g * p, g, g))  # dq, dk, dv
    return [qkv.to(dtype).requires_grad_()], dys


def _liger_inputs(seq, batch, g, p, d, dtype, device):
    """q, k and dq, dk in HF layout [b, n, s, d]: transposed views of [b, s, n, d] storage."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)

    def hf(n):
        return torch.randn(batch, seq, n, d, device=device, generator=gen).to(dtype).transpose(1, 2)

    return [hf(g * p).requires_grad_(), hf(g).requires_grad_()], (hf(g * p), hf(g))


def _impls(names, cos, sin, g, p, d) -> dict:
    """{impl: (fn, inputs_fn, bytes_model)}; fns take the inputs list and return a tuple."""
    from megacpt.kernels import qkv_rope, qkv_rope_ref

    table = {"megacpt": (lambda x: qkv_rope(x, cos, sin, g, p, d), _qkv_inputs, "qkv_split"),
             "torch": (lambda x: qkv_rope_ref(x, cos, sin, g, p, d), _qkv_inputs, "qkv_split")}
    if "compile" in names:
        fn = compile_static(lambda x: qkv_rope_ref(x, cos, sin, g, p, d))
        table["compile"] = (fn, _qkv_inputs, "qkv_split")
    if "liger" in names:
        try:
            from liger_kernel.ops.rope import LigerRopeFunction
        except ImportError as exc:
            print(f"liger skipped: {exc}")
        else:
            table["liger"] = (lambda q, k: LigerRopeFunction.apply(q, k, cos, sin),
                              _liger_inputs, "qk_inplace")
    return {k: v for k, v in table.items() if k in names}


def check_liger(fn, cos, sin, g, p, d, dtype, device) -> None:
    """Liger's q, k (on copies: it rotates in place) equal the reference's rotation."""
    import torch

    from megacpt.kernels import qkv_rope_ref

    s, b = cos.shape[0], 2
    (qkv,), _ = _qkv_inputs(s, b, g, p, d, dtype, device)
    qkv = qkv.detach()
    q_ref, k_ref, _ = qkv_rope_ref(qkv, cos, sin, g, p, d)
    x = qkv.view(s, b, g, p + 2, d).transpose(0, 1)  # [b, s, G, P+2, d]
    q_in = x[:, :, :, :p].reshape(b, s, g * p, d).contiguous().transpose(1, 2)  # [b, n, s, d]
    k_in = x[:, :, :, p].contiguous().transpose(1, 2)
    q, k = fn(q_in, k_in)
    for name, a, b in (("q", q.transpose(1, 2), q_ref), ("k", k.transpose(1, 2), k_ref)):
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2,
                                   msg=lambda m: f"liger {name} differs from reference: {m}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=PAPER_SIZES, help="registered model sizes")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--num-query-groups", type=int, default=None,
                   help="override the sizes' query groups (GQA); default: the size's own")
    return parse_run_args(p, argv, sizes=["tiny"], seq=5, batch=3, warmup=1, iters=2)


def main(argv=None) -> str:
    args = parse_args(argv)
    device = setup_device(args.quick)
    import torch
    from tqdm import tqdm

    from benchmarks.common import write_results
    from megacpt.kernels import qkv_rope_ref
    from megacpt.model.attention import rotary_tables

    timer, dtype, copy_bw = run_setup(args, device)
    shapes = {size: shape_of(size, args.num_query_groups) for size in args.sizes}
    configs = [(size, name) for size in args.sizes for name in args.impls]
    rows_out = []
    for size, name in tqdm(configs, desc="qkv_rope", unit="cfg"):
        g, p, d = shapes[size]
        cos, sin = rotary_tables(args.seq, d, 10000.0, device)  # [s, d] fp32
        impls = _impls([name], cos, sin, g, p, d)
        if name not in impls:
            continue
        fn, make_inputs, model = impls[name]
        inputs, dys = make_inputs(args.seq, args.batch, g, p, d, dtype, device)
        if name == "megacpt":
            check_against_reference(_flat(fn), _flat(lambda x: qkv_rope_ref(x, cos, sin, g, p, d)),
                                    inputs, torch.cat([t.reshape(-1) for t in dys]),
                                    f"qkv_rope {size} s={args.seq} b={args.batch}")
        elif name == "liger":
            check_liger(fn, cos, sin, g, p, d, dtype, device)
        times = measure(fn, inputs, dys, timer, args.warmup, args.iters)
        base = {"op": "qkv_rope", "rows": args.seq * args.batch, "hidden": g * (p + 2) * d,
                "dtype": str(dtype).replace("torch.", ""), "impl": name, "size": size,
                "seq": args.seq, "batch": args.batch, "groups": g, "heads_per_group": p,
                "head_dim": d, "bytes_model": model}
        nbytes = ideal_bytes(args.seq, args.batch, g, p, d, inputs[0].element_size(), model)
        rows_out += pass_rows(base, times, nbytes, copy_bw)
        del inputs, dys, times
        if device == "cuda":
            torch.cuda.empty_cache()
    return write_results("rope", rows_out, out=args.out)


if __name__ == "__main__":
    main()
