"""Scoring the choices of an item from its context encoded once (KV cache).

A multiple-choice item sends one request per choice, all with the same context. lm-eval's
input for a request is `(ctx + cont)[-(L+1):][:-1]` where `ctx` is the context's own encoding
(`PairEncoder.pair`: the continuation's tokens are what the whole text adds after it, so the
context tokens are the same for every choice); left truncation can shift a long item's
inputs differently per choice. So requests are grouped by identical context tokens and each
group shares the longest prefix that really is identical across its inputs, up to the first
scored position of every choice (`shared_length`): that prefix runs once, its keys and values
(`megacpt.generate.KVCache`) are copied to each choice's row, and the choices' remaining
tokens run from that cache, batched (one forward for the prefixes of up to `batch_size`
requests' items, one for their continuations). The log-likelihoods are lm-eval's: the same
positions, log-softmax in fp32.

Applies to one pipeline stage (pp = 1) without sequence parallelism, any tp and dp
(`applies`); `runner.loglikelihoods` scores other layouts one padded sequence per request.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megacpt.generate import KVCache, forward_cached


def applies(ctx) -> bool:
    """The KV-cache forward covers this layout (whole model on one stage, no SP)."""
    return ctx.pp == 1 and not ctx.sequence_parallel


def _lcp(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for j in range(n):
        if any(s[j] != first[j] for s in seqs[1:]):
            return j
    return n


def shared_length(inps: list[list[int]], conts: list[list[int]]) -> int:
    """Tokens every input starts with, before the first scored position of any of them
    (the logit at position len(inp) - len(cont) predicts the continuation's first token)."""
    first_scored = min(len(x) - len(c) for x, c in zip(inps, conts))
    return min(first_scored, _lcp(inps))


def groups(requests, inputs: list[list[int]]) -> list[tuple[list[int], int]]:
    """[(request indices with the same context tokens, their shared length)], longest shared
    prefix first (then longest input), so a batch's items have similar prefix lengths."""
    by_ctx: dict[tuple, list[int]] = {}
    for i, (ctx_ids, _) in enumerate(requests):
        by_ctx.setdefault(tuple(ctx_ids), []).append(i)
    out = [(idx, shared_length([inputs[i] for i in idx], [requests[i][1] for i in idx]))
           for idx in by_ctx.values()]
    out.sort(key=lambda g: (-g[1], -max(len(inputs[i]) for i in g[0]), g[0][0]))
    return out


def batches(gs: list[tuple[list[int], int]], batch_size: int) -> list[list[tuple[list[int], int]]]:
    """Whole groups per batch, up to batch_size requests; a larger group (e.g. every request
    of an empty-context task) is cut into pieces of batch_size, each still sharing its prefix."""
    pieces = [(idx[k:k + batch_size], shared) for idx, shared in gs
              for k in range(0, len(idx), batch_size)]
    out, cur, n = [], [], 0
    for g in pieces:
        if cur and n + len(g[0]) > batch_size:
            out.append(cur)
            cur, n = [], 0
        cur.append(g)
        n += len(g[0])
    return out + ([cur] if cur else [])


@torch.no_grad()
def score_batch(model, requests, inputs: list[list[int]], batch, pad_id: int):
    """{request index: (ll, greedy)} for a batch of groups: their prefixes (cut to the
    batch's shortest shared length p) in one cached forward [G, p], the cache rows copied to
    each request, then every request's remaining tokens in one forward [R, w] from it."""
    net, device = model.model, model.ctx.device
    p = min(shared for _, shared in batch)
    rows = [(g, i) for g, (idx, _) in enumerate(batch) for i in idx]
    cache = KVCache()
    if p:
        prefix = torch.tensor([inputs[idx[0]][:p] for idx, _ in batch], dtype=torch.long)
        forward_cached(net, prefix.to(device), cache)  # [G, p]: fills the cache
        sel = torch.tensor([g for g, _ in rows], device=device)
        cache.k = {n: t.index_select(0, sel) for n, t in cache.k.items()}  # [R, p, ng, d]
        cache.v = {n: t.index_select(0, sel) for n, t in cache.v.items()}
    width = max(len(inputs[i]) for _, i in rows) - p
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for r, (_, i) in enumerate(rows):
        rest = inputs[i][p:]
        tokens[r, : len(rest)] = torch.tensor(rest, dtype=torch.long)
    logits = forward_cached(net, tokens.to(device), cache)  # [R, w, V] fp32
    out = {}
    for r, (_, i) in enumerate(rows):
        cont = requests[i][1]
        n, end = len(cont), len(inputs[i]) - p
        lp = F.log_softmax(logits[r, end - n: end], dim=-1)  # [n, V]
        want = torch.tensor(cont, dtype=torch.long, device=lp.device)
        out[i] = (float(lp.gather(1, want[:, None]).sum()), bool((lp.argmax(-1) == want).all()))
    return out
