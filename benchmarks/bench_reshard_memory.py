"""Peak memory and bytes read per rank of a resharding `--load` (issue 16: each rank reads
only the slices it needs, streaming, so its memory stays near its own shard).

    python benchmarks/bench_reshard_memory.py [--size 49M] [--cases tp1->tp2 ...]
                                              [--workdir /tmp/megacpt_bench_reshard]

A model of `--size` (fp32, AdamW state after one step) is saved in tp1 and converted to tp2
(`convert_checkpoint`, checksums recorded). Then each case loads one layout into another,
every rank in its own process (gloo): the rank builds its model and optimizer, resets its
peak-RSS mark (/proc/self/clear_refs), calls `load_checkpoint` (checksums verified) and
reports its peak RSS above the RSS before the load, the tensor bytes it read (the reader's
count) and all bytes its process read (/proc/self/io rchar: checksum verification included),
next to the size of its own part (parameters + Adam moments) and of the whole checkpoint.

Rows: {"case", "rank", "part_mb", "checkpoint_mb", "tensor_mb_read", "all_mb_read",
"load_peak_extra_mb", "load_s"}.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_checkpoint import build, config, dir_bytes  # noqa: E402
from benchmarks.common import write_results  # noqa: E402
from megacpt.checkpoint import convert_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from megacpt.checkpoint import integrity  # noqa: E402

MB = 1e6
CASES = {"tp1->tp1": (1, 1), "tp2->tp2": (2, 2), "tp1->tp2": (1, 2), "tp2->tp1": (2, 1)}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def _rank(rank: int, world: int, store: str, size: str, tp: int, ckpt: str, out) -> None:
    from megacpt.model.llama import LlamaModel
    from megacpt.parallel.context import ParallelContext
    from megacpt.parallel.optimizer import build_optimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    cfg = config(size, torch.float32, "cpu")
    ctx = ParallelContext.build(tp=tp, pp=1, device="cpu")
    model = LlamaModel(cfg.model, ctx, dtype=torch.float32, device="cpu", seed=2)
    opt = build_optimizer(model, cfg.optim, ctx)
    part = sum(p.numel() * p.element_size() for p in model.parameters()) * 3  # + 2 moments
    gc.collect()
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS (VmHWM) := current RSS
    rss0, rchar0, stats = _status_kb("VmRSS"), _rchar(), {}
    t0 = time.perf_counter()
    load_checkpoint(ckpt, model, opt, cfg, ctx, stats=stats)
    load_s = time.perf_counter() - t0
    out.put({"rank": rank, "part_mb": round(part / MB, 1),
             "tensor_mb_read": round(stats["bytes_read"] / MB, 1),
             "all_mb_read": round((_rchar() - rchar0) / MB, 1),
             "load_peak_extra_mb": round((_status_kb("VmHWM") - rss0) * 1024 / MB, 1),
             "load_s": round(load_s, 2)})
    dist.destroy_process_group()


def run_case(size: str, tp: int, ckpt: str) -> list[dict]:
    """Load `ckpt` into a tp-way layout on tp processes; their rows in rank order."""
    ctx = mp.get_context("spawn")
    out, tmp = ctx.Queue(), tempfile.mkdtemp(prefix="megacpt-reshard-")
    procs = [ctx.Process(target=_rank, args=(r, tp, os.path.join(tmp, "store"), size, tp,
                                             ckpt, out)) for r in range(tp)]
    for p in procs:
        p.start()
    rows = [out.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"rank process exited with {p.exitcode}")
    shutil.rmtree(tmp, ignore_errors=True)
    return sorted(rows, key=lambda r: r["rank"])


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="49M")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--workdir", default="/tmp/megacpt_bench_reshard")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    tp1, tp2 = os.path.join(args.workdir, "tp1"), os.path.join(args.workdir, "tp2")
    cfg, ctx, model, opt = build(args.size, torch.float32, "cpu")
    state = {"scheduler": {}, "data": {}, "counters": {}, "rng": None}
    save_checkpoint(tp1, 1, model, opt, cfg, ctx, state)
    del model, opt
    convert_checkpoint(tp1, tp2, 2, 1, progress=False)
    integrity.record_all(os.path.join(tp2, "iter_0000001"))
    full = dir_bytes(os.path.join(tp1, "iter_0000001"))
    rows = []
    for case in args.cases:
        saved, tp = CASES[case]
        for row in run_case(args.size, tp, tp1 if saved == 1 else tp2):
            rows.append({"case": case, "size": args.size, **row,
                         "checkpoint_mb": round(full / MB, 1)})
            print(rows[-1], flush=True)
    shutil.rmtree(args.workdir, ignore_errors=True)
    rows.append({"bench": "machine", "load_average_1min": round(os.getloadavg()[0], 2)})
    return write_results("reshard_memory", rows, args.out)


if __name__ == "__main__":
    main()
