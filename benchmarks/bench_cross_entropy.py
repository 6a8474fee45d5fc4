"""Benchmark the LM-head cross entropy fwd / bwd / fwd+bwd: megacpt Triton vs torch, compile, Liger.

    python benchmarks/bench_cross_entropy.py                 # GPU: 8192 rows x vocab
                                                             # {32000, 36152, 128256}, bf16
    python benchmarks/bench_cross_entropy.py --quick --out /tmp/ce.json   # CPU smoke run

The op is the per-token loss [rows] fp32 = logsumexp(x) - x[target] of logits [rows, vocab],
backpropagated with a per-token upstream gradient (random weights in [0, 1), every fifth
zero, as the trainer's loss mask produces). Implementations:
- "megacpt": `megacpt.kernels.cross_entropy(..., inplace=True)`: the forward computes the loss
  and writes softmax - onehot into the logits; the backward scales those rows in place.
- "torch": `cross_entropy_ref` (fp32 copy + F.cross_entropy, reduction="none"), eager.
- "compile": torch.compile of the same reference.
- "liger": `LigerCrossEntropyFunction` with reduction="none" (supported): its forward also
  writes the gradient into the logits; its loss is in the logits' dtype (bf16), and its
  "none" backward multiplies out of place (a new [rows, vocab] buffer).

Result rows (benchmarks/common.write_results("cross_entropy", rows)), "hidden" holding vocab:
    {"op": "cross_entropy", "pass": "fwd" | "bwd" | "fwd+bwd", "rows": int, "hidden": int,
     "dtype": "bfloat16", "impl": ..., "ms": float, "gbps": float, "frac_of_copy_bw": float,
     "timer": "graph" | "events" | "cpu", "peak_mem_gb": float | None}
Byte model for gbps (e = element size; O(rows) targets, losses and upstream grads ignored),
the least traffic any implementation needs: fwd reads the logits once (rows x vocab x e);
bwd reads the logits and writes dlogits, recomputing the softmax from a saved per-row
logsumexp (2 x); fwd+bwd is the sum (3 x). Implementations that compute the gradient in the
forward (megacpt, liger) therefore look slow in fwd and fast in bwd: compare fwd+bwd.
(megacpt really moves 3 x in fwd, reading each row twice and writing the gradient, and 2 x
in bwd, the in-place row scale: 5 x in all, in exchange for no [rows, vocab] buffer.)
peak_mem_gb (CUDA only, else None): the most memory allocated during one run of the pass
beyond what was allocated before it started (inputs, and for bwd what forward saved).

Timing: fwd and fwd+bwd as in bench_rmsnorm.py (CUDA graph replay, falling back to events).
bwd is timed per call with events, each after a fresh untimed forward: megacpt's backward
scales its buffer in place so it runs once per forward (retain_graph is refused), and the
in-place forwards overwrite their logits. Each implementation gets its own inputs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_rmsnorm import (_timed, compile_static, parse_run_args,  # noqa: E402
                                      pass_rows, run_setup, setup_device)

VOCABS = [32000, 36152, 128256]  # LLaMA-2, the paper's padded vocabulary, LLaMA-3


def _impls(names: list[str]) -> dict:
    """{impl: fn(logits, target) -> per-token loss [rows]}."""
    from megacpt.kernels import cross_entropy, cross_entropy_ref

    table = {"megacpt": lambda x, t: cross_entropy(x, t, inplace=True),
             "torch": cross_entropy_ref}
    if "compile" in names:
        table["compile"] = compile_static(lambda x, t: cross_entropy_ref(x, t))
    if "liger" in names:
        try:
            from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
        except ImportError as exc:
            print(f"liger skipped: {exc}")
        else:
            table["liger"] = lambda x, t: LigerCrossEntropyFunction.apply(
                x, t, None, -100, 0.0, 0.0, "none")[0]
    return {k: v for k, v in table.items() if k in names}


def _inputs(n_rows: int, vocab: int, dtype, device: str):
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    logits = (3 * torch.randn(n_rows, vocab, device=device, generator=gen)).to(dtype)
    target = torch.randint(0, vocab, (n_rows,), device=device, generator=gen)
    dloss = torch.rand(n_rows, device=device, generator=gen)  # [rows] loss-mask weights
    dloss[::5] = 0.0
    return logits.requires_grad_(), target, dloss


def ideal_bytes(rows: int, vocab: int, elem: int) -> dict:
    fwd = rows * vocab * elem  # read logits
    bwd = 2 * rows * vocab * elem  # read logits, write dlogits
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def check_against_reference(fn, ref, logits, target, dloss, what: str) -> None:
    """Before timing: loss and dlogits match the reference (on copies: fn may write in place)."""
    import torch

    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}[logits.dtype]
    results = []
    for f in (fn, ref):
        x = logits.detach().clone().requires_grad_()
        loss = f(x, target)
        (g,) = torch.autograd.grad(loss, x, dloss.to(loss.dtype))
        results.append((loss.float(), g.float()))
    for name, a, b in zip(("loss", "dlogits"), *results):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale,
                                   msg=lambda m: f"{what} {name} differs from reference: {m}")


def _time_bwd(fn, x, target, dloss, warmup: int, iters: int) -> tuple[float, str]:
    """Median ms of one backward, each after a fresh untimed forward."""
    import torch

    cuda = torch.cuda.is_available()
    times = []
    for i in range(warmup + iters):
        loss = fn(x, target)
        dl = dloss.to(loss.dtype)  # liger's loss is in the logits' dtype
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            torch.autograd.grad(loss, x, dl)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            torch.autograd.grad(loss, x, dl)
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    times.sort()
    return times[len(times) // 2], ("events" if cuda else "cpu")


def _peak_gb(run) -> float | None:
    """Peak memory allocated by `run()` above what was allocated before it, GB (CUDA only)."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def _fwd_bwd(fn, x, target, dloss):
    import torch

    loss = fn(x, target)
    return torch.autograd.grad(loss, x, dloss.to(loss.dtype))


