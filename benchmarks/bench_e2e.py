"""End-to-end training throughput on one device: megacpt vs transformers' LlamaForCausalLM.

    python benchmarks/bench_e2e.py --model-size 1393M --micro-batch 4 --profile 3   # GPU
    python benchmarks/bench_e2e.py --device cpu --model-size 49M --seq-length 512 \\
        --micro-batch 1 --accum 2 --dtype fp32 bf16 --reps 5       # CPU, paired reps
    python benchmarks/bench_e2e.py --quick --out /tmp/e2e.json    # CPU smoke run

Every implementation trains the same model shape on the same random batch: forward and
backward over `--accum` micro-batches, gradient clipping to 1.0 and an AdamW step.

Fair comparison (what HF gets, so the rows measure the frameworks, not the setups):
- the same targets: megacpt's labels are the inputs shifted by one; HF receives them as
  `shift_labels`, so it does not shift them again (no double shift, all s tokens counted);
- the same gradient clipping (`clip_grad_norm_` to OptimizerConfig.clip_grad);
- the same precision recipe: with bf16 parameters HF gets fp32 master weights, fp32
  gradient accumulation (a hook adds each bf16 gradient into the master's fp32 grad) and fp32
  AdamW state, as megacpt has; with fp32 the parameters are the masters. The optimizer is
  torch's AdamW in each (HF: torch's default implementation for the device).
What still differs is stated in each row's "notes" (e.g. the attention kernel, the init).

Paired reps: with `--reps R` every implementation is built once, then R rounds each run
`--steps` timed steps of every implementation in turn (interleaved, so a noisy shared machine
slows all of them alike); the row reports the median round (`ms_per_step`) and all of them
(`rep_ms`). `--no-interleave` (the default on CUDA, where several 1B+ models may not fit at
once) runs the R rounds of one implementation before building the next.

Robustness: each row is written to the JSON as soon as it is measured (the file always holds
every finished row); an exception in one implementation (missing package, OOM, a failing
kernel) is recorded in its row ("error") and the run goes on; `--time-limit-s` bounds each
implementation (a SIGALRM stops it; the row says "timed_out" and keeps the finished reps);
build, warm-up (with compilation) and step times are reported apart; between
implementations gc runs, dynamo is reset and the CUDA cache emptied.

Peak memory (`peak_mem_gb`), what the implementation needs at its peak (params, grads,
optimizer state, activations, temporaries); other implementations alive in the same process
do not count. CUDA: the bytes allocated over build + warm-up plus the highest allocation
above that level during one more step (torch.cuda's allocator counters). CPU (no allocator
counters): a fresh spawned process builds the implementation and runs warm-up + 1 step; the
row gets its peak RSS growth over its RSS once the frameworks are imported and the batch
exists (Linux /proc high-water mark).

Rows (benchmarks/common.py file format): {"model", "impl", "dtype", "seq", "micro_batch",
"accum", "tokens_per_sec", "tflops", "mfu", "peak_mem_gb", "ms_per_step", "rep_ms", "reps",
"build_s", "warmup_s", "loss", "recompute", "ce_chunk_tokens", "notes", "error",
"timed_out", "min_ms", "speedup_vs_hf_paired"} (the last: median over rounds of hf's time /
this row's, when hf ran in the same interleaved rounds; > 1 means faster than hf); impl in megacpt (Triton kernels where they run) | megacpt+compile |
megacpt-kernels (torch references instead of the Triton kernels) | hf | hf+compile |
hf+liger. TFLOP/s come from the one FLOPs formula (`ModelConfig.flops_per_token`), MFU from the
device's dense bf16 peak (`megacpt.hardware`). With `--profile N` the megacpt impls also run N
steps under torch.profiler: the file gets a top-level "profile" list {"impl", "dtype",
"micro_batch", "name", "self_ms_per_step", "pct", "calls_per_step"} and a Chrome trace
(.trace.json.gz) is written beside the JSON.
"""
from __future__ import annotations

import argparse
import gc
import os
import re
import signal
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import hf_imports, write_results  # noqa: E402
from benchmarks.e2e_steps import build_step  # noqa: E402
from megacpt.config import ModelConfig  # noqa: E402
from megacpt.hardware import current_device_name, peak_bf16_flops  # noqa: E402
from megacpt.sizes import PAPER_VOCAB_SIZE  # noqa: E402

