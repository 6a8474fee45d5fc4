"""End-to-end training throughput on one device: megacpt vs transformers' LlamaForCausalLM.

Each implementation trains the same model shape on the same random batch: forward, backward
over `--accum` micro-batches, then an AdamW step (fp32 master weights and fp32 gradient
accumulation for megacpt's bf16 params; HF keeps bf16 params and grads with torch's fused
AdamW, the usual HF setup). Reports tokens/s, TFLOP/s (from the one FLOPs
formula, `ModelConfig.flops_per_token`), MFU against the device's dense bf16 peak
(`megacpt.hardware`) and peak memory.

Rows (benchmarks/common.py file format): {"model", "impl", "seq", "micro_batch",
"tokens_per_sec", "tflops", "mfu", "peak_mem_gb", "ms_per_step", "accum", "recompute",
"ce_chunk_tokens"}; impl in
megacpt (Triton kernels) | megacpt+compile | megacpt-kernels (torch references instead of
the Triton kernels) | hf | hf+compile | hf+liger. Every impl runs at every
`--micro-batch` given; one that runs out of memory (or lacks a package) is reported and
skipped. With `--profile N` the megacpt impls are also run for N steps under torch.profiler:
the file gets a top-level "profile" list {"impl", "micro_batch", "name", "self_ms_per_step",
"pct", "calls_per_step"} of the kernels taking the most device time (CPU ops on CPU), and a
Chrome trace is written beside the JSON - this is where "find where the time goes" starts.

    python benchmarks/bench_e2e.py --model-size 1393M --micro-batch 4 8 --profile 3   # GPU
    python benchmarks/bench_e2e.py --quick --out /tmp/e2e.json             # CPU smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import write_results  # noqa: E402
from megacpt.config import ModelConfig, OptimizerConfig  # noqa: E402
from megacpt.hardware import current_device_name, peak_bf16_flops  # noqa: E402
from megacpt.sizes import PAPER_VOCAB_SIZE  # noqa: E402


def megacpt_step_fn(cfg: ModelConfig, batch, device, dtype, variant: str = "megacpt",
                    accum: int = 1):
    from megacpt.model import LlamaModel
    from megacpt.parallel.context import ParallelContext
    from megacpt.parallel.optimizer import build_optimizer
    from megacpt.parallel.schedule import forward_backward

    if variant == "megacpt+compile":
        cfg = dataclasses.replace(cfg, compile=True)
    elif variant == "megacpt-kernels":  # the same model with the torch references
        cfg = dataclasses.replace(cfg, use_kernels=False)
    ctx = ParallelContext.single(device)
    model = LlamaModel(cfg, ctx, dtype=dtype, device=device)
    print(model.describe(), flush=True)
    opt = build_optimizer(model, OptimizerConfig(), ctx)

    def step():
        opt.zero_grad()
        forward_backward(model, [batch] * accum, ctx, grad_sync=opt.grad_sync)
        opt.step(1e-4)

    return step


def hf_step_fn(cfg: ModelConfig, batch, device, dtype, variant: str, accum: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    if variant == "hf+liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.ffn_hidden_size,
                         num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_attention_heads,
                         num_key_value_heads=cfg.num_query_groups, head_dim=cfg.head_dim,
                         max_position_embeddings=cfg.seq_length, rms_norm_eps=cfg.norm_eps,
                         tie_word_embeddings=False, use_cache=False,
                         attn_implementation="sdpa")
    if cfg.recompute_activations:
        hf_cfg.gradient_checkpointing = True
    with torch.device(device):  # initialise on the device: a CPU init of 1.8B params is slow
        model = LlamaForCausalLM(hf_cfg)
    model.to(dtype=dtype)
    if cfg.recompute_activations:
        model.gradient_checkpointing_enable()
    model.train()
    fwd = torch.compile(model) if variant == "hf+compile" else model
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)

    def step():
        opt.zero_grad(set_to_none=True)
        for _ in range(accum):
            out = fwd(input_ids=batch["tokens"], labels=batch["labels"])
            (out.loss / accum).backward()
        opt.step()

    return step


def measure(step, steps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def profile_steps(step, steps: int, device, trace_path: str, top: int = 25) -> list[dict]:
    """Run `steps` steps under torch.profiler; the `top` ops by self device time per step."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    prof.export_chrome_trace(trace_path)
    with open(trace_path, "rb") as src, gzip.open(trace_path + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)  # chrome://tracing and Perfetto read .json.gz
    os.remove(trace_path)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [{"name": e.key[:120], "self_ms_per_step": getattr(e, attr) / 1e3 / steps,
             "pct": 100.0 * getattr(e, attr) / total, "calls_per_step": e.count / steps}
            for e in events[:top]]


