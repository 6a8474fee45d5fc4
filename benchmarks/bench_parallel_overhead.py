"""Do the parallel layers cost anything at tp = pp = dp = 1? megacpt's model vs the same model
built from plain torch modules.

"megacpt": `LlamaModel` with ParallelContext.single(): ColumnParallelLinear, RowParallelLinear,
VocabParallelEmbedding and vocab_parallel_cross_entropy with no process group.
"plain": a deep copy of the same model (same weights) whose parallel layers are replaced by
plain `F.linear` / `F.embedding` modules and whose loss is `F.cross_entropy`; norms,
attention and rotary embeddings are the very same modules. The difference is therefore the
cost of the parallel wrappers alone. Forward + backward of one micro-batch (no optimizer),
the two models timed alternately, several rounds, median.

Rows (benchmarks/common.py format): {"impl": "megacpt"|"plain", "model", "seq", "micro_batch",
"dtype", "ms", "tokens_per_sec"} and one {"impl": "overhead", "pct"} row: megacpt's extra time
over plain in percent (target: < 3).

    python benchmarks/bench_parallel_overhead.py                      # GPU, 1393M, seq 2048
    python benchmarks/bench_parallel_overhead.py --quick --out /tmp/p.json   # CPU smoke run
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import time_fn, write_results  # noqa: E402
from megacpt.config import ModelConfig  # noqa: E402
from megacpt.parallel.layers import (ColumnParallelLinear, RowParallelLinear,  # noqa: E402
                                     VocabParallelEmbedding)
from megacpt.sizes import PAPER_VOCAB_SIZE  # noqa: E402


class PlainLinear(nn.Module):
    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return F.linear(x, self.weight)


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with every parallel layer swapped for its plain torch equivalent."""
    plain = copy.deepcopy(model)
    for parent in list(plain.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (ColumnParallelLinear, RowParallelLinear)):
                setattr(parent, name, PlainLinear(child.weight))
            elif isinstance(child, VocabParallelEmbedding):
                setattr(parent, name, PlainLinear(child.weight))  # used via F.embedding
    return plain


def plain_loss(m: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss [b, s] of the plain copy (LlamaModel.forward without the ctx logic)."""
    x = F.embedding(tokens.t(), m.embedding.weight)  # [s, b, h]
    s = x.shape[0]
    cos, sin = m.rope_cos[:s], m.rope_sin[:s]
    for layer in m.layers.values():
        x = layer(x, cos, sin)
    logits = m.output(m.final_norm(x))  # [s, b, V_padded]
    v = m.cfg.vocab_size
    loss = F.cross_entropy(logits[..., :v].float().reshape(-1, v), labels.t().reshape(-1),
                           reduction="none")
    return loss.view(s, -1).t()


def step_fn(model: nn.Module, loss_fn, tokens, labels):
    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(tokens, labels).mean().backward()
    return step


def run(cfg: ModelConfig, micro_batch: int, dtype: torch.dtype, device: torch.device,
        rounds: int, iters: int) -> list[dict]:
    from megacpt.model import LlamaModel
    from megacpt.parallel.context import ParallelContext

    model = LlamaModel(cfg, ParallelContext.single(device), dtype=dtype, device=device)
    print(model.describe(), flush=True)
    plain = plain_copy(model)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_length), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_length), generator=g)
    tokens, labels = tokens.to(device), labels.to(device)
    with torch.no_grad():  # same numbers before timing anything
        a, b = model(tokens, labels), plain_loss(plain, tokens, labels)
        torch.testing.assert_close(a, b, rtol=1e-3 if dtype != torch.float32 else 1e-5,
                                   atol=1e-3 if dtype != torch.float32 else 1e-5)
    fns = {"megacpt": step_fn(model, model, tokens, labels),
           "plain": step_fn(plain, lambda t, y: plain_loss(plain, t, y), tokens, labels)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):  # alternate, so drift (clocks, other load) hits both alike
        for name, fn in fns.items():
            times[name].append(time_fn(fn, warmup=2 if r == 0 else 1, iters=iters))
        print(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{k} {v[-1]:.2f} ms" for k, v in times.items()), flush=True)
    tokens_per_step = micro_batch * cfg.seq_length
    rows = []
    for name, ts in times.items():
        ms = statistics.median(ts)
        rows.append({"impl": name, "model": cfg.name, "seq": cfg.seq_length,
                     "micro_batch": micro_batch, "dtype": str(dtype).split(".")[-1],
                     "ms": ms, "tokens_per_sec": tokens_per_step / (ms * 1e-3)})
    pct = 100.0 * (rows[0]["ms"] / rows[1]["ms"] - 1.0)
    rows.append({"impl": "overhead", "pct": pct})
    print(f"megacpt {rows[0]['tokens_per_sec']:.0f} tok/s, plain "
          f"{rows[1]['tokens_per_sec']:.0f} tok/s: overhead {pct:+.2f}%", flush=True)
    return rows


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-size", default="1393M")
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="tiny model on CPU, fp32 (smoke run)")
    ap.add_argument("--out", default=None, help="result JSON path (default benchmarks/results)")
    args = ap.parse_args(argv)
    if args.quick:
        cfg = ModelConfig.from_size("tiny", vocab_size=200, seq_length=32,
                                    attention_backend="sdpa", use_kernels=False)
        rows = run(cfg, 2, torch.float32, torch.device("cpu"), rounds=2, iters=3)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_parallel_overhead needs a CUDA GPU; use --quick on CPU")
        cfg = ModelConfig.from_size(args.model_size, vocab_size=PAPER_VOCAB_SIZE,
                                    seq_length=args.seq_length)
        rows = run(cfg, args.micro_batch, torch.bfloat16, torch.device("cuda"), args.rounds,
                   args.iters)
    return write_results("parallel_overhead", rows, args.out)


if __name__ == "__main__":
    main()
