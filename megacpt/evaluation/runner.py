"""A checkpoint loaded for inference in any (tp, pp, dp) layout, and batched log-likelihoods.

`EvalModel.load(path, ctx)` builds this rank's stage and tp shard of the model from any
checkpoint `--init-from` reads (ours in any layout, HuggingFace, Megatron) and its tokenizer.
`EvalModel.logits(tokens [b, s])` runs one forward through the pipeline: the first stage
embeds, each stage sends its hidden states `[s, b, h]` to the next (plain point-to-point,
no backward), the last stage returns logits `[b, s, V]` (gathered over tp); other stages
return None.

`loglikelihoods(model, requests, batch_size)` scores `(context_ids, continuation_ids)`
requests as lm-eval's `HFLM._loglikelihood_tokens` does: input `(ctx + cont)[-(L+1):][:-1]`
(left truncation to the model's length L), log-softmax in fp32 over the continuation's
positions, `(sum of log-probs, every continuation token is the argmax)`. With pp = 1 the
choices of an item share its context, encoded once (`shared_context`); otherwise requests
are sorted by length (longest first), cut into batches, right-padded. Data-parallel rank r
runs batches r, r + dp, ... and the results are gathered, so every rank returns all of them.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megacpt.evaluation.tasks import EvalInputError
from megacpt.parallel.context import ParallelContext

log = logging.getLogger(__name__)


class EvalModel:
    """This rank's part of a model for inference, with its tokenizer and context."""

    def __init__(self, model, ctx: ParallelContext, tokenizer, path: str):
        self.model, self.ctx, self.tokenizer, self.path = model, ctx, tokenizer, path
        self.cfg = model.cfg
        self.max_length = int(self.cfg.max_position_embeddings)

    @classmethod
    def load(cls, path: str, ctx: ParallelContext | None = None, tokenizer_model: str | None = None,
             dtype: torch.dtype | None = None, attention_backend: str | None = None):
        """Load `path` (any format/layout) into `ctx`'s layout; a clear error when the
        checkpoint or tokenizer is missing."""
        from megacpt.checkpoint import CheckpointError, load_weights
        from megacpt.checkpoint.registry import open_source
        from megacpt.data.tokenizer import load_tokenizer
        from megacpt.model.llama import LlamaModel

        ctx = ctx or ParallelContext.single()
        try:
            with open_source(path) as src:
                mcfg, src_dtype, tok_path = src.cfg.model, src.dtype, src.tokenizer_path
        except CheckpointError as e:
            raise EvalInputError(f"--load {path}: {e}") from None
        tok_path = tokenizer_model or tok_path
        if not tok_path:
            raise EvalInputError(f"--load {path}: the checkpoint has no tokenizer (tokenizer.model"
                                 f" or tokenizer.json); pass --tokenizer-model")
        try:
            tokenizer = load_tokenizer(tok_path)
        except (OSError, ValueError, ImportError) as e:
            raise EvalInputError(f"--tokenizer-model: {e}") from None
        if tokenizer.vocab_size > mcfg.vocab_size:
            raise EvalInputError(f"{tok_path}: the tokenizer has {tokenizer.vocab_size} tokens "
                                 f"but the model {path} has vocab_size {mcfg.vocab_size}; use "
                                 f"the tokenizer it was trained with")
        mcfg.recompute_activations, mcfg.compile = False, False
        if attention_backend:
            mcfg.attention_backend = attention_backend
        model = LlamaModel(mcfg, ctx, dtype=dtype or src_dtype, device=ctx.device, seed=None)
        try:
            load_weights(path, model, ctx)
        except CheckpointError as e:
            raise EvalInputError(f"--load {path}: {e}") from None
        model.eval()
        return cls(model, ctx, tokenizer, path)

    # ----- one forward through the pipeline -----
    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """tokens [b, s] (same on every rank of this pipeline) -> logits [b, s, V] on the
        last stage, None elsewhere."""
        ctx, model = self.ctx, self.model
        tokens = tokens.to(ctx.device)
        if ctx.pp == 1:
            return model(tokens).float()
        b, s = tokens.shape
        if ctx.is_first_stage:
            x = tokens
        else:
            x = torch.empty(s, b, self.cfg.hidden_size, dtype=_param_dtype(model),
                            device=ctx.device)
            dist.recv(x, src=ctx.prev_stage_rank, group=ctx.pp_group)
        y = model(x)
        if not ctx.is_last_stage:
            dist.send(y.contiguous(), dst=ctx.next_stage_rank, group=ctx.pp_group)
            return None
        return y.float()


