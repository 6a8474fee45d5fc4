"""Benchmark RMSNorm fwd / bwd / fwd+bwd: megacpt Triton vs torch eager, torch.compile, Liger.

    python benchmarks/bench_rmsnorm.py                       # GPU: rows {4096,16384} x hidden
                                                             # {1792,2048,4096,8192}, bf16
    python benchmarks/bench_rmsnorm.py --quick --out /tmp/r.json   # CPU smoke run (interpreter)

Result rows (written with benchmarks/common.write_results("rmsnorm", rows)):
    {"op": "rmsnorm", "pass": "fwd" | "bwd" | "fwd+bwd", "rows": int, "hidden": int,
     "dtype": "bfloat16", "impl": "megacpt" | "torch" | "compile" | "liger",
     "ms": float, "gbps": float, "frac_of_copy_bw": float, "timer": "graph" | "events" | "cpu"}
gbps counts the bytes of the ideal fused op, whatever an implementation really moves:
fwd reads x, w and writes y; bwd reads x, dy, w and writes dx, dw; fwd+bwd is the sum.
frac_of_copy_bw divides by the device copy bandwidth measured at the start of the same run.

Timing: on CUDA each measured call is captured in a CUDA graph and replayed (kernel time
without Python launch overhead, which would otherwise dominate the ~10 us small cases); if
capture fails for an implementation the script falls back to CUDA events and says so in
"timer". Each implementation gets its own inputs (Liger's kernels may write into theirs).
The other benchmark scripts reuse `setup_device`, `measure` and `print_row` from here.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
PASSES = ("fwd", "bwd", "fwd+bwd")


def setup_device(quick: bool) -> str:
    """'cuda' when a GPU is present; on CPU only --quick runs, under triton's interpreter."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if not quick:
        raise SystemExit("this benchmark needs a CUDA GPU; use --quick for a CPU smoke run")
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before megacpt.kernels imports triton
    return "cpu"


def _time_graph(fn, stream, warmup: int, iters: int, reps: int = 10) -> float:
    """ms per call of `fn`, captured `reps` times into one CUDA graph on `stream`, replayed."""
    import torch

    from benchmarks.common import time_fn

    with torch.cuda.stream(stream):
        for _ in range(max(warmup, 2)):  # compiles and autotunes outside the capture
            fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(reps):
            fn()
    ms = time_fn(graph.replay, warmup=2, iters=iters) / reps
    del graph
    return ms


def _timed(fn, stream, timer: str, warmup: int, iters: int) -> tuple[float, str]:
    import torch

    from benchmarks.common import time_fn

    if timer == "graph":
        try:
            return _time_graph(fn, stream, warmup, iters), "graph"
        except Exception as exc:  # capture unsupported by this implementation: say so, go on
            print(f"  cuda-graph capture failed ({type(exc).__name__}: {exc}); using events")
            torch.cuda.synchronize()
    ms = time_fn(fn, warmup=warmup, iters=iters)
    return ms, ("events" if torch.cuda.is_available() else "cpu")


def measure(op, inputs: list, dy, timer: str, warmup: int, iters: int) -> dict:
    """Median ms of op(*inputs) for each pass; returns {pass: (ms, timer_used)}.

    On CUDA everything runs on one side stream: autograd runs backward kernels on the stream
    of their forward, and a graph can only capture work issued to its capturing stream.
    """
    import contextlib

    import torch

    stream = None
    ctx = contextlib.nullcontext()
    if torch.cuda.is_available():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        ctx = torch.cuda.stream(stream)
    out = {}
    with ctx:
        y = op(*inputs)  # graph kept for the bwd-only pass
        out["fwd"] = _timed(lambda: op(*inputs), stream, timer, warmup, iters)
        out["bwd"] = _timed(lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True),
                            stream, timer, warmup, iters)
        out["fwd+bwd"] = _timed(lambda: torch.autograd.grad(op(*inputs), inputs, dy), stream,
                                timer, warmup, iters)
    if stream is not None:
        torch.cuda.current_stream().wait_stream(stream)
    return out


def compile_static(fn):
    """torch.compile specialised per shape (one graph per benchmarked size, no recompile cap).

    The bwd-only pass replays backward with retain_graph=True, which compiled backwards
    refuse while they donate saved buffers to their outputs (a memory, not speed, saving),
    so donation is switched off.
    """
    import torch
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    return torch.compile(fn, dynamic=False)


def print_row(row: dict) -> None:
    from tqdm import tqdm

    tqdm.write(f"{row['op']:>12} {row['pass']:>7} {row['rows']:>6} x {row['hidden']:<6} "
               f"{row['impl']:>8}: {row['ms']:8.4f} ms {row['gbps']:8.1f} GB/s "
               f"({100 * row['frac_of_copy_bw']:5.1f}% of copy, {row['timer']})")


def check_against_reference(op, ref, inputs: list, dy, what: str) -> None:
    """Before timing: the kernel's output and every input gradient match the reference."""
    import torch

    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}[inputs[0].dtype]
    outs = [op(*inputs), ref(*inputs)]
    grads = [torch.autograd.grad(o, inputs, dy) for o in outs]
    for name, a, b in [("out", *outs)] + [(f"grad{i}", g0, g1)
                                          for i, (g0, g1) in enumerate(zip(*grads))]:
        scale = max(1.0, b.float().abs().max().item())
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * scale,
                                   msg=lambda m: f"{what} {name} differs from reference: {m}")


