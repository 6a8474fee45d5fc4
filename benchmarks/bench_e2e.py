"""End-to-end training throughput on one device: megacpt vs transformers' LlamaForCausalLM.

Each implementation trains the same model shape on the same random batch: forward, backward
and an AdamW step (fp32 master weights for megacpt's bf16 params; HF keeps bf16 params with
torch's fused AdamW, the usual HF setup). Reports tokens/s, TFLOP/s (from the one FLOPs
formula, `ModelConfig.flops_per_token`), MFU against the device's dense bf16 peak
(`megacpt.hardware`) and peak memory.

Rows (benchmarks/common.py file format): {"model", "impl", "seq", "micro_batch",
"tokens_per_sec", "tflops", "mfu", "peak_mem_gb", "ms_per_step"}; impl in megacpt | hf |
hf+compile | hf+liger.

    python benchmarks/bench_e2e.py --model-size 1393M --micro-batch 4      # GPU
    python benchmarks/bench_e2e.py --quick --out /tmp/e2e.json             # CPU smoke run
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import write_results  # noqa: E402
from megacpt.config import ModelConfig, OptimizerConfig  # noqa: E402
from megacpt.hardware import current_device_name, peak_bf16_flops  # noqa: E402
from megacpt.sizes import PAPER_VOCAB_SIZE  # noqa: E402


def megacpt_step_fn(cfg: ModelConfig, batch, device, dtype):
    from megacpt.model import LlamaModel
    from megacpt.parallel.context import ParallelContext
    from megacpt.parallel.optimizer import build_optimizer
    from megacpt.parallel.schedule import forward_backward

    ctx = ParallelContext.single(device)
    model = LlamaModel(cfg, ctx, dtype=dtype, device=device)
    print(model.describe(), flush=True)
    opt = build_optimizer(model, OptimizerConfig(), ctx)

    def step():
        opt.zero_grad()
        forward_backward(model, [batch], ctx)
        opt.step(1e-4)

    return step


def hf_step_fn(cfg: ModelConfig, batch, device, dtype, variant: str):
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
    model = LlamaForCausalLM(hf_cfg).to(device=device, dtype=dtype)
    fwd = torch.compile(model) if variant == "hf+compile" else model
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)

    def step():
        opt.zero_grad(set_to_none=True)
        out = fwd(input_ids=batch["tokens"], labels=batch["labels"])
        out.loss.backward()
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


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size", default="1393M")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--impls", nargs="+", default=["megacpt", "hf", "hf+compile", "hf+liger"])
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = PAPER_VOCAB_SIZE
    if args.quick:
        args.model_size, args.seq_length, args.micro_batch, vocab = "tiny", 32, 2, 300
        args.steps, args.warmup = 2, 1
        args.impls = [i for i in args.impls if i in ("megacpt", "hf")]
    cfg = ModelConfig.from_size(args.model_size, vocab_size=vocab, seq_length=args.seq_length)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (args.micro_batch, args.seq_length + 1), generator=g)
    batch = {"tokens": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device)}
    peak = peak_bf16_flops(current_device_name())
    rows = []
    for impl in args.impls:
        if impl == "hf+liger" and device.type != "cuda":
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            step = (megacpt_step_fn(cfg, batch, device, dtype) if impl == "megacpt"
                    else hf_step_fn(cfg, batch, device, dtype, impl))
            sec = measure(step, args.steps, args.warmup, device)
        except (ImportError, RuntimeError) as e:  # missing package, OOM: report and go on
            print(f"{impl}: skipped ({type(e).__name__}: {str(e)[:200]})", flush=True)
            continue
        tokens_per_sec = args.micro_batch * args.seq_length / sec
        tflops = tokens_per_sec * cfg.flops_per_token() / 1e12
        rows.append({"model": args.model_size, "impl": impl, "seq": args.seq_length,
                     "micro_batch": args.micro_batch, "tokens_per_sec": tokens_per_sec,
                     "tflops": tflops, "mfu": (tflops * 1e12 / peak) if peak else None,
                     "peak_mem_gb": (torch.cuda.max_memory_allocated() / 2**30
                                     if device.type == "cuda" else None),
                     "ms_per_step": sec * 1e3})
        print(f"{impl:11s} {tokens_per_sec:10.0f} tok/s {tflops:7.1f} TFLOP/s "
              f"MFU {rows[-1]['mfu'] if peak else 'n/a'}", flush=True)
    return write_results("e2e", rows, args.out)


if __name__ == "__main__":
    main()
