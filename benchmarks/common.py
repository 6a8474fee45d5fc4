"""Shared helpers for benchmarks: timing, device facts and the result-file format.

Result JSON (one file per benchmark run, under benchmarks/results/):

    {"benchmark": str,            # e.g. "rmsnorm"
     "device": str,               # torch.cuda.get_device_name() or "cpu: <processor>"
     "torch": str, "triton": str | None,
     "command": str,              # the exact command line that produced the file
     "created": str,              # UTC ISO time
     "rows": [ {...}, ... ]}      # benchmark-specific rows (see each bench_*.py docstring)
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shlex
import sys
import time
from typing import Callable

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}"


def versions() -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version}


def time_fn(fn: Callable[[], object], warmup: int = 5, iters: int = 20) -> float:
    """Median wall time of `fn()` in milliseconds (CUDA events on GPU, perf_counter on CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    if torch.cuda.is_available():
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes / time), GB/s."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        nbytes = min(nbytes, 1 << 27)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), warmup=3, iters=10)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def hf_imports() -> None:
    """Import transformers' llama model with this repository's root off sys.path: its
    `kernels/` directory (installed as megacpt.kernels) would otherwise shadow the PyPI
    `kernels` package that transformers probes for, and the import fails."""
    import importlib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved = list(sys.path)
    shadow = sys.modules.get("kernels")
    if shadow is not None and os.path.dirname(getattr(shadow, "__file__", "") or "") == \
            os.path.join(root, "kernels"):
        del sys.modules["kernels"]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != root]
    try:
        importlib.import_module("transformers.models.llama.modeling_llama")
    finally:
        sys.path[:] = saved


def write_results(benchmark: str, rows: list[dict], out: str | None = None,
                  extra: dict | None = None, quiet: bool = False) -> str:
    """Write the result JSON (atomically: a reader never sees half a file) and return its
    path; `extra` adds benchmark-specific top-level keys (e.g. bench_e2e's "profile")."""
    payload = {
        "benchmark": benchmark,
        "device": device_name(),
        **versions(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1]] + sys.argv),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
        **(extra or {}),
    }
    if out is None:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        tag = payload["device"].replace(" ", "_").replace(":", "").replace("/", "_")[:40]
        tag = re.sub(r"[^A-Za-z0-9._-]+", "_", tag)  # letters, digits, . _ - only
        out = os.path.join(RESULTS_DIR, f"{benchmark}-{tag}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, out)
    if not quiet:
        print(f"wrote {out}")
    return out
