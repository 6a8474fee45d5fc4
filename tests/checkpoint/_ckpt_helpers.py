"""Helpers of the checkpoint tests: tiny configs, a training loop, tokenizers, and the
multi-process worker of the layout-conversion resume test (module-level so spawn can pickle
it)."""
from __future__ import annotations

import json
import os
import random

import torch
import torch.distributed as dist

from megacpt.config import Config
from megacpt.testing import tiny_model_config, tiny_optim_config

MBS = 2


def tiny_config(**model_overrides) -> Config:
    """5 layers, GQA 8 heads / 4 groups, vocab 200 padded to 256: every tested layout divides."""
    return Config(model=tiny_model_config(**model_overrides), optim=tiny_optim_config())


def run_steps(model, opt, ctx, batches, lr) -> list[float]:
    from megacpt.parallel.schedule import forward_backward, split_global_batch

    losses = []
    for tokens, labels in batches:
        opt.zero_grad()
        losses.append(forward_backward(model, split_global_batch(tokens, labels, MBS, ctx), ctx))
        _, applied = opt.step(lr)
        assert applied
    return losses


def build(cfg: Config, tp: int, pp: int, zero1: bool = False, seed: int | None = 1234,
          dtype=torch.float32):
    from megacpt.model.llama import LlamaModel
    from megacpt.parallel.context import ParallelContext
    from megacpt.parallel.optimizer import build_optimizer

    ctx = ParallelContext.build(tp=tp, pp=pp, device="cpu")
    model = LlamaModel(cfg.model, ctx, dtype=dtype, device="cpu", seed=seed)
    opt = build_optimizer(model, cfg.optim, ctx, use_distributed_optimizer=zero1)
    return ctx, model, opt


def fake_state(step: int) -> dict:
    return {"scheduler": {"num_steps": step, "max_lr": 1e-2},
            "data": {"consumed_samples_per_dataset": {"zh": 8 * step}},
            "counters": {"consumed_tokens": 128 * step}, "rng": {"torch": torch.get_rng_state()}}


def hf_loss_tp2pp2(hf_dir: str, tokens, labels) -> float:
    """Mean token loss of a HuggingFace directory's weights run in layout tp2pp2."""
    from megacpt.checkpoint import load_weights
    from megacpt.checkpoint.reader import open_source
    from megacpt.model.llama import LlamaModel
    from megacpt.parallel.context import ParallelContext
    from megacpt.parallel.schedule import forward_backward, split_global_batch

    with open_source(hf_dir) as src:
        mcfg = src.cfg.model
    mcfg.attention_backend, mcfg.use_kernels = "eager", False
    ctx = ParallelContext.build(tp=2, pp=2, device="cpu")
    model = LlamaModel(mcfg, ctx, seed=None)
    load_weights(hf_dir, model, ctx)
    with torch.no_grad():
        return forward_backward(model, split_global_batch(tokens, labels, MBS, ctx), ctx,
                                forward_only=True)


TRAIN_FLAGS = ["--num-layers", "5", "--hidden-size", "32", "--ffn-hidden-size", "64",
               "--num-attention-heads", "8", "--num-query-groups", "4", "--vocab-size", "200",
               "--seq-length", "16", "--mock-data", "--micro-batch-size", "2",
               "--global-batch-size", "8", "--lr", "1e-2", "--min-lr", "1e-3",
               "--lr-warmup-iters", "1", "--lr-decay-style", "cosine", "--clip-grad", "0.5",
               "--attention-backend", "eager", "--no-use-kernels", "--eval-interval", "1000",
               "--eval-iters", "4", "--log-interval", "1000", "--num-workers", "0"]
RESUME_LAYOUTS = {"tp1pp1": (1, 1, True), "tp4pp1": (4, 1, False), "tp1pp4": (1, 4, False)}


def _train(tp: int, pp: int, iters: int, extra: list[str]) -> dict:
    from megacpt.arguments import parse_args
    from megacpt.training.loop import train

    cfg, opts = parse_args(TRAIN_FLAGS + ["--tensor-model-parallel-size", str(tp),
                                          "--pipeline-model-parallel-size", str(pp),
                                          "--train-iters", str(iters)] + extra)
    return train(cfg, opts).losses


