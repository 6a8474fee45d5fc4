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
from _harness import tiny_model_config, tiny_optim_config

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
    from megacpt.checkpoint.registry import open_source
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


#: resharding on --load: saved layout -> {target: (tp, pp, ZeRO-1)}, all on 4 ranks
RESHARD_CASES = {
    "tp2dp2_zero1": ((2, 1, True), {"tp1pp1": (1, 1, False), "tp1pp2": (1, 2, False),
                                    "tp2pp2": (2, 2, False), "dp4_zero1": (1, 1, True)}),
    "pp2dp2": ((1, 2, False), {"tp2": (2, 1, False)}),
}
#: saved layouts whose run also uses --async-save (4 ranks writing in background threads)
ASYNC_SOURCES = ("pp2dp2",)


def reshard_worker(tmp: str, steps: int, k: int) -> dict:
    """For each saved layout of RESHARD_CASES: the trainer runs `steps` steps saving at step
    k (the reference losses), then each target layout resumes from that step-k checkpoint
    with a plain `--load` (resharded on load) and runs on to `steps`."""
    out = {}
    for src, ((tp, pp, zero1), targets) in RESHARD_CASES.items():
        d = os.path.join(tmp, src)
        z = ["--use-distributed-optimizer"] if zero1 else []
        z += ["--async-save"] if src in ASYNC_SOURCES else []
        out[src] = _train(tp, pp, steps, ["--save", d, "--save-interval", str(k)] + z)
        for name, (ttp, tpp, tz) in targets.items():
            load = ["--load", os.path.join(d, f"iter_{k:07d}")]
            out[f"{src}->{name}"] = _train(ttp, tpp, steps, load + (
                ["--use-distributed-optimizer"] if tz else []))
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


# ----- Megatron-Core torch_dist checkpoints (run in a fresh interpreter, see below) -----

MCORE_SHAPE = dict(num_layers=3, hidden_size=32, ffn_hidden_size=64, num_attention_heads=8,
                   num_query_groups=4, vocab_size=200, padded_vocab_size=384, seq_length=16)


def mcore_args(s: dict = MCORE_SHAPE, **extra):
    """The args Megatron-LM's save_checkpoint stores (the fields an importer reads)."""
    import argparse

    return argparse.Namespace(
        **s, group_query_attention=True, kv_channels=s["hidden_size"] // s["num_attention_heads"],
        max_position_embeddings=s["seq_length"], make_vocab_size_divisible_by=128,
        normalization="RMSNorm", swiglu=True, untie_embeddings_and_output_weights=True,
        add_bias_linear=False, add_qkv_bias=False, position_embedding_type="rope",
        rotary_base=10000, rotary_percent=1.0, rotary_interleaved=False, norm_epsilon=1e-5,
        apply_layernorm_1p=False, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        ckpt_format="torch_dist", tokenizer_model=None, **extra)


def make_mcore_dist_checkpoint(root: str, tokens_path: str) -> None:
    """A megatron-core GPTModel (local spec: RMSNorm, SwiGLU, GQA, RoPE, untied, no biases)
    with random weights, saved as Megatron-LM saves torch_dist (root/iter_0000010 + tracker;
    common.pt gets args/iteration/checkpoint_version, plus an RNG ShardedObject and an
    optimizer-like tensor the importer must skip); writes {"tokens", "logits"} of its own
    forward to `tokens_path`. Must run as __main__ of a fresh process: gloo world size 1."""
    import torch.nn.functional as F
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from megatron.core.transformer.transformer_config import TransformerConfig

    # megatron-core's torch_dist writer assumes CUDA and psutil; on a CPU-only torch these
    # three calls are no-ops for what is written (CPU tensors, memory logging only)
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    filesystem_async._process_memory = lambda: 0
    dist.init_process_group("gloo", init_method="file://" + os.path.join(root + ".store"),
                            rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)  # no CUDA RNG: no-op
    s = MCORE_SHAPE
    cfg = TransformerConfig(
        num_layers=s["num_layers"], hidden_size=s["hidden_size"],
        ffn_hidden_size=s["ffn_hidden_size"], num_attention_heads=s["num_attention_heads"],
        num_query_groups=s["num_query_groups"], normalization="RMSNorm", layernorm_epsilon=1e-5,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        bias_activation_fusion=False, use_cpu_initialization=True, persist_layer_norm=False)
    model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=s["padded_vocab_size"],
                     max_sequence_length=s["seq_length"], position_embedding_type="rope",
                     share_embeddings_and_output_weights=False).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():  # norms near 1, everything else N(0, 0.1)
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if p.dim() == 1 else 0.1 * noise)
        tokens = torch.randint(0, s["vocab_size"], (2, 11), generator=g)
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        sq = tokens.shape[1]
        mask = torch.ones(sq, sq).triu(1).bool()[None, None]  # [1, 1, s, s], True = masked
        logits = model(tokens, pos, mask)  # [b, s, V']
    torch.save({"tokens": tokens, "logits": logits}, tokens_path)
    it = os.path.join(root, "iter_0000010")
    os.makedirs(it)
    from megatron.core.enums import ModelType

    args = mcore_args(s, model_type=ModelType.encoder_or_decoder, params_dtype=torch.float32)
    state = {"args": args, "checkpoint_version": 3.0, "iteration": 10,
             "model": model.sharded_state_dict(),
             "rng_state": ShardedObject("rng_state", {"seed": 1}, (1,), (0,), replica_id=0),
             "optimizer": ShardedTensor.from_rank_offsets(
                 "optimizer.state.exp_avg.output_layer.weight",
                 torch.zeros(s["padded_vocab_size"], s["hidden_size"])),
             "opt_param_scheduler": {"num_steps": 80}}
    dist_checkpointing.save(state, it)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("10")
    dist.destroy_process_group()


# ----- what a resharding load reads -----

def reshard_read_worker(ckpt: str, tp: int) -> dict:
    """Load `ckpt` (any layout) into a fresh tp-way model and optimizer; this rank's tensor
    bytes read and the size of its part (parameters + Adam moments, fp32)."""
    cfg = tiny_config(num_layers=2)
    ctx, model, opt = build(cfg, tp, 1, seed=99)
    stats: dict = {}
    from megacpt.checkpoint import load_checkpoint

    load_checkpoint(ckpt, model, opt, cfg, ctx, stats=stats)
    part = sum(p.numel() * p.element_size() for p in model.parameters()) * 3
    return {"bytes_read": stats["bytes_read"], "part": part}
