"""Communication volume of one training step, per rank and per token, by parallel axis.

Counts the bytes each rank SENDS with NCCL's ring algorithms: an all-reduce of N bytes over n
ranks sends 2 (n - 1) / n N per rank, an all-gather or reduce-scatter of N (full-size) bytes
(n - 1) / n N, a point-to-point send N. Scalar collectives (loss, grad norm) are ignored.

Tensor parallelism (t ranks), per micro-batch of T = b s tokens, activations of `act_bytes`:
- each transformer layer: 4 all-reduces of [s, b, h] (forward after the attention output and
  MLP down projections, backward before the QKV and gate-up projections); with sequence
  parallelism the same traffic as 4 all-gathers + 4 reduce-scatters: 4 x 2(t-1)/t x T h a;
- first stage: the embedding's all-reduce (reduce-scatter + all-gather with SP): 2(t-1)/t T h a;
- last stage: the output layer's input-gradient all-reduce, 2(t-1)/t T h a, and the
  vocab-parallel cross entropy's 3 fp32 all-reduces per token (max, target logit, sum of exp);
- per step with SP: the fp32 norm-weight gradient all-reduce.
Pipeline parallelism: per micro-batch, a stage sends its output activations forward (all but
the last) and its input gradients backward (all but the first): T h a each, divided by t with
sequence parallelism (without it every tp rank sends the whole activation). Interleaved 1F1B
(vp virtual stages per rank, `megacpt.parallel.interleaved`) sends at every chunk boundary, the
ring's wrap from rank P - 1 to rank 0 included: per micro-batch every rank sends vp activations
forward (the last rank vp - 1: its last chunk ends in the loss) and vp gradients backward (the
first rank vp - 1: its first chunk starts at the embedding), vp times plain 1F1B's for the
middle ranks. ZB-H1 sends what 1F1B sends (its weight-gradient steps are local).
Tied embeddings under pp: per step the first and last stage all-reduce the fp32 embedding
gradient shard (Megatron's embedding group), 4 V h / t bytes each, counted on the pp axis.
Data parallelism, per step (independent of the batch): all-reduce of this rank's fp32 main
gradients, 2(d-1)/d x 4 P_rank; with ZeRO-1 on NCCL a reduce-scatter of them plus an
all-gather of the updated parameters: (d-1)/d x (4 + param_bytes) P_rank (gloo has no
reduce-scatter: it all-reduces instead, `zero1_on_gloo=True`).

`python -m megacpt.parallel.volume --model-size 1393M` prints the table (README.md,
"Communication volume per step"); `--virtual-pipeline-model-parallel-size N` adds the pp
layouts interleaved.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

from megacpt.config import ModelConfig
from megacpt.params import virtual_stage_layers


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    zero1: bool = False
    #: virtual pipeline stages (model chunks) per pipeline rank: interleaved 1F1B when > 1
    vp: int = 1

    def __post_init__(self):
        if self.vp < 1 or (self.vp > 1 and self.pp == 1):
            raise ValueError(f"Layout: vp={self.vp} needs vp >= 1 and pp > 1 (got pp={self.pp})")

    @property
    def name(self) -> str:
        return (f"tp{self.tp}pp{self.pp}dp{self.dp}" + (f"vp{self.vp}" if self.vp > 1 else "")
                + ("+sp" if self.sequence_parallel else "") + ("+zero1" if self.zero1 else ""))


def rank_layers(cfg: ModelConfig, layout: Layout, pp_rank: int) -> int:
    """Transformer layers held by pipeline rank `pp_rank` (all its model chunks)."""
    return sum(len(c) for c in virtual_stage_layers(cfg.num_layers, layout.pp, layout.vp,
                                                     pp_rank))


def _ring_all_reduce(n: int) -> float:
    return 2.0 * (n - 1) / n


def _ring_gather(n: int) -> float:
    return (n - 1) / n


def stage_params(cfg: ModelConfig, layout: Layout, pp_rank: int) -> int:
    """Parameters held by one tp rank of pipeline stage `pp_rank` (its shard sizes)."""
    t, h, d = layout.tp, cfg.hidden_size, cfg.head_dim
    qkv = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * d * (h + cfg.add_qkv_bias) // t
    proj = cfg.num_attention_heads * d * h // t
    mlp = 3 * cfg.ffn_hidden_size * h // t
    n_layers = rank_layers(cfg, layout, pp_rank)
    total = n_layers * (qkv + proj + mlp + 2 * h)
    if pp_rank == 0:
        total += cfg.padded_vocab_size * h // t
    if pp_rank == layout.pp - 1:  # tied: the last stage's copy of the embedding (pp > 1)
        tied_here = cfg.tie_word_embeddings and layout.pp == 1
        total += (0 if tied_here else cfg.padded_vocab_size * h // t) + h
    return total


def step_bytes(cfg: ModelConfig, layout: Layout, pp_rank: int, micro_batch: int,
               num_microbatches: int, act_bytes: int = 2, param_bytes: int = 2,
               zero1_on_gloo: bool = False) -> dict[str, float]:
    """Bytes one rank of stage `pp_rank` sends per optimizer step on each axis."""
    t, h = layout.tp, cfg.hidden_size
    tokens = micro_batch * cfg.seq_length  # per micro-batch
    first, last = pp_rank == 0, pp_rank == layout.pp - 1
    n_layers = rank_layers(cfg, layout, pp_rank)
    out = {"tp": 0.0, "pp": 0.0, "dp": 0.0}
    if t > 1:
        act = tokens * h * act_bytes
        per_mb = 4 * n_layers * act + (act if first else 0) + (act if last else 0)
        per_mb = per_mb * _ring_all_reduce(t)
        if last:
            per_mb += 3 * tokens * 4 * _ring_all_reduce(t)
        out["tp"] = per_mb * num_microbatches
        if layout.sequence_parallel:
            norms = (2 * n_layers + (1 if last else 0)) * h * 4
            out["tp"] += norms * _ring_all_reduce(t)
    if layout.pp > 1:
        act = tokens * h * act_bytes / (t if layout.sequence_parallel else 1)
        vp = layout.vp  # messages per micro-batch: one per chunk boundary this rank sends over
        sends = (vp - 1 if last else vp) + (vp - 1 if first else vp)
        out["pp"] = sends * act * num_microbatches
        if cfg.tie_word_embeddings and (first or last):  # embedding-group grad all-reduce
            out["pp"] += _ring_all_reduce(2) * 4 * cfg.padded_vocab_size * h / t
    if layout.dp > 1:
        p = stage_params(cfg, layout, pp_rank)
        d = layout.dp
        if layout.zero1 and not zero1_on_gloo:
            out["dp"] = _ring_gather(d) * (4 + param_bytes) * p
        elif layout.zero1:
            out["dp"] = _ring_all_reduce(d) * 4 * p + _ring_gather(d) * param_bytes * p
        else:
            out["dp"] = _ring_all_reduce(d) * 4 * p
    return out


def busiest_rank(cfg: ModelConfig, layout: Layout, micro_batch: int, global_batch: int,
                 act_bytes: int = 2, param_bytes: int = 2) -> dict[str, float]:
    """Bytes per step on each axis of the rank that sends the most, plus tp and pp bytes per
    token that rank's replica processes (global_batch * seq_length / dp per step)."""
    m = global_batch // (micro_batch * layout.dp)
    per_stage = [step_bytes(cfg, layout, r, micro_batch, m, act_bytes, param_bytes)
                 for r in range(layout.pp)]
    worst = max(per_stage, key=lambda v: sum(v.values()))
    tokens = m * micro_batch * cfg.seq_length
    return {**worst, "tp_per_token": worst["tp"] / tokens, "pp_per_token": worst["pp"] / tokens}