IMPLS = ["megacpt", "megacpt+compile", "megacpt-kernels", "hf", "hf+compile", "hf+liger"]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


class ImplTimeout(Exception):
    """An implementation ran past --time-limit-s."""


def safe_name(s: str) -> str:
    """File-name part of letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _allocated(device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


def step_peak_bytes(step, device) -> int:
    """CUDA: highest allocation above the starting point during one step."""
    _sync(device)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    _sync(device)
    return torch.cuda.max_memory_allocated() - base


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def cpu_memory_probe(name, dtype_name, mb, cfg, accum, warmup, threads) -> int:
    """Run in a fresh process: peak RSS growth (bytes) over build + warm-up + one step,
    measured from the RSS once torch, megacpt and transformers are imported and the batch
    exists (Linux /proc: the high-water mark is reset at that point)."""
    torch.set_num_threads(threads)
    hf_imports()
    import megacpt.model  # noqa: F401 - both frameworks imported before the baseline

    tokens = torch.randint(0, cfg.vocab_size, (mb, cfg.seq_length + 1),
                           generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _rss_bytes("VmRSS")
    step, _ = build_step(name, cfg, batch, torch.device("cpu"), DTYPES[dtype_name], accum)
    for _ in range(warmup + 1):
        step()
    return _rss_bytes("VmHWM") - base


def cpu_peak_bytes(impl: "Impl", timeout: float) -> int:
    """`cpu_memory_probe` for `impl` in a spawned process (CPU has no allocator counters;
    other implementations alive in this process must not count)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    a = impl.args
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        fut = pool.submit(cpu_memory_probe, impl.name, impl.dtype_name, impl.mb, impl.cfg,
                          a.accum, a.warmup, torch.get_num_threads())
        try:
            return fut.result(timeout=timeout)
        except cf.TimeoutError:
            for proc in list(pool._processes.values()):  # our own child, by its pid
                proc.terminate()
            raise ImplTimeout(f"memory probe past {timeout:.0f} s") from None


