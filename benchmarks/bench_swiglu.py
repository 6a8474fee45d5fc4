"""Benchmark SwiGLU fwd / bwd / fwd+bwd: megacpt Triton vs torch eager, torch.compile, Liger.

    python benchmarks/bench_swiglu.py                    # GPU: rows {4096,16384} x ffn from the
                                                         # paper's table, bf16
    python benchmarks/bench_swiglu.py --quick --out /tmp/s.json    # CPU smoke run (interpreter)

Two ops are measured:
- "swiglu": silu(gate) * up with separate gate, up [rows, ffn] (impls megacpt, torch,
  compile, liger);
- "swiglu_fused": the same on one gate_up [rows, 2 * ffn] tensor, gate | up halves
  (impls megacpt, torch, compile, liger: Liger's `LigerFusedGateUpSiLUMulFunction`, the
  fused gate-up op of its Megatron integration, out of place like ours).
An implementation that fails on this machine (Liger missing, or its Triton kernels unable to
run on CPU) gets a row {"op", "rows", "hidden", "dtype", "impl", "error"} and the run goes on.

Result rows (benchmarks/common.write_results("swiglu", rows)), "hidden" holding ffn:
    {"op": "swiglu" | "swiglu_fused", "pass": "fwd" | "bwd" | "fwd+bwd", "rows": int,
     "hidden": int, "dtype": "bfloat16", "impl": "megacpt" | "torch" | "compile" | "liger",
     "ms": float, "gbps": float, "frac_of_copy_bw": float, "timer": "graph" | "events" | "cpu"}
gbps counts the bytes of the ideal fused op: fwd reads gate, up and writes out (3 x rows x ffn
elements); bwd reads gate, up, dout and writes dgate, dup (5 x); fwd+bwd is the sum (8 x).
Timing and the per-implementation inputs work as in bench_rmsnorm.py, whose helpers it uses.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_rmsnorm import (check_against_reference, compile_static, measure,  # noqa: E402
                                      parse_run_args, pass_rows, run_setup, setup_device)

PAPER_FFN = [4608, 7168, 9728, 11264, 14848]  # paper Appendix D sizes (137M .. 4.2B models)


def _impls(names: list[str]) -> dict:
    """{(op, impl): fn}; swiglu fns take (gate, up), swiglu_fused fns take (gate_up,)."""
    from megacpt.kernels import swiglu, swiglu_fused, swiglu_fused_ref, swiglu_ref

    table = {("swiglu", "megacpt"): swiglu, ("swiglu", "torch"): swiglu_ref,
             ("swiglu_fused", "megacpt"): swiglu_fused, ("swiglu_fused", "torch"): swiglu_fused_ref}
    if "compile" in names:
        table[("swiglu", "compile")] = compile_static(lambda g, u: swiglu_ref(g, u))
        table[("swiglu_fused", "compile")] = compile_static(lambda gu: swiglu_fused_ref(gu))
    if "liger" in names:
        try:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        except ImportError as exc:
            print(f"liger skipped: {exc}")
        else:
            table[("swiglu", "liger")] = LigerSiLUMulFunction.apply
            try:
                from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction
            except ImportError as exc:  # older Liger: no fused gate-up op
                print(f"liger swiglu_fused skipped: {exc}")
            else:
                table[("swiglu_fused", "liger")] = LigerFusedGateUpSiLUMulFunction.apply
    return {key: fn for key, fn in table.items() if key[1] in names}


def _inputs(op: str, n_rows: int, ffn: int, dtype, device: str) -> tuple[list, object]:
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    width = 2 * ffn if op == "swiglu_fused" else ffn
    n_in = 1 if op == "swiglu_fused" else 2
    inputs = [(2 * torch.randn(n_rows, width, device=device, generator=gen)).to(dtype)
              .requires_grad_() for _ in range(n_in)]
    dout = torch.randn(n_rows, ffn, device=device, generator=gen).to(dtype)
    return inputs, dout


def ideal_bytes(rows: int, ffn: int, elem: int) -> dict:
    fwd = 3 * rows * ffn * elem  # gate, up -> out
    bwd = 5 * rows * ffn * elem  # gate, up, dout -> dgate, dup
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--ffn", type=int, nargs="+", default=PAPER_FFN)
    p.add_argument("--ops", nargs="+", choices=["swiglu", "swiglu_fused"],
                   default=["swiglu", "swiglu_fused"])
    return parse_run_args(p, argv, rows=[3], ffn=[72], warmup=1, iters=2)


def main(argv=None) -> str:
    args = parse_args(argv)
    device = setup_device(args.quick)
    import torch
    from tqdm import tqdm

    from benchmarks.common import write_results
    from megacpt.kernels import swiglu_fused_ref, swiglu_ref

    refs = {"swiglu": swiglu_ref, "swiglu_fused": swiglu_fused_ref}
    timer, dtype, copy_bw = run_setup(args, device)
    impls = _impls(args.impls)
    configs = [(op, r, f, name) for op in args.ops for r in args.rows for f in args.ffn
               for (op_, name) in impls if op_ == op]
    rows_out = []
    for op, n_rows, ffn, name in tqdm(configs, desc="swiglu", unit="cfg"):
        fn = impls[(op, name)]
        inputs, dout = _inputs(op, n_rows, ffn, dtype, device)
        base = {"op": op, "rows": n_rows, "hidden": ffn,
                "dtype": str(dtype).replace("torch.", ""), "impl": name}
        try:
            if name in ("megacpt", "liger"):
                check_against_reference(fn, refs[op], inputs, dout, f"{op} {n_rows}x{ffn}")
            times = measure(fn, inputs, dout, timer, args.warmup, args.iters)
        except Exception as exc:  # noqa: BLE001 - e.g. Liger's kernels on CPU: record, go on
            if name == "megacpt":
                raise
            print(f"{op} {name} {n_rows}x{ffn} failed: {type(exc).__name__}: {str(exc)[:200]}")
            rows_out.append({**base, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            continue
        rows_out += pass_rows(base, times, ideal_bytes(n_rows, ffn, inputs[0].element_size()),
                              copy_bw)
        del inputs, dout, times
        if device == "cuda":
            torch.cuda.empty_cache()
    return write_results("swiglu", rows_out, out=args.out)


if __name__ == "__main__":
    main()