def _peaks(fn, x, target, dloss) -> dict:
    import torch

    out = {"fwd": _peak_gb(lambda: fn(x, target)),
           "fwd+bwd": _peak_gb(lambda: _fwd_bwd(fn, x, target, dloss))}
    loss = fn(x, target) if torch.cuda.is_available() else None  # forward outside the region
    out["bwd"] = _peak_gb(lambda: torch.autograd.grad(loss, x, dloss.to(loss.dtype)))
    return out


def measure(fn, x, target, dloss, timer: str, warmup: int, iters: int) -> dict:
    """{pass: (ms, timer_used)}; fwd and fwd+bwd on bench_rmsnorm's side-stream timer."""
    import contextlib

    import torch

    stream, ctx = None, contextlib.nullcontext()
    if torch.cuda.is_available():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        ctx = torch.cuda.stream(stream)
    with ctx:
        out = {"fwd": _timed(lambda: fn(x, target), stream, timer, warmup, iters),
               "fwd+bwd": _timed(lambda: _fwd_bwd(fn, x, target, dloss), stream, timer,
                                 warmup, iters)}
    if stream is not None:
        torch.cuda.current_stream().wait_stream(stream)
    out["bwd"] = _time_bwd(fn, x, target, dloss, warmup, iters)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[8192])
    p.add_argument("--vocab", type=int, nargs="+", default=VOCABS)
    return parse_run_args(p, argv, rows=[5], vocab=[300], warmup=1, iters=2)


def main(argv=None) -> str:
    args = parse_args(argv)
    device = setup_device(args.quick)
    import torch
    from tqdm import tqdm

    from benchmarks.common import write_results
    from megacpt.kernels import cross_entropy_ref

    timer, dtype, copy_bw = run_setup(args, device)
    impls = _impls(args.impls)
    rows_out = []
    configs = [(r, v, name) for r in args.rows for v in args.vocab for name in impls]
    for n_rows, vocab, name in tqdm(configs, desc="cross_entropy", unit="cfg"):
        fn = impls[name]
        x, target, dloss = _inputs(n_rows, vocab, dtype, device)
        if name == "megacpt":
            check_against_reference(fn, cross_entropy_ref, x, target, dloss,
                                    f"cross_entropy {n_rows}x{vocab}")
        peaks = _peaks(fn, x, target, dloss)
        times = measure(fn, x, target, dloss, timer, args.warmup, args.iters)
        base = {"op": "cross_entropy", "rows": n_rows, "hidden": vocab,
                "dtype": str(dtype).replace("torch.", ""), "impl": name}
        for row in pass_rows(base, times, ideal_bytes(n_rows, vocab, x.element_size()),
                             copy_bw):
            rows_out.append({**row, "peak_mem_gb": peaks[row["pass"]]})
        del x, target, dloss, times
        if device == "cuda":
            torch.cuda.empty_cache()
    return write_results("cross_entropy", rows_out, out=args.out)


if __name__ == "__main__":
    main()