def _impls(names: list[str], eps: float) -> dict:
    from megacpt.kernels import rms_norm, rms_norm_ref

    table = {"megacpt": lambda x, w: rms_norm(x, w, eps),
             "torch": lambda x, w: rms_norm_ref(x, w, eps)}
    if "compile" in names:
        table["compile"] = compile_static(lambda x, w: rms_norm_ref(x, w, eps))
    if "liger" in names:
        try:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        except ImportError as exc:
            print(f"liger skipped: {exc}")
        else:
            table["liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False)
    return {k: v for k, v in table.items() if k in names}


def ideal_bytes(rows: int, hidden: int, elem: int) -> dict:
    fwd = 2 * rows * hidden * elem + hidden * elem  # x, y; w
    bwd = 3 * rows * hidden * elem + 2 * hidden * elem  # x, dy, dx; w, dw
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def parse_run_args(p: argparse.ArgumentParser, argv, **quick) -> argparse.Namespace:
    """Parse with the shared run flags; `--quick` applies the `quick` overrides (tiny
    shapes) and defaults the impls to megacpt + torch, a full run to all four."""
    add_run_args(p)
    args = p.parse_args(argv)
    if args.quick:
        for key, value in quick.items():
            setattr(args, key, value)
        args.impls = args.impls or ["megacpt", "torch"]
    args.impls = args.impls or ["megacpt", "torch", "compile", "liger"]
    return args


def run_setup(args, device: str):
    """(timer, dtype, copy bandwidth GB/s) for a kernel benchmark run."""
    import torch

    from benchmarks.common import copy_bandwidth_gbps

    timer = args.timer if device == "cuda" else "cpu"
    copy_bw = copy_bandwidth_gbps(1 << 30 if device == "cuda" else 1 << 22)
    print(f"copy bandwidth: {copy_bw:.1f} GB/s on {device}")
    return timer, getattr(torch, DTYPES[args.dtype]), copy_bw


def pass_rows(base: dict, times: dict, nbytes: dict, copy_bw: float) -> list[dict]:
    """One printed row per pass: `base` + ms, achieved GB/s of the ideal bytes, fraction of
    the measured copy bandwidth, and the timer used."""
    rows = []
    for pas in PASSES:
        ms, used = times[pas]
        gbps = nbytes[pas] / (ms * 1e-3) / 1e9
        rows.append({**base, "pass": pas, "ms": ms, "gbps": gbps,
                     "frac_of_copy_bw": gbps / copy_bw, "timer": used})
        print_row(rows[-1])
    return rows


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Flags every kernel benchmark shares: dtype, implementations, timing, output."""
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--impls", nargs="+", choices=["megacpt", "torch", "compile", "liger"],
                   default=None, help="default: all four on GPU, megacpt and torch with --quick")
    p.add_argument("--timer", choices=["graph", "events"], default="graph")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="tiny CPU-capable smoke run")
    p.add_argument("--out", default=None, help="result JSON path (default benchmarks/results/)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--hidden", type=int, nargs="+", default=[1792, 2048, 4096, 8192])
    p.add_argument("--eps", type=float, default=1e-5)
    return parse_run_args(p, argv, rows=[3], hidden=[96, 160], warmup=1, iters=2)


def main(argv=None) -> str:
    args = parse_args(argv)
    device = setup_device(args.quick)
    import torch
    from tqdm import tqdm

    from benchmarks.common import write_results
    from megacpt.kernels import rms_norm_ref

    timer, dtype, copy_bw = run_setup(args, device)
    impls = _impls(args.impls, args.eps)
    rows_out = []
    configs = [(r, h, name) for r in args.rows for h in args.hidden for name in impls]
    for n_rows, hidden, name in tqdm(configs, desc="rmsnorm", unit="cfg"):
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n_rows, hidden, device=device, generator=gen).to(dtype).requires_grad_()
        w = (1 + 0.1 * torch.randn(hidden, device=device, generator=gen)).to(dtype)
        w.requires_grad_()
        dy = torch.randn(n_rows, hidden, device=device, generator=gen).to(dtype)
        if name == "megacpt":
            check_against_reference(impls[name], lambda a, b: rms_norm_ref(a, b, args.eps),
                                    [x, w], dy, f"rmsnorm {n_rows}x{hidden}")
        times = measure(impls[name], [x, w], dy, timer, args.warmup, args.iters)
        base = {"op": "rmsnorm", "rows": n_rows, "hidden": hidden,
                "dtype": str(dtype).replace("torch.", ""), "impl": name}
        rows_out += pass_rows(base, times, ideal_bytes(n_rows, hidden, x.element_size()), copy_bw)
        del x, w, dy, times
        if device == "cuda":
            torch.cuda.empty_cache()
    return write_results("rmsnorm", rows_out, out=args.out)


if __name__ == "__main__":
    main()