def resume_worker(tmp: str, steps: int, k: int, hf: tuple) -> dict:
    """The trainer at tp2pp2 saves at step k and runs on to `steps` (reference). Rank 0
    converts the step-k checkpoint to tp1pp1 / tp4pp1 / tp1pp4; each is resumed with --load
    (tp1pp1 as dp4 with ZeRO-1, which saves again at the end). Also: the loss of a HuggingFace
    model (hf = (dir, tokens, labels)) imported into tp2pp2."""
    from megacpt.checkpoint.convert import convert_checkpoint

    out = {"hf_loss": hf_loss_tp2pp2(*hf)}
    src = os.path.join(tmp, "tp2pp2")
    out["ref"] = _train(2, 2, steps, ["--save", src, "--save-interval", str(k)])
    if dist.get_rank() == 0:
        for name, (tp, pp, _) in RESUME_LAYOUTS.items():
            convert_checkpoint(os.path.join(src, f"iter_{k:07d}"), os.path.join(tmp, name),
                               tp, pp, progress=False)
    dist.barrier()
    for name, (tp, pp, zero1) in RESUME_LAYOUTS.items():
        d = os.path.join(tmp, name)
        extra = ["--load", d, "--save", d] + (["--use-distributed-optimizer"] if zero1 else [])
        out[name] = _train(tp, pp, steps, extra)
    return out


# ----- tokenizers and corpora for the vocabulary tests -----

SOURCE_WORDS = ["the", "house", "of", "river", "green", "water", "stone", "light", "people",
                "time", "over", "under", "quick", "brown", "fox", "jumps"]
SYLLABLES = ["ka", "lo", "mi", "zu", "ře", "ša", "ně", "vo", "tý", "ží"]


def make_corpora(d: str, vocab: int = 330) -> dict:
    """A BPE source tokenizer (project settings, byte fallback) and a target-language corpus
    of words the source tokenizer splits into characters."""
    import sentencepiece as spm

    rnd = random.Random(0)
    tgt_words = ["".join(rnd.choice(SYLLABLES) for _ in range(rnd.randint(2, 4)))
                 for _ in range(40)]
    src = [" ".join(rnd.choice(SOURCE_WORDS) for _ in range(12)) for _ in range(300)]
    tgt = [" ".join(rnd.choice(tgt_words) for _ in range(12)) for _ in range(200)]
    corpus = os.path.join(d, "target.jsonl")
    with open(corpus, "w") as f:
        for t in tgt:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    prefix = os.path.join(d, "source")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(src), model_prefix=prefix, vocab_size=vocab, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        minloglevel=2, num_threads=1)
    return {"tokenizer": prefix + ".model", "corpus": corpus, "source_texts": src,
            "target_texts": tgt}


def failing_save_worker(tmp: str) -> dict:
    """dp2: save iteration 1, then save iteration 2 with rank 1's RNG file write failing.
    Returns what this rank raised and (after a barrier) the iteration the tracker names and
    the one that loads."""
    from megacpt.checkpoint import checkpointing, load_checkpoint, save_checkpoint
    from megacpt.checkpoint.format import read_tracker

    cfg = tiny_config(num_layers=2)
    ctx, model, opt = build(cfg, 1, 1)
    save_checkpoint(tmp, 1, model, opt, cfg, ctx, fake_state(1))
    if dist.get_rank() == 1:
        def disk_full(*args, **kwargs):
            raise OSError("No space left on device")
        checkpointing.torch.save = disk_full  # only this spawned process is affected
    try:
        save_checkpoint(tmp, 2, model, opt, cfg, ctx, fake_state(2))
        raised = None
    except Exception as e:  # noqa: BLE001
        raised = f"{type(e).__name__}: {e}"
    dist.barrier()
    it, _ = load_checkpoint(tmp, model, opt, cfg, ctx)
    return {"raised": raised, "tracker": read_tracker(tmp), "loaded": it}
