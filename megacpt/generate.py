"""Text generation from any checkpoint: greedy or temperature / top-k / top-p sampling with a
KV cache (the prompt is encoded once, then one new position per step), one process or tp
under torchrun.

    python -m megacpt.generate --load ckpt/cpt --prompt "今天天气" --max-new-tokens 40
    python -m megacpt.generate --load hf_dir --prompt-file prompts.txt --temperature 0.8 \\
        --top-p 0.95 --seed 1 --output out.jsonl
    torchrun --nproc-per-node 2 -m megacpt.generate --load ckpt --tensor-model-parallel-size 2 ...

Prompts are encoded as HuggingFace's LLaMA tokenizer does by default (BOS + pieces), so
greedy output equals `transformers`' `generate(do_sample=False)` on the HF export token for
token. Generation stops at `</s>` (EOS), at `--max-new-tokens`, or (for lm-eval's
generate_until) at a stop string. Prompts of equal token length are batched together (no
padding, so batching changes nothing). `--prompt-file` has one prompt per line, or JSON
lines with a "prompt" field; `--output` writes JSON lines {"prompt", "completion",
"tokens"}.

The cached forward reuses the model's own layers (projections, norms, MLP, rotary QKV
split) and adds only the attention over cached keys/values, `[b, S, groups, d]` per layer.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch
import torch.nn.functional as F

from megacpt.evaluation.tasks import EvalInputError

log = logging.getLogger("megacpt.generate")
EXIT_OK, EXIT_BAD_INPUT = 0, 2


class KVCache:
    """Keys/values of every layer so far: k, v [b, S, groups_local, d]."""

    def __init__(self):
        self.k: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.length = 0

    def append(self, name: str, k: torch.Tensor, v: torch.Tensor):
        if name in self.k:
            k, v = torch.cat([self.k[name], k], 1), torch.cat([self.v[name], v], 1)
        self.k[name], self.v[name] = k, v
        return k, v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int) -> torch.Tensor:
    """q [b, n, nh, d] at positions pos.., k/v [b, S, ng, d] at 0..S-1 -> [b, n, nh, d]."""
    n, S, nh = q.shape[1], k.shape[1], q.shape[2]
    rep = nh // k.shape[2]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [b, h, *, d]
    mask = None
    if n > 1:  # query i (position pos + i) sees keys 0..pos + i
        mask = torch.arange(S, device=q.device)[None, :] <= (
            pos + torch.arange(n, device=q.device))[:, None]  # [n, S]
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)


@torch.no_grad()
def forward_cached(model, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """tokens [b, n] at positions cache.length.. -> logits [b, n, V] (fp32); fills the cache.
    `model` is a whole-model LlamaModel stage (pp = 1; tp any, no sequence parallelism)."""
    from megacpt.parallel import comm

    pos, n = cache.length, tokens.shape[1]
    if pos + n > model.rope_cos.shape[0]:
        raise EvalInputError(f"generation reached {pos + n} tokens, more than the model's "
                             f"max_position_embeddings {model.rope_cos.shape[0]}")
    cos, sin = model.rope_cos[pos: pos + n], model.rope_sin[pos: pos + n]
    x = model.embedding(tokens)  # [n, b, h]
    for name, layer in model.layers.items():
        att = layer.attention
        qkv = att.qkv(layer.input_norm(x))  # [n, b, (nh_l + 2 ng_l) d]
        q, k, v = att._qkv_rope(qkv, cos, sin, att.groups, att.per_group, att.head_dim)
        k, v = cache.append(name, k, v)  # [b, S, ng_l, d]
        out = _attend(q, k, v, pos)  # [b, n, nh_l, d]
        x = x + att.proj(out.transpose(0, 1).reshape(n, tokens.shape[0], -1))
        x = x + layer.mlp(layer.post_attention_norm(x))
    cache.length += n
    logits = comm.gather_from_tp(model.output(model.final_norm(x), model.output_weight),
                                 model.ctx.tp_group)  # (tied: the embedding's weight)
    return logits.transpose(0, 1)[..., : model.cfg.vocab_size].float()  # [b, n, V]


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                gen: torch.Generator | None) -> torch.Tensor:
    """logits [b, V] -> next ids [b]: argmax when temperature == 0, else sampled after
    temperature, top-k and top-p (nucleus, keeping at least one token) filtering."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_l, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_l.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # tokens after the nucleus
        logits = logits.scatter(-1, idx, sorted_l.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, stop=None) -> list[list[int]]:
    """New token ids per prompt (EOS excluded). `stop(new_ids) -> bool` ends one sequence
    early (e.g. on a stop string). Every tp rank gets the same result (same seed)."""
    if model.ctx.pp > 1:
        raise EvalInputError("generation runs with --pipeline-model-parallel-size 1 (any "
                             "checkpoint layout loads into it; tp is fine)")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: list[list[int] | None] = [None] * len(prompts)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        if not p:
            raise EvalInputError(f"prompt {i} has no tokens")
        groups.setdefault(len(p), []).append(i)
    device = model.ctx.device
    for _, idx in sorted(groups.items()):
        cache = KVCache()
        tokens = torch.tensor([prompts[i] for i in idx], dtype=torch.long, device=device)
        new = [[] for _ in idx]
        done = [False] * len(idx)
        logits = forward_cached(model, tokens, cache)[:, -1]  # [b, V]
        for _ in range(max_new_tokens):
            nxt = sample_next(logits.cpu(), temperature, top_k, top_p, gen)  # [b]
            for r, t in enumerate(nxt.tolist()):
                if done[r]:
                    continue
                if eos_id is not None and t == eos_id:
                    done[r] = True
                    continue
                new[r].append(t)
                if stop is not None and stop(new[r]):
                    done[r] = True
            if all(done) or cache.length >= model.rope_cos.shape[0]:
                break
            logits = forward_cached(model, nxt[:, None].to(device), cache)[:, -1]
        for r, i in enumerate(idx):
            out[i] = new[r]
    return out


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            lines = open(args.prompt_file, encoding="utf-8").read().splitlines()
        except OSError as e:
            raise EvalInputError(f"{args.prompt_file}: unreadable ({e.strerror})") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EvalInputError(f"{args.prompt_file}:{n}: malformed JSON ({e.msg})") \
                        from None
                if not isinstance(row.get("prompt"), str):
                    raise EvalInputError(f"{args.prompt_file}:{n}: field 'prompt' must be a "
                                         f"string")
                prompts.append(row["prompt"])
            else:
                prompts.append(line)
    if not prompts:
        raise EvalInputError("no prompts: give --prompt TEXT or --prompt-file FILE")
    return prompts


