"""Checkpoint save/load speed, and how long a save blocks training: sync vs --async-save.

    python benchmarks/bench_checkpoint.py [--sizes 49M 85M] [--repeats 3] [--bf16]
                                          [--workdir /tmp/megacpt_bench_ckpt]

For each size (the paper's registry, vocabulary 32000): a single-process model with AdamW
state after one step. Each repeat saves it synchronously (`save_checkpoint`: training is
blocked for the whole save) and asynchronously (`AsyncCheckpointSaver`: blocked only for the
snapshot into CPU buffers allocated and page-touched ahead by `prepare`, as the trainer does;
pinned on GPU), side by side in the same process, while
"training" (a forward/backward of the model) runs on until the background write ends; then
loads the checkpoint back (`load_checkpoint`, model and optimizer). Files go to the page cache
as a real run's do (no fsync; `os.sync()` between measurements so one save's writeback does not
run into the next), so on a machine with free memory the save rate is partly a memory rate; the ratio blocked(async) / blocked(sync) is the figure of merit (goal: <= 0.2 from
49M up).

Rows: {"size", "params", "dtype", "checkpoint_gb", "sync_blocked_s", "async_blocked_s",
"async_blocked_ratio", "async_write_s", "train_steps_during_write", "save_gbps",
"load_s", "load_gbps", "spread"}; times are medians over the repeats (the first save, which
warms the page cache and the files, is left out); "spread" gives each time's [min, max] and
"async_blocked_ratio" also per repeat (each async save right after its sync one). The wait for
a previous async save to finish is not part of "async_blocked_s" (the loop finishes each
save before the next; in a run it is 0 whenever saves are further apart than a write takes,
and the trainer logs it separately).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import write_results  # noqa: E402
from megacpt import sizes  # noqa: E402
from megacpt.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from megacpt.checkpoint.async_save import AsyncCheckpointSaver  # noqa: E402
from megacpt.config import Config, ModelConfig, OptimizerConfig  # noqa: E402
from megacpt.model.llama import LlamaModel  # noqa: E402
from megacpt.parallel.context import ParallelContext  # noqa: E402
from megacpt.parallel.optimizer import build_optimizer  # noqa: E402


def build(size: str, dtype: torch.dtype, device: str):
    cfg = config(size, dtype, device)
    ctx = ParallelContext.single(device)
    model = LlamaModel(cfg.model, ctx, dtype=dtype, device=device, seed=1)
    opt = build_optimizer(model, cfg.optim, ctx)
    step(model, opt, device)
    return cfg, ctx, model, opt


def config(size: str, dtype: torch.dtype, device: str) -> Config:
    """The benchmarked run's config: the registry's `size`, vocabulary 32000, seq 128."""
    s = sizes.get_size(size)
    mcfg = ModelConfig(num_layers=s.num_layers, hidden_size=s.hidden_size,
                       ffn_hidden_size=s.ffn_hidden_size, num_attention_heads=s.num_attention_heads,
                       num_query_groups=s.num_query_groups, vocab_size=32000, seq_length=128,
                       attention_backend="sdpa" if device == "cuda" else "eager",
                       use_kernels=False, name=size)
    cfg = Config(model=mcfg, optim=OptimizerConfig())
    cfg.training.bf16 = dtype == torch.bfloat16
    return cfg


def step(model, opt, device: str) -> None:
    """One small training step (stands in for the training that goes on)."""
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 128), device=device)
    opt.zero_grad()
    model(tokens, tokens).mean().backward()
    opt.step(1e-4)


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def bench_size(size: str, dtype: torch.dtype, device: str, repeats: int, workdir: str) -> dict:
    cfg, ctx, model, opt = build(size, dtype, device)
    cfg.checkpoint.keep_last_checkpoints = 1
    state = {"scheduler": {}, "data": {}, "counters": {}, "rng": None}
    sync_dir, async_dir = os.path.join(workdir, "sync"), os.path.join(workdir, "async")
    saver = AsyncCheckpointSaver(ctx)
    saver.prepare(model, opt, cfg)  # as the trainer does when it starts
    sync_s, async_s, write_s, steps, load_s = [], [], [], [], []
    for it in range(1, repeats + 2):  # the first repeat warms up (allocates buffers)
        os.sync()  # no writeback of an earlier save running into the one measured
        t0 = time.perf_counter()
        save_checkpoint(sync_dir, it, model, opt, cfg, ctx, state)
        t_sync = time.perf_counter() - t0
        os.sync()
        t0 = time.perf_counter()
        saver.save(async_dir, it, model, opt, cfg, state)
        t_async = saver.last_blocked_s  # the snapshot (nothing in flight to wait for)
        assert saver.last_wait_s < 0.01, saver.last_wait_s
        n = 0
        while saver.writing:
            step(model, opt, device)  # training goes on while the write runs
            n += 1
        saver.finish()
        t_write = time.perf_counter() - t0
        os.sync()
        t0 = time.perf_counter()
        load_checkpoint(sync_dir, model, opt, cfg, ctx)
        t_load = time.perf_counter() - t0
        if it > 1:
            sync_s.append(t_sync), async_s.append(t_async), write_s.append(t_write)
            steps.append(n), load_s.append(t_load)
        print(f"{size}: sync {t_sync:.3f}s, async blocked {t_async:.3f}s (write {t_write:.3f}s,"
              f" {n} steps meanwhile), load {t_load:.3f}s", flush=True)
    nbytes = dir_bytes(os.path.join(sync_dir, f"iter_{repeats + 1:07d}"))
    med = statistics.median
    row = {"size": size, "params": model.cfg.num_parameters(), "dtype": str(dtype)[6:],
           "checkpoint_gb": round(nbytes / 1e9, 3), "sync_blocked_s": round(med(sync_s), 4),
           "async_blocked_s": round(med(async_s), 4),
           "async_blocked_ratio": round(med(async_s) / med(sync_s), 3),
           "async_write_s": round(med(write_s), 4), "train_steps_during_write": med(steps),
           "save_gbps": round(nbytes / med(sync_s) / 1e9, 3), "load_s": round(med(load_s), 4),
           "load_gbps": round(nbytes / med(load_s) / 1e9, 3),
           "spread": {"sync_blocked_s": _span(sync_s), "async_blocked_s": _span(async_s),
                      "async_write_s": _span(write_s), "load_s": _span(load_s),
                      "async_blocked_ratio": [round(a / s, 3) for a, s in zip(async_s, sync_s)]}}
    shutil.rmtree(workdir, ignore_errors=True)
    return row


def _span(xs: list[float]) -> list[float]:
    return [round(min(xs), 4), round(max(xs), 4)]


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["49M"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bf16", action="store_true", help="bf16 parameters (fp32 masters)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", default="/tmp/megacpt_bench_ckpt")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    rows = []
    for size in args.sizes:
        rows.append(bench_size(size, dtype, args.device, args.repeats,
                               os.path.join(args.workdir, size)))
        print(rows[-1], flush=True)
    rows.append({"bench": "machine", "load_average_1min": round(os.getloadavg()[0], 2)})
    return write_results("checkpoint", rows, args.out)


if __name__ == "__main__":
    main()