def _param_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def truncate(ctx_ids: list[int], cont_ids: list[int], max_length: int) -> list[int]:
    """lm-eval's model input: (ctx + cont)[-(max_length + 1):][:-1]."""
    return (ctx_ids + cont_ids)[-(max_length + 1):][:-1]


def count_truncated(requests, max_length: int) -> int:
    return sum(len(c) + len(t) > max_length + 1 for c, t in requests)


def _batches(requests, max_length: int, batch_size: int) -> list[list[int]]:
    order = sorted(range(len(requests)),
                   key=lambda i: (-len(truncate(*requests[i], max_length)), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _score_batch(model: EvalModel, requests, idx: list[int], pad_id: int):
    """[(ll, greedy)] of the requests `idx` on the last stage, None on other stages."""
    L = model.max_length
    inps = [truncate(*requests[i], L) for i in idx]
    width = max(len(x) for x in inps)
    tokens = torch.full((len(inps), width), pad_id, dtype=torch.long)
    for r, x in enumerate(inps):
        tokens[r, : len(x)] = torch.tensor(x, dtype=torch.long)
    logits = model.logits(tokens)  # [b, s, V]
    if logits is None:
        return None
    out = []
    for r, i in enumerate(idx):
        cont = requests[i][1]
        n, end = len(cont), len(inps[r])
        lp = F.log_softmax(logits[r, end - n: end], dim=-1)  # [n, V]
        want = torch.tensor(cont, dtype=torch.long, device=lp.device)
        greedy = bool((lp.argmax(-1) == want).all())
        out.append((float(lp.gather(1, want[:, None]).sum()), greedy))
    return out


def loglikelihoods(model: EvalModel, requests: list[tuple[list[int], list[int]]],
                   batch_size: int = 16, progress: bool = True, desc: str = "scoring",
                   share_context: bool = True) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) per request, in request order, on every rank.

    `share_context` (where `shared_context.applies`: pp = 1, no sequence parallelism): the
    choices of an item are scored from its context encoded once; otherwise (or False) each
    request is its own padded sequence. Both give lm-eval's numbers."""
    from megacpt.evaluation import shared_context

    ctx, L = model.ctx, model.max_length
    for i, (_, cont) in enumerate(requests):
        if not cont:
            raise EvalInputError(f"request {i}: the continuation has no tokens")
        if len(cont) > L:
            raise EvalInputError(f"request {i}: the continuation has {len(cont)} tokens, more "
                                 f"than the model's length {L}")
    pad = model.tokenizer.pad
    results: dict[int, tuple[float, bool]] = {}
    bar = _Progress(len(requests), desc, progress and ctx.rank == 0, ctx.dp)
    if share_context and shared_context.applies(ctx):
        inputs = [truncate(c, x, L) for c, x in requests]
        batches = shared_context.batches(shared_context.groups(requests, inputs), batch_size)
        for batch in batches[ctx.dp_rank::ctx.dp]:
            results.update(shared_context.score_batch(model, requests, inputs, batch, pad))
            bar.update(sum(len(idx) for idx, _ in batch))
    else:
        for idx in _batches(requests, L, batch_size)[ctx.dp_rank::ctx.dp]:
            scored = _score_batch(model, requests, idx, pad)
            if scored is not None:
                results.update(zip(idx, scored))
            bar.update(len(idx))
    bar.close()
    results = _share(results, ctx)
    return [results[i] for i in range(len(requests))]


def _share(results: dict, ctx: ParallelContext) -> dict:
    """Last stage -> the whole pipeline, then every dp replica's part -> all ranks."""
    if ctx.pp > 1:
        src = ctx.global_rank(ctx.tp_rank, ctx.dp_rank, ctx.pp - 1)
        box = [results]
        dist.broadcast_object_list(box, src=src, group=ctx.pp_group)
        results = box[0]
    if ctx.dp > 1:
        parts = [None] * ctx.dp
        dist.all_gather_object(parts, results, group=ctx.dp_group)
        results = {k: v for part in parts for k, v in part.items()}
    return results


class _Progress:
    """tqdm bar (items/s) on rank 0 counting all dp replicas' items (this one's times dp)."""

    def __init__(self, total: int, desc: str, enabled: bool, scale: int):
        self.bar, self.scale, self.t0, self.n, self.total = None, scale, time.time(), 0, total
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        n = min(n * self.scale, self.total - self.n)
        self.n += n
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            dt = max(time.time() - self.t0, 1e-9)
            log.info("scored %d requests in %.1fs (%.1f requests/s)", self.total, dt,
                     self.total / dt)

    @property
    def elapsed(self) -> float:
        return time.time() - self.t0