def get_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="megacpt.generate", description=__doc__.split("\n")[0])
    ap.add_argument("--load", required=True, help="checkpoint: ours (any layout), HF or Megatron")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    ap.add_argument("--prompt-file", help="one prompt per line, or JSON lines with 'prompt'")
    ap.add_argument("--tokenizer-model", help="SentencePiece .model, tokenizer.json or HF directory "
                    "(default: the checkpoint's)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tensor-model-parallel-size", type=int, default=1)
    ap.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--output", help="write JSON lines {prompt, completion, tokens}")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1 or args.top_k < 0 or not 0 < args.top_p <= 1 \
            or args.temperature < 0:
        ap.error("need --max-new-tokens >= 1, --top-k >= 0, 0 < --top-p <= 1, --temperature >= 0")
    return args


def main(argv=None) -> int:
    from megacpt.config import ConfigError
    from megacpt.evaluation.runner import EvalModel
    from megacpt.evaluation.tasks import PairEncoder
    from megacpt.parallel.context import ParallelContext, init_distributed
    from megacpt.train import setup_logging

    setup_logging()
    args = get_args(argv)
    try:
        prompts = read_prompts(args)
        init_distributed()
        ctx = ParallelContext.build(args.tensor_model_parallel_size, 1, device=args.device)
        model = EvalModel.load(args.load, ctx, args.tokenizer_model,
                               torch.bfloat16 if args.bf16 else None)
        enc = PairEncoder(model.tokenizer)
        t0 = time.time()
        ids = generate_ids(model.model, [enc.encode(p) for p in prompts], args.max_new_tokens,
                           model.tokenizer.eod, args.temperature, args.top_k, args.top_p,
                           args.seed)
    except (EvalInputError, ConfigError) as e:
        log.error("bad input: %s", e)
        return EXIT_BAD_INPUT
    dt = time.time() - t0
    if ctx.rank == 0:
        rows = [{"prompt": p, "completion": model.tokenizer.detokenize(t), "tokens": t}
                for p, t in zip(prompts, ids)]
        for r in rows:
            print(f">>> {r['prompt']}\n{r['completion']}\n", flush=True)
        n = sum(len(t) for t in ids)
        log.info("generated %d tokens in %.1fs (%.1f tokens/s)", n, dt, n / max(dt, 1e-9))
        if args.output:
            with open(args.output, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