def markdown_table(cfg: ModelConfig, layouts: list[Layout], micro_batch: int,
                   global_batch: int) -> str:
    rows = ["| layout | tp bytes/token | pp bytes/token | dp GB/step | tp GB/step | "
            "pp GB/step | total GB/step |", "|---|---|---|---|---|---|---|"]
    for lay in layouts:
        if lay.vp > 1 and cfg.num_layers % (lay.pp * lay.vp):  # unequal chunks: not a layout
            continue
        v = busiest_rank(cfg, lay, micro_batch, global_batch)
        total = v["tp"] + v["pp"] + v["dp"]
        rows.append(f"| {lay.name} | {v['tp_per_token']:,.0f} | {v['pp_per_token']:,.0f} | "
                    f"{v['dp'] / 1e9:.2f} | {v['tp'] / 1e9:.1f} | {v['pp'] / 1e9:.2f} | "
                    f"{total / 1e9:.1f} |")
    return "\n".join(rows)


DEFAULT_LAYOUTS = [Layout(dp=8), Layout(dp=8, zero1=True), Layout(tp=2, dp=4),
                   Layout(tp=2, dp=4, sequence_parallel=True), Layout(tp=8),
                   Layout(pp=2, dp=4), Layout(pp=4, dp=2), Layout(tp=2, pp=2, dp=2),
                   Layout(tp=2, pp=2, dp=4, sequence_parallel=True, zero1=True),
                   Layout(tp=8, pp=2, dp=4, sequence_parallel=True, zero1=True)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="communication volume per step by layout")
    ap.add_argument("--model-size", default="1393M")
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="default: the registered model's own (public checkpoints), else the "
                         "paper's 36152")
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--global-batch-size", type=int, default=1024)
    ap.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=1,
                    help="also list each pp layout interleaved with this many virtual stages "
                         "(where the layers split into equal chunks)")
    a = ap.parse_args(argv)
    vp = a.virtual_pipeline_model_parallel_size
    if vp < 1:
        ap.error(f"--virtual-pipeline-model-parallel-size must be >= 1, got {vp}")
    from megacpt import sizes

    vocab = a.vocab_size or sizes.get_size(a.model_size).vocab_size or sizes.PAPER_VOCAB_SIZE
    cfg = ModelConfig.from_size(a.model_size, vocab_size=vocab, seq_length=a.seq_length)
    layouts = list(DEFAULT_LAYOUTS)
    if vp > 1:
        layouts += [replace(lay, vp=vp) for lay in DEFAULT_LAYOUTS if lay.pp > 1]
    print(markdown_table(cfg, layouts, a.micro_batch_size, a.global_batch_size))


if __name__ == "__main__":
    main()