class Impl:
    """One implementation at one (dtype, micro-batch): built once, measured in rounds."""

    def __init__(self, name, dtype_name, mb, cfg, args, device):
        self.name, self.dtype_name, self.mb = name, dtype_name, mb
        self.cfg, self.args, self.device = cfg, args, device
        self.step = None
        self.row = {"model": args.model_size, "impl": name, "dtype": dtype_name,
                    "seq": args.seq_length, "micro_batch": mb, "accum": args.accum,
                    "reps": 0, "rep_ms": [], "recompute": cfg.recompute_activations,
                    "ce_chunk_tokens": cfg.cross_entropy_chunk_tokens
                    if name.startswith("megacpt") else 0,
                    "tokens_per_sec": None, "tflops": None, "mfu": None, "peak_mem_gb": None,
                    "ms_per_step": None, "build_s": None, "warmup_s": None, "loss": None,
                    "notes": "", "error": None, "timed_out": False}
        self.spent = 0.0

    def _guarded(self, fn):
        """Run fn under this implementation's remaining time budget (SIGALRM)."""
        left = self.args.time_limit_s - self.spent
        if left <= 0:
            raise ImplTimeout(f"past --time-limit-s {self.args.time_limit_s}")
        use_alarm = hasattr(signal, "setitimer")
        if use_alarm:
            def on_alarm(signum, frame):
                raise ImplTimeout(f"past --time-limit-s {self.args.time_limit_s}")
            old = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, left)
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)
            self.spent += time.perf_counter() - t0

    def fail(self, exc: BaseException) -> None:
        self.row["timed_out"] = isinstance(exc, ImplTimeout)
        self.row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(f"{self.name} {self.dtype_name} mb={self.mb}: {self.row['error']}", flush=True)
        self.release()

    @property
    def alive(self) -> bool:
        return self.step is not None

    def build(self, batch) -> None:
        """Build and warm up (compilation happens here); measure the resident bytes."""
        dtype = DTYPES[self.dtype_name]

        def go():
            t0 = time.perf_counter()
            self.step, notes = build_step(self.name, self.cfg, batch, self.device, dtype,
                                          self.args.accum)
            self.row["notes"] = notes
            self.row["build_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(self.args.warmup):
                self.row["loss"] = self.step()
            _sync(self.device)
            self.row["warmup_s"] = time.perf_counter() - t0

        try:
            before = _allocated(self.device)
            self._guarded(go)
            self.resident = _allocated(self.device) - before  # CUDA; CPU: see finish()
        except Exception as exc:  # noqa: BLE001 - recorded in the row, the run goes on
            self.fail(exc)

    def measure_round(self) -> None:
        """One round of --steps timed steps."""
        def go():
            _sync(self.device)
            t0 = time.perf_counter()
            for _ in range(self.args.steps):
                self.row["loss"] = self.step()
            _sync(self.device)
            return (time.perf_counter() - t0) / self.args.steps

        try:
            sec = self._guarded(go)
        except Exception as exc:  # noqa: BLE001
            self.fail(exc)
            return
        self.row["rep_ms"].append(round(sec * 1e3, 3))
        self.row["reps"] = len(self.row["rep_ms"])
        self._fill_rates()

    def _fill_rates(self) -> None:
        ms = statistics.median(self.row["rep_ms"])
        tok = self.mb * self.args.accum * self.args.seq_length / (ms / 1e3)
        tflops = tok * self.cfg.flops_per_token() / 1e12
        peak = self.args.peak_flops
        self.row.update(ms_per_step=ms, tokens_per_sec=tok, tflops=tflops,
                        mfu=(tflops * 1e12 / peak) if peak else None)

    def finish(self, profile_rows: list) -> None:
        """Peak memory and the optional profile, then free the model."""
        try:
            if self.device.type == "cuda":
                peak = self.resident + max(step_peak_bytes(self.step, self.device), 0)
            elif not self.args.cpu_memory:
                peak = None
            else:
                left = self.args.time_limit_s - self.spent
                t0 = time.perf_counter()
                try:
                    peak = cpu_peak_bytes(self, left)
                finally:
                    self.spent += time.perf_counter() - t0
            self.row["peak_mem_gb"] = None if peak is None else peak / 2**30
            if self.args.profile and self.name.startswith("megacpt"):
                from benchmarks.e2e_steps import profile_steps

                base = os.path.splitext(os.path.basename(self.args.out))[0]
                trace = os.path.join(self.args.trace_dir, safe_name(
                    f"{base}-{self.name}-{self.dtype_name}-mb{self.mb}") + ".trace.json")
                rows = self._guarded(lambda: profile_steps(self.step, self.args.profile,
                                                           self.device, trace))
                profile_rows += [{"impl": self.name, "dtype": self.dtype_name,
                                  "micro_batch": self.mb, **r} for r in rows]
        except Exception as exc:  # noqa: BLE001
            self.fail(exc)
        self.release()

    def release(self) -> None:
        self.step = None
        gc.collect()
        try:
            torch._dynamo.reset()
        except Exception:  # noqa: BLE001 - dynamo absent or already clean
            pass
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def report(self) -> None:
        r = self.row
        if r["ms_per_step"] is None:
            return
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gb']:.2f} GiB" if r["peak_mem_gb"] is not None else "n/a"
        vs = r.get("speedup_vs_hf_paired")
        vs = f", {vs:.3f}x hf paired" if vs is not None and self.name != "hf" else ""
        print(f"{self.name:16s} {self.dtype_name:5s} mb={self.mb:<3d} "
              f"{r['tokens_per_sec']:10.0f} tok/s {r['tflops']:7.2f} TFLOP/s MFU {mfu} "
              f"peak {mem} ({r['reps']} reps, median {r['ms_per_step']:.0f} ms/step{vs})",
              flush=True)


def paired_speedups(group: list[Impl], ref: str = "hf") -> None:
    """Fill each row's "min_ms" and, when `ref` ran in the same rounds (interleaved),
    "speedup_vs_hf_paired": the median over rounds of ref's time / this impl's time - on a
    shared machine the robust comparison, as both saw the same load within a round."""
    base = next((i.row for i in group if i.name == ref), None)
    for impl in group:
        r = impl.row
        r["min_ms"] = min(r["rep_ms"]) if r["rep_ms"] else None
        pairs = list(zip(base["rep_ms"], r["rep_ms"])) if base is not None else []
        if pairs and len(base["rep_ms"]) == len(r["rep_ms"]):
            r["speedup_vs_hf_paired"] = statistics.median(b / m for b, m in pairs)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: CUDA (a full run on CPU needs --device cpu or --quick)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None,
                   help="parameter dtypes (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--model-size", default="1393M")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, nargs="+", default=[4])
    p.add_argument("--accum", type=int, default=8,
                   help="micro-batches per optimizer step (the paper's 1-4M-token batches "
                        "mean many per step; this amortises the optimizer as training does)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=1, help="rounds (paired reps; median reported)")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="build every impl first and alternate them each round (default: on "
                        "CPU only)")
    p.add_argument("--time-limit-s", type=float, default=900.0,
                   help="per-implementation limit (build, warm-up, reps, profile)")
    p.add_argument("--impls", nargs="*", choices=IMPLS, default=None,
                   help="default: all but megacpt-kernels (--quick: megacpt and hf)")
    p.add_argument("--recompute-activations", action="store_true")
    p.add_argument("--cross-entropy-chunk-tokens", type=int, default=0,
                   help="megacpt: LM head + loss this many tokens at a time (0: whole)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="profile the megacpt impls for this many steps (0: off)")
    p.add_argument("--cpu-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: measure peak memory in a spawned probe (one more build and "
                        "warm-up per row)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch threads (default: torch's; on a shared machine 1 avoids "
                        "OpenMP spin-waits against other jobs)")
    p.add_argument("--trace-dir", default=None,
                   help="where --profile writes its Chrome traces (default: beside --out)")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else ("cpu" if args.quick else None)
    if args.device is None:
        raise SystemExit("bench_e2e needs a CUDA GPU; use --quick for a CPU smoke run "
                         "(or --device cpu for a full CPU measurement)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_e2e: --device cuda but torch.cuda.is_available() is False")
    vocab = PAPER_VOCAB_SIZE
    if args.quick:
        args.model_size, args.seq_length, args.micro_batch, vocab = "tiny", 32, [2], 300
        args.steps, args.warmup, args.accum = 2, 1, 2
    if args.impls is None:
        args.impls = ["megacpt", "hf"] if args.quick else [i for i in IMPLS
                                                            if i != "megacpt-kernels"]
    if not args.impls or not args.micro_batch:
        raise SystemExit("bench_e2e: nothing selected to measure (empty --impls or "
                         "--micro-batch)")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = args.dtype or (["bf16"] if device.type == "cuda" else ["fp32"])
    interleave = device.type == "cpu" if args.interleave is None else args.interleave
    cfg = ModelConfig.from_size(args.model_size, vocab_size=vocab, seq_length=args.seq_length,
                                recompute_activations=args.recompute_activations,
                                cross_entropy_chunk_tokens=args.cross_entropy_chunk_tokens)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   safe_name(f"e2e-{args.model_size}-{device.type}.json"))
    args.out = out
    args.trace_dir = args.trace_dir or os.path.dirname(os.path.abspath(out))
    args.peak_flops = peak_bf16_flops(current_device_name())
    if device.type == "cuda":
        hf_imports()  # transformers imported once, with the repo's kernels/ dir out of the way
    rows, profile_rows = [], []

    def save() -> None:
        for group in groups:
            paired_speedups(group)
        extra = {"profile": profile_rows} if args.profile else {}
        extra["settings"] = {"interleave": interleave, "reps": args.reps, "steps": args.steps,
                             "threads": torch.get_num_threads(),
                             "warmup": args.warmup, "accum": args.accum,
                             "time_limit_s": args.time_limit_s}
        write_results("e2e", [i.row for i in rows], out, extra, quiet=True)

    groups = [[Impl(name, dt, mb, cfg, args, device) for name in args.impls]
              for dt in dtypes for mb in args.micro_batch]
    for group in groups:
        tokens = torch.randint(0, cfg.vocab_size, (group[0].mb, args.seq_length + 1),
                               generator=torch.Generator().manual_seed(0))
        batch = {"tokens": tokens[:, :-1].contiguous().to(device),
                 "labels": tokens[:, 1:].contiguous().to(device)}  # [b, s] each
        rows += group
        runs = [group] if interleave else [[impl] for impl in group]
        for run in runs:
            for impl in run:
                impl.build(batch)
                save()
            for r in range(args.reps):
                order = run if r % 2 == 0 else run[::-1]  # alternate who goes first
                for impl in order:
                    if impl.alive:
                        impl.measure_round()
                save()
            for impl in run:
                if impl.alive:
                    impl.finish(profile_rows)
                save()
                impl.report()
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
