"""Bits per byte of a validation set: loss per token (nats) -> bits per UTF-8 byte of text.

    bpb = loss / ln 2 / (bytes / tokens)

where bytes are the text bytes the set's label tokens stand for
(the tokenizer's `token_bytes`: SentencePiece byte-fallback pieces 1, control pieces such as
</s> 0, "\u2581" one space, so a document's dummy-prefix space counts one byte; HF byte-level
BPE pieces the bytes they stand for, special tokens 0) summed over the whole
fixed validation set (every data-parallel rank's share). Unlike loss per token it does not
depend on the vocabulary, so models with different or extended tokenizers compare.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megacpt.parallel.context import ParallelContext


def bytes_per_token(microbatches: list[dict], token_bytes: torch.Tensor,
                    ctx: ParallelContext) -> float:
    """Mean UTF-8 bytes per label token over all dp ranks' validation micro-batches."""
    table = token_bytes.to(ctx.device)
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # [bytes, tokens]
    for mb in microbatches:
        labels = mb["labels"].clamp(0, table.numel() - 1)
        totals[0] += table[labels].sum()
        totals[1] += labels.numel()
    if ctx.dp > 1:
        dist.all_reduce(totals, group=ctx.dp_group)
    return float(totals[0] / totals[1].clamp(min=1))


def bits_per_byte(loss: float, bytes_per_tok: float | None) -> float | None:
    if not bytes_per_tok or not math.isfinite(loss):
        return None
    return loss / math.log(2) / bytes_per_tok