def build_step(impl: str, cfg: ModelConfig, batch, device, dtype, accum: int):
    if impl.startswith("megacpt"):
        return megacpt_step_fn(cfg, batch, device, dtype, impl, accum)
    return hf_step_fn(cfg, batch, device, dtype, impl, accum)


def run_one(impl: str, cfg: ModelConfig, mb: int, args, device, dtype, peak, profile_rows):
    """Measure one (impl, micro-batch); returns its row, or None when it could not run."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (mb, args.seq_length + 1), generator=g)
    batch = {"tokens": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device)}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        step = build_step(impl, cfg, batch, device, dtype, args.accum)
        sec = measure(step, args.steps, args.warmup, device)
        if args.profile and impl.startswith("megacpt"):
            trace = os.path.splitext(args.trace_base)[0] + f"-{impl}-mb{mb}.trace.json"
            os.makedirs(os.path.dirname(os.path.abspath(trace)), exist_ok=True)
            for r in profile_steps(step, args.profile, device, trace):
                profile_rows.append({"impl": impl, "micro_batch": mb, **r})
    except (ImportError, RuntimeError) as e:  # missing package, OOM: report and go on
        print(f"{impl} mb={mb}: skipped ({type(e).__name__}: {str(e)[:200]})", flush=True)
        return None
    finally:
        step = None  # free the model before the next impl
    tokens_per_sec = mb * args.accum * args.seq_length / sec
    tflops = tokens_per_sec * cfg.flops_per_token() / 1e12
    row = {"model": args.model_size, "impl": impl, "seq": args.seq_length, "micro_batch": mb,
           "tokens_per_sec": tokens_per_sec, "tflops": tflops,
           "mfu": (tflops * 1e12 / peak) if peak else None,
           "peak_mem_gb": (torch.cuda.max_memory_allocated() / 2**30
                           if device.type == "cuda" else None),
           "ms_per_step": sec * 1e3, "accum": args.accum,
           "recompute": cfg.recompute_activations,
           "ce_chunk_tokens": cfg.cross_entropy_chunk_tokens if impl.startswith("megacpt") else 0}
    mfu = f"{row['mfu']:.3f}" if peak else "n/a"
    print(f"{impl:16s} mb={mb:<3d} {tokens_per_sec:10.0f} tok/s {tflops:7.1f} TFLOP/s "
          f"MFU {mfu}", flush=True)
    return row


IMPLS = ["megacpt", "megacpt+compile", "megacpt-kernels", "hf", "hf+compile", "hf+liger"]


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size", default="1393M")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, nargs="+", default=[4])
    p.add_argument("--accum", type=int, default=8,
                   help="micro-batches per optimizer step (the paper's 1-4M-token batches "
                        "mean many per step; this amortises the optimizer as training does)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--impls", nargs="+", choices=IMPLS,
                   default=[i for i in IMPLS if i != "megacpt-kernels"])
    p.add_argument("--recompute-activations", action="store_true")
    p.add_argument("--cross-entropy-chunk-tokens", type=int, default=0,
                   help="megacpt: LM head + loss this many tokens at a time (0: whole)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="profile the megacpt impls for this many steps (0: off)")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = PAPER_VOCAB_SIZE
    if device.type != "cuda" and not args.quick:
        raise SystemExit("bench_e2e needs a CUDA GPU; use --quick for a CPU smoke run")
    if args.quick:
        args.model_size, args.seq_length, args.micro_batch, vocab = "tiny", 32, [2], 300
        args.steps, args.warmup, args.accum = 2, 1, 2
        args.impls = [i for i in args.impls if i in ("megacpt", "hf")]
    cfg = ModelConfig.from_size(args.model_size, vocab_size=vocab, seq_length=args.seq_length,
                                recompute_activations=args.recompute_activations,
                                cross_entropy_chunk_tokens=args.cross_entropy_chunk_tokens)
    args.trace_base = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "e2e")
    peak = peak_bf16_flops(current_device_name())
    rows, profile_rows = [], []
    for impl in args.impls:
        if impl == "hf+liger" and device.type != "cuda":
            continue
        for mb in args.micro_batch:
            row = run_one(impl, cfg, mb, args, device, dtype, peak, profile_rows)
            if row is not None:
                rows.append(row)
    extra = {"profile": profile_rows} if args.profile else None
    return write_results("e2e", rows, args.out, extra)


if __name__ == "__main__":
    main()
