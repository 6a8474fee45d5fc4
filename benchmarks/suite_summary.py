"""Print a compact summary of the result JSONs in a directory (what gpu_suite.sh ends with).

    python benchmarks/suite_summary.py OUTDIR

One line per row: e2e rows as impl / dtype / micro-batch / tokens/s / TFLOP/s / MFU / peak
memory (or the row's error), kernel rows as op / pass / impl / shape / GB/s / fraction of
the copy bandwidth; other benchmarks' rows with their first fields.
"""
from __future__ import annotations

import glob
import json
import os
import sys


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def row_line(bench: str, r: dict) -> str:
    if r.get("error"):
        keys = [k for k in ("impl", "op", "dtype", "micro_batch", "rows", "hidden") if k in r]
        return " ".join(_fmt(r[k]) for k in keys) + f"  ERROR {r['error'][:160]}"
    if bench == "e2e":
        keys = ["impl", "dtype", "micro_batch", "tokens_per_sec", "tflops", "mfu",
                "peak_mem_gb", "ms_per_step"]
        return "  ".join(f"{k}={_fmt(r.get(k))}" for k in keys)
    if "gbps" in r:
        keys = ["op", "pass", "impl", "rows", "hidden", "ms", "gbps", "frac_of_copy_bw"]
        return "  ".join(f"{k}={_fmt(r.get(k))}" for k in keys)
    return "  ".join(f"{k}={_fmt(v)}" for k, v in list(r.items())[:8])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print("usage: python benchmarks/suite_summary.py OUTDIR", file=sys.stderr)
        return 2
    for path in sorted(glob.glob(os.path.join(argv[0], "*.json"))):
        try:
            with open(path) as f:
                payload = json.load(f)
        except (OSError, ValueError) as exc:
            print(f"{os.path.basename(path)}: unreadable ({exc})")
            continue
        bench = payload.get("benchmark", "?")
        print(f"-- {os.path.basename(path)} ({bench}, {payload.get('device')}, "
              f"{len(payload.get('rows', []))} rows)")
        for r in payload.get("rows", []):
            print("   " + row_line(bench, r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
