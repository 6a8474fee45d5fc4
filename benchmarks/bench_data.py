"""Sample-index build time and loader throughput.

    python benchmarks/bench_data.py [--tokens 1e9] [--workdir /tmp/megacpt_bench_data]

1. index: a synthetic corpus of `--tokens` tokens (log-normal document lengths, mean ~600
   tokens; a real .idx and a sparse .bin) -> GPTDataset index build (document, sample and
   shuffle index, no cache) for one epoch at seq 2048 and 4096, and for 3 epochs at 2048.
   Megatron's C++ helper is timed on the same sample index when megatron-core imports.
2. blend: the greedy blend index of `--blend-samples` samples over two datasets.
3. loader: build_loader over a 0.7/0.3 blend of two random-token datasets (uint16 .bin on
   disk), seq 2048, micro-batch 8, workers 0 and 2: tokens/s of one process consuming
   batches (collated LongTensors), after a warm-up.

Rows: {"bench": "index", "seq_length", "epochs", "tokens", "samples", "seconds",
"megatron_helper_seconds"}, {"bench": "blend", "samples", "seconds"},
{"bench": "loader", "num_workers", "batches", "tokens_per_s"}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import write_results  # noqa: E402
from megacpt.data.blend import BlendedDataset, blend_indices  # noqa: E402
from megacpt.data.gpt_dataset import GPTDataset  # noqa: E402
from megacpt.data.indexed import IndexedDataset, IndexedDatasetBuilder  # noqa: E402


def synthetic_lengths(tokens: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(tokens / 600 * 1.1)
    lengths = np.clip(rng.lognormal(6.0, 1.0, size=n), 1, 200_000).astype(np.int32)
    cum = np.cumsum(lengths, dtype=np.int64)
    return lengths[: int(np.searchsorted(cum, tokens)) + 1]


def write_lengths_only(prefix: str, lengths: np.ndarray) -> None:
    """Real .idx for `lengths`; a sparse .bin of the right size (reads as zeros)."""
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    builder._lengths.extend(lengths)
    builder._docs.extend(np.arange(1, len(lengths) + 1))
    builder.finalize(prefix + ".idx")
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(int(lengths.sum(dtype=np.int64)) * 2)


def bench_index(workdir: str, tokens: float) -> list[dict]:
    prefix = os.path.join(workdir, f"synthetic_{tokens:.0e}")
    if not os.path.exists(prefix + ".idx"):
        write_lengths_only(prefix, synthetic_lengths(tokens, 0))
    ds = IndexedDataset(prefix)
    total = ds.num_tokens
    try:
        from megatron.core.datasets import helpers
    except ImportError:  # pragma: no cover - optional comparison
        helpers = None
    rows = []
    for seq, epochs in ((2048, 1), (4096, 1), (2048, 3)):
        num_samples = None if epochs == 1 else (epochs * total - 1) // seq - 10
        t0 = time.perf_counter()
        gds = GPTDataset(ds, "synthetic", (0, len(ds)), num_samples, seq, seed=1)
        seconds = time.perf_counter() - t0
        row = {"bench": "index", "seq_length": seq, "epochs": epochs, "tokens": total,
               "documents": len(ds), "samples": len(gds), "seconds": round(seconds, 3)}
        if helpers is not None:
            t0 = time.perf_counter()
            ref = helpers.build_sample_idx(ds.sequence_lengths.copy(), gds.document_index, seq,
                                           epochs, total)
            row["megatron_helper_seconds"] = round(time.perf_counter() - t0, 3)
            assert np.array_equal(ref, gds.sample_index)
        print(row, flush=True)
        rows.append(row)
    return rows


def bench_blend(samples: int) -> dict:
    blend_indices([0.7, 0.3], 1000)  # JIT warm-up
    t0 = time.perf_counter()
    blend_indices([0.7, 0.3], samples)
    row = {"bench": "blend", "samples": samples,
           "seconds": round(time.perf_counter() - t0, 3)}
    print(row, flush=True)
    return row


def bench_loader(workdir: str, batches: int) -> list[dict]:
    from megacpt.data.loader import build_loader

    members, seq, mbs = {}, 2048, 8
    for k, name in enumerate(("zh", "en")):
        prefix = os.path.join(workdir, f"random_{name}")
        if not os.path.exists(prefix + ".idx"):
            lengths = synthetic_lengths(10e6, k + 1)
            rng = np.random.default_rng(k)
            tokens = rng.integers(0, 36152, size=int(lengths.sum()), dtype=np.uint16)
            builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
            builder.add_documents(tokens, lengths)
            builder.finalize(prefix + ".idx")
        ds = IndexedDataset(prefix)
        members[name] = GPTDataset(ds, name, (0, len(ds)), 4 * batches * mbs, seq, seed=k)
    blend = BlendedDataset(members, {"zh": 0.7, "en": 0.3}, 2 * batches * mbs)
    rows = []
    for workers in (0, 2):
        loader = build_loader(blend, mbs, 0, 0, 1, workers)
        it = iter(loader)
        for _ in range(10):
            next(it)
        t0 = time.perf_counter()
        n = 0
        for batch in it:
            n += batch["tokens"].numel()
            if n >= batches * mbs * seq:
                break
        rate = n / (time.perf_counter() - t0)
        row = {"bench": "loader", "num_workers": workers, "micro_batch_size": mbs,
               "seq_length": seq, "batches": n // (mbs * seq), "tokens_per_s": round(rate)}
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=float, default=1e9)
    ap.add_argument("--blend-samples", type=int, default=50_000_000)
    ap.add_argument("--loader-batches", type=int, default=300)
    ap.add_argument("--workdir", default="/tmp/megacpt_bench_data")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    rows = bench_index(args.workdir, args.tokens)
    rows.append(bench_blend(args.blend_samples))
    rows += bench_loader(args.workdir, args.loader_batches)
    rows.append({"bench": "machine", "load_average_1min": round(os.getloadavg()[0], 2)})
    write_results("data", rows, args.out)


if __name__ == "__main__":
    main()
