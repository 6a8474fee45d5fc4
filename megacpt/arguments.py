"""Command line of `python -m megacpt.train`: Megatron's flag names -> a resolved `Config`.

Flags not given take the defaults of `megacpt.config` (the paper's LR recipe: cosine from
2e-4, 5% warm-up). The model shape comes from `--model-size NAME` (the registry in
`megacpt.sizes`) or from `--num-layers/--hidden-size/--ffn-hidden-size/--num-attention-heads`;
shape flags given with `--model-size` must agree with it. With `--init-from` the whole
architecture (shape, GQA, head dim, vocabulary, RoPE base and scaling, norm eps, tying, q/k/v
biases) comes from that checkpoint (ours, HF or Megatron): shape and variant flags become
optional, and one that contradicts the checkpoint is an error naming both values. Otherwise
the vocabulary comes from `--tokenizer-model` (or `--vocab-size`, or a public size's own). The length of training is exactly one of
`--train-iters`, `--train-tokens` or `--tokens-per-param` (x total parameters); the latter two
are turned into `training.train_iters` (rounded up to whole global batches).

The resolved config file (`config.json`, written into `--log-dir` and, by the checkpoint
module, into checkpoints) is `Config.to_dict()` plus a `"run"` section holding the
`RunOptions` below: options of this invocation that are not part of the model/data/optimizer
config. `Config.from_dict` ignores the extra section; `load_config` reads both.

The mapping between `Config` and flags (`flag_fields`, `config_to_argv`, `apply_flags`) and the
help text, derived from the config fields' docstrings, are in `megacpt.flags`; the three
functions stay importable from here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass

from megacpt import sizes
from megacpt.config import (CheckpointConfig, Config, ConfigError, DataConfig, LoggingConfig,
                            ModelConfig, OptimizerConfig, ParallelConfig, TrainingConfig)
from megacpt.data.tokenizer import TOKENIZER_TYPES

CONFIG_FILE = "config.json"
_SHAPE_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "kv_channels")


@dataclass
class RunOptions:
    """Options of one invocation that are not part of `Config`."""

    mock_data: bool = False
    """Random tokens instead of `--data-path` (tests, benchmarks); vocabulary from --vocab-size."""
    override_opt_param_scheduler: bool = False
    """On `--load`, use this run's LR schedule settings instead of requiring the checkpoint's."""
    data_check_tokens: int = 1 << 26
    """Scan up to this many tokens per data file for ids outside the vocabulary before training."""


def _d(section, name):
    """Default of a config field (so the CLI and the dataclasses never disagree)."""
    return {f.name: f for f in dataclasses.fields(section)}[name].default


def build_parser() -> argparse.ArgumentParser:
    """The trainer's parser. A flag that sets a config field gets that field's docstring as
    its help (`megacpt.flags.document`): `help=` here says only what the command line adds."""
    from megacpt import flags

    p = argparse.ArgumentParser(
        prog="python -m megacpt.train",
        usage="%(prog)s (--model-size NAME | --num-layers N --hidden-size H ...) "
              "(--data-path WORD [...] | --mock-data) (--train-iters N | --train-tokens N | "
              "--tokens-per-param X) [more flags below]",
        description="Pretraining and continual pre-training of LLaMA-family models. Flags "
                    "keep Megatron-LM's names and meanings; [megacpt] marks flags of our own "
                    "and [...] notes where Megatron's flag differs.",
        formatter_class=flags.HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model-size", help=f"Sets the shape: one of the {len(sizes.SIZES)} "
                   "sizes of megacpt.sizes; shape flags given with it must agree")
    for flag in _SHAPE_FLAGS:
        g.add_argument("--" + flag.replace("_", "-"), type=int)
    g.add_argument("--group-query-attention", action="store_true",
                   help="Accepted for Megatron compatibility; --num-query-groups sets GQA")
    g.add_argument("--seq-length", type=int, default=_d(ModelConfig, "seq_length"))
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--vocab-size", type=int, help="Needed when there is no "
                   "--tokenizer-model (e.g. --mock-data); must cover the tokenizer's")
    g.add_argument("--make-vocab-size-divisible-by", type=int,
                   default=_d(ModelConfig, "make_vocab_size_divisible_by"))
    g.add_argument("--rotary-base", type=float, help="Default: the size's or --init-from "
                   f"source's, else {_d(ModelConfig, 'rotary_base'):g}")
    g.add_argument("--norm-epsilon", type=float, help="Default: the size's or --init-from "
                   f"source's, else {_d(ModelConfig, 'norm_eps'):g}")
    g.add_argument("--tie-word-embeddings", action="store_true", default=None)
    g.add_argument("--add-qkv-bias", action="store_true", default=None)
    g.add_argument("--use-rope-scaling", action="store_true", default=None,
                   help="Llama 3.1 RoPE scaling (rope_type llama3, low/high freq factors 1/4, "
                        "original context 8192)")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0,
                   help="Factor of --use-rope-scaling (Llama 3.1: 8, Llama 3.2: 32)")
    g.add_argument("--init-method-std", type=float, default=_d(ModelConfig, "init_method_std"))
    g.add_argument("--attention-backend", default="auto",
                   choices=["auto", "flash_attn", "sdpa", "eager"])
    g.add_argument("--use-kernels", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--recompute-activations", action="store_true")
    g.add_argument("--cross-entropy-chunk-tokens", type=int,
                   default=_d(ModelConfig, "cross_entropy_chunk_tokens"))
    g.add_argument("--compile", action="store_true", help="The first steps are slower")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int,
                   help="The pipeline bubble shrinks by this factor")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int)
    g.add_argument("--pipeline-schedule", choices=["1f1b", "zb-h1"], default="1f1b",
                   help="zb-h1 keeps 1F1B's peak memory")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--grad-bucket-size-mb", type=float,
                   default=_d(ParallelConfig, "grad_bucket_size_mb"))
    g.add_argument("--no-gradient-accumulation-fusion", action="store_true",
                   help="Autograd then produces the weight gradients, added to the main grads")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"])
    g.add_argument("--distributed-timeout-minutes", type=float,
                   default=_d(ParallelConfig, "distributed_timeout_minutes"))

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=[], metavar="WORD",
                   help="A prefix may be named: 0.7 zh=PREFIX 0.3 en=PREFIX")
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--split", default=_d(DataConfig, "split"))
    g.add_argument("--valid-data-path", nargs="+", default=[], metavar="NAME=PREFIX")
    g.add_argument("--tokenizer-model")
    g.add_argument("--tokenizer-type", default=None, choices=TOKENIZER_TYPES)
    g.add_argument("--data-cache-path")
    g.add_argument("--num-workers", type=int, default=_d(DataConfig, "num_workers"))
    g.add_argument("--target")
    g.add_argument("--data-check-tokens", type=int, default=RunOptions.data_check_tokens)

    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument("--min-lr", type=float, help="Default: lr / 10 (the config's 2e-5 for "
                   "lr 2e-4)")
    for flag, field in (("--lr", "lr"),
                        ("--weight-decay", "weight_decay"), ("--adam-beta1", "adam_beta1"),
                        ("--adam-beta2", "adam_beta2"), ("--adam-eps", "adam_eps"),
                        ("--clip-grad", "clip_grad")):
        g.add_argument(flag, type=float, default=_d(OptimizerConfig, field))
    g.add_argument("--lr-warmup-fraction", type=float,
                   default=_d(OptimizerConfig, "lr_warmup_fraction"))
    g.add_argument("--lr-warmup-iters", type=int, default=0,
                   help="Given, it replaces --lr-warmup-fraction")
    g.add_argument("--lr-decay-style", default="cosine",
                   choices=["cosine", "linear", "constant", "WSD"])
    g.add_argument("--lr-decay-iters", type=int)
    g.add_argument("--lr-wsd-decay-style", default=_d(OptimizerConfig, "lr_wsd_decay_style"),
                   choices=["exponential", "linear", "cosine", "minus_sqrt"])
    g.add_argument("--lr-wsd-decay-iters", type=int)
    g.add_argument("--lr-wsd-decay-samples", type=int,
                   help="WSD: the length of the decay in samples, rounded up to whole global "
                        "batches (sets the config's lr_wsd_decay_iters)")
    g.add_argument("--override-opt-param-scheduler", action="store_true")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=_d(TrainingConfig, "micro_batch_size"))
    g.add_argument("--global-batch-size", type=int,
                   default=_d(TrainingConfig, "global_batch_size"))
    g.add_argument("--train-iters", type=int)
    g.add_argument("--train-tokens", type=int)
    g.add_argument("--tokens-per-param", type=float)
    g.add_argument("--seed", type=int, default=_d(TrainingConfig, "seed"))
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true", help="Not supported; use --bf16")
    g.add_argument("--eval-interval", type=int, default=_d(TrainingConfig, "eval_interval"))
    g.add_argument("--eval-iters", type=int, default=_d(TrainingConfig, "eval_iters"))
    g.add_argument("--exit-interval", type=int)
    g.add_argument("--device", choices=["cuda", "cpu"])
    g.add_argument("--max-nonfinite-steps", type=int,
                   default=_d(TrainingConfig, "max_nonfinite_steps"))

    g = p.add_argument_group("checkpoints")
    g.add_argument("--save")
    g.add_argument("--load")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--init-from", help="The architecture comes from it; shape flags become "
                   "optional and must agree")
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-verify-checksums", action="store_true",
                   help="A corrupt file is refused unless this is given")
    g.add_argument("--save-iters", type=int, nargs="+", default=[], metavar="ITER")
    g.add_argument("--keep-last-checkpoints", type=int, metavar="N")
    g.add_argument("--async-save", action="store_true")

    g = p.add_argument_group("logging")
    g.add_argument("--log-dir")
    g.add_argument("--log-interval", type=int, default=_d(LoggingConfig, "log_interval"))
    g.add_argument("--no-tensorboard", action="store_true")
    g.add_argument("--run-kind", choices=["scratch", "cpt"])
    g.add_argument("--wandb-project", help="Needs pip install 'megacpt[wandb]'; "
                   "WANDB_MODE=offline works without network")
    g.add_argument("--wandb-exp-name")
    g.add_argument("--wandb-save-dir")
    return flags.document(p)


def _variant_flags(a: argparse.Namespace) -> dict:
    """Architecture fields beyond the shape that flags set explicitly (None: not given)."""
    out = {"rotary_base": a.rotary_base, "norm_eps": a.norm_epsilon,
           "tie_word_embeddings": a.tie_word_embeddings, "add_qkv_bias": a.add_qkv_bias}
    if a.use_rope_scaling:
        out["rope_scaling"] = {"rope_type": "llama3", "factor": a.rope_scaling_factor,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}
    return {k: v for k, v in out.items() if v is not None}


_FLAG_OF = {"rotary_base": "--rotary-base", "norm_eps": "--norm-epsilon",
            "tie_word_embeddings": "--tie-word-embeddings", "add_qkv_bias": "--add-qkv-bias",
            "rope_scaling": "--use-rope-scaling", "vocab_size": "--vocab-size"}


def _from_source(a: argparse.Namespace, vocab_size: int | None, common: dict) -> ModelConfig:
    """The architecture of the `--init-from` checkpoint (ours, HF or Megatron), with this
    run's training knobs; any shape or variant flag given must agree with it."""
    from megacpt.checkpoint.checkpointing import open_source
    from megacpt.checkpoint.format import CheckpointError

    try:
        with open_source(a.init_from, make_vocab_size_divisible_by=
                         a.make_vocab_size_divisible_by, seq_length=a.seq_length) as src:
            have = src.cfg.model
    except CheckpointError as e:
        raise ConfigError(f"--init-from {a.init_from}: {e}") from None

    def contradict(flag, value, field, theirs):
        raise ConfigError(f"{flag} {value} contradicts the --init-from checkpoint "
                          f"{a.init_from}, which has {field} = {theirs}; drop {flag}")

    if a.model_size:
        want = _model_config_flags(a, have.vocab_size, {})
        for f in _SHAPE_FLAGS[:5] + ("head_dim",):
            if getattr(want, f) != getattr(have, f):
                raise ConfigError(f"--model-size {a.model_size} has {f} = {getattr(want, f)} but "
                                  f"the --init-from checkpoint {a.init_from} has {f} = "
                                  f"{getattr(have, f)}; drop --model-size (the architecture "
                                  f"comes from the checkpoint)")
    for f in _SHAPE_FLAGS:
        v = getattr(a, f)
        theirs = have.head_dim if f == "kv_channels" else getattr(have, f)
        if v is not None and v != theirs:
            contradict("--" + f.replace("_", "-"), v, f, theirs)
    for f, v in _variant_flags(a).items():
        if v != getattr(have, f):
            contradict(_FLAG_OF[f], v, f, getattr(have, f))
    if a.vocab_size is not None and a.vocab_size != have.vocab_size:
        contradict("--vocab-size", a.vocab_size, "vocab_size", have.vocab_size)
    if vocab_size is not None and vocab_size > have.vocab_size:
        raise ConfigError(f"--tokenizer-model {a.tokenizer_model} has {vocab_size} tokens, more "
                          f"than the --init-from checkpoint's vocab_size {have.vocab_size}; "
                          f"extend the model's vocabulary first (tools/extend_vocab.py)")
    keep = {f: getattr(have, f) for f in ("num_layers", "hidden_size", "ffn_hidden_size",
                                          "num_attention_heads", "num_query_groups",
                                          "kv_channels", "vocab_size", "rotary_base",
                                          "norm_eps", "tie_word_embeddings", "add_qkv_bias",
                                          "rope_scaling", "model_family", "name")}
    keep["make_vocab_size_divisible_by"] = have.make_vocab_size_divisible_by
    if common.get("max_position_embeddings") is None and \
            have.max_position_embeddings >= (a.seq_length or 0):
        # the source's context (an HF export then keeps e.g. Llama 3.2's 131072, not --seq-length)
        common["max_position_embeddings"] = have.max_position_embeddings
    common = {k: v for k, v in common.items() if k not in keep}
    return ModelConfig(**keep, **common)


def _model_config(a: argparse.Namespace, vocab_size: int | None) -> ModelConfig:
    common = dict(seq_length=a.seq_length, max_position_embeddings=a.max_position_embeddings,
                  make_vocab_size_divisible_by=a.make_vocab_size_divisible_by,
                  init_method_std=a.init_method_std, attention_backend=a.attention_backend,
                  use_kernels=a.use_kernels, recompute_activations=a.recompute_activations,
                  cross_entropy_chunk_tokens=a.cross_entropy_chunk_tokens, compile=a.compile)
    if a.init_from and (os.path.isdir(a.init_from) or not (
            a.model_size or all(getattr(a, f) is not None for f in _SHAPE_FLAGS[:4]))):
        # (a source that does not exist yet, e.g. a study's pretraining run still to come,
        # leaves the shape to the flags; the trainer checks them against it when it loads)
        return _from_source(a, vocab_size, common)
    if vocab_size is None:
        raise ConfigError("the vocabulary size is unknown: give --tokenizer-model or "
                          "--vocab-size")
    return _model_config_flags(a, vocab_size, common)


def _model_config_flags(a: argparse.Namespace, vocab_size: int, common: dict) -> ModelConfig:
    """The model from --model-size or the shape flags (and variant flags)."""
    given = {f: getattr(a, f) for f in _SHAPE_FLAGS if getattr(a, f) is not None}
    common = {**common, **_variant_flags(a), "vocab_size": vocab_size}
    if a.model_size:
        try:
            cfg = ModelConfig.from_size(a.model_size, **common)
        except KeyError as e:
            raise ConfigError(str(e.args[0])) from None
        for f, v in given.items():
            if getattr(cfg, f) != v:
                raise ConfigError(f"--{f.replace('_', '-')} {v} contradicts --model-size "
                                  f"{a.model_size} (which has {f} = {getattr(cfg, f)}); "
                                  f"drop one of them")
        return cfg
    missing = [f for f in _SHAPE_FLAGS[:4] if f not in given]
    if missing:
        raise ConfigError("give --model-size or all of " + ", ".join(
            "--" + f.replace("_", "-") for f in missing) + " (missing)")
    return ModelConfig(**given, **common)


def tokenizer_vocab_size(path: str, tokenizer_type: str | None = None) -> int:
    """Vocabulary size of a tokenizer (SentencePiece .model or HF tokenizer.json; clear
    error if missing or unreadable)."""
    from megacpt.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path, tokenizer_type).vocab_size
    except (OSError, ValueError, ImportError) as e:
        raise ConfigError(f"--tokenizer-model: {e}") from None


def _vocab_size(a: argparse.Namespace) -> int | None:
    tok = tokenizer_vocab_size(a.tokenizer_model, a.tokenizer_type) if a.tokenizer_model else None
    if a.vocab_size is not None and tok is not None and tok > a.vocab_size:
        raise ConfigError(f"the tokenizer {a.tokenizer_model} has {tok} tokens, more than "
                          f"--vocab-size {a.vocab_size}; drop --vocab-size or raise it")
    if a.vocab_size is not None:
        return a.vocab_size
    if tok is not None:
        return tok
    if a.model_size and a.model_size in sizes.SIZES and sizes.SIZES[a.model_size].vocab_size:
        return sizes.SIZES[a.model_size].vocab_size  # a public checkpoint's own vocabulary
    return None  # --init-from gives it, else _model_config refuses


def _valid_paths(words: list[str]) -> dict[str, str]:
    out = {}
    for w in words:
        name, sep, prefix = w.partition("=")
        if not sep:
            name, prefix = os.path.basename(w.rstrip("/")), w
        if not name or not prefix:
            raise ConfigError(f"--valid-data-path expects NAME=PREFIX words, got {w!r}")
        if name in out:
            raise ConfigError(f"--valid-data-path names the set {name!r} twice")
        out[name] = prefix
    return out


def resolve_train_iters(cfg: Config) -> int:
    """Set `training.train_iters` from tokens or tokens-per-parameter; exactly one is needed."""
    t = cfg.training
    given = [n for n, v in (("--train-iters", t.train_iters), ("--train-tokens", t.train_tokens),
                            ("--tokens-per-param", t.tokens_per_param)) if v is not None]
    if len(given) != 1:
        raise ConfigError(f"give exactly one of --train-iters, --train-tokens, "
                          f"--tokens-per-param (got {', '.join(given) or 'none'})")
    tokens_per_iter = t.global_batch_size * cfg.model.seq_length
    if t.train_tokens is not None:
        tokens = t.train_tokens
    elif t.tokens_per_param is not None:
        tokens = t.tokens_per_param * cfg.model.num_parameters(include_embeddings=True)
    else:
        tokens = None
    if tokens is not None:
        t.train_iters = max(1, math.ceil(tokens / tokens_per_iter))
    if t.train_iters < 1:
        raise ConfigError(f"--train-iters must be >= 1, got {t.train_iters}")
    return t.train_iters


def config_from_args(a: argparse.Namespace) -> tuple[Config, RunOptions]:
    """Build and validate the resolved config from parsed flags."""
    if a.fp16:
        raise ConfigError("--fp16 is not supported (no loss scaling); use --bf16")
    if not a.mock_data and not a.data_path:
        raise ConfigError("no training data: give --data-path PREFIX [...] (or --mock-data)")
    model = _model_config(a, _vocab_size(a))
    cfg = Config(
        model=model,
        parallel=ParallelConfig(
            tensor_model_parallel_size=a.tensor_model_parallel_size,
            pipeline_model_parallel_size=a.pipeline_model_parallel_size,
            sequence_parallel=a.sequence_parallel,
            virtual_pipeline_model_parallel_size=a.virtual_pipeline_model_parallel_size,
            num_layers_per_virtual_pipeline_stage=a.num_layers_per_virtual_pipeline_stage,
            pipeline_schedule=a.pipeline_schedule,
            use_distributed_optimizer=a.use_distributed_optimizer,
            grad_bucket_size_mb=a.grad_bucket_size_mb,
            gradient_accumulation_fusion=not a.no_gradient_accumulation_fusion, distributed_backend=a.distributed_backend,
            distributed_timeout_minutes=a.distributed_timeout_minutes),
        data=DataConfig(data_path=list(a.data_path), split=a.split,
                        valid_data_path=_valid_paths(a.valid_data_path),
                        tokenizer_model=a.tokenizer_model, tokenizer_type=a.tokenizer_type,
                        data_cache_path=a.data_cache_path,
                        num_workers=a.num_workers, target=a.target),
        optim=OptimizerConfig(
            lr=a.lr, min_lr=_min_lr(a), lr_warmup_fraction=(
                None if a.lr_warmup_iters else a.lr_warmup_fraction),
            lr_warmup_iters=a.lr_warmup_iters, lr_decay_style=a.lr_decay_style,
            lr_decay_iters=a.lr_decay_iters, lr_wsd_decay_style=a.lr_wsd_decay_style,
            lr_wsd_decay_iters=_wsd_decay_iters(a), weight_decay=a.weight_decay,
            adam_beta1=a.adam_beta1, adam_beta2=a.adam_beta2, adam_eps=a.adam_eps,
            clip_grad=a.clip_grad),
        training=TrainingConfig(
            micro_batch_size=a.micro_batch_size, global_batch_size=a.global_batch_size,
            train_iters=a.train_iters, train_tokens=a.train_tokens,
            tokens_per_param=a.tokens_per_param, seed=a.seed, bf16=a.bf16,
            eval_interval=a.eval_interval, eval_iters=a.eval_iters,
            exit_interval=a.exit_interval, device=a.device,
            max_nonfinite_steps=a.max_nonfinite_steps),
        checkpoint=CheckpointConfig(save=a.save, load=a.load, save_interval=a.save_interval,
                                    init_from=a.init_from, no_save_optim=a.no_save_optim,
                                    verify_checksums=not a.no_verify_checksums,
                                    save_iters=list(a.save_iters),
                                    keep_last_checkpoints=a.keep_last_checkpoints,
                                    async_save=a.async_save),
        logging=LoggingConfig(log_dir=a.log_dir, log_interval=a.log_interval,
                              tensorboard=not a.no_tensorboard, run_kind=a.run_kind,
                              wandb_project=a.wandb_project, wandb_exp_name=a.wandb_exp_name,
                              wandb_save_dir=a.wandb_save_dir),
    )
    for name in ("eval_interval", "eval_iters", "max_nonfinite_steps"):
        if getattr(cfg.training, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.logging.log_interval < 1:
        raise ConfigError("--log-interval must be >= 1")
    _check_wandb(cfg.logging)
    resolve_train_iters(cfg)
    opts = RunOptions(mock_data=a.mock_data,
                      override_opt_param_scheduler=a.override_opt_param_scheduler,
                      data_check_tokens=a.data_check_tokens)
    return cfg, opts


def _wsd_decay_iters(a: argparse.Namespace) -> int | None:
    if a.lr_wsd_decay_iters is not None and a.lr_wsd_decay_samples is not None:
        raise ConfigError("give --lr-wsd-decay-iters or --lr-wsd-decay-samples, not both")
    if a.lr_wsd_decay_samples is not None:
        return -(-a.lr_wsd_decay_samples // a.global_batch_size)
    return a.lr_wsd_decay_iters


def _check_wandb(lg: LoggingConfig) -> None:
    """W&B flags need a project, and wandb installed (a clear message, not a stack)."""
    if lg.wandb_project is None:
        if lg.wandb_exp_name or lg.wandb_save_dir:
            raise ConfigError("--wandb-exp-name/--wandb-save-dir need --wandb-project")
        return
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"--wandb-project {lg.wandb_project}: the wandb package is not "
                          f"installed; pip install 'megacpt[wandb]' (or drop --wandb-project)")
    if lg.wandb_save_dir is None and lg.log_dir is None:
        raise ConfigError("--wandb-project needs --log-dir or --wandb-save-dir (where W&B "
                          "keeps its local files)")


def _min_lr(a: argparse.Namespace) -> float:
    if a.min_lr is not None:
        return a.min_lr
    return _d(OptimizerConfig, "min_lr") * a.lr / _d(OptimizerConfig, "lr")


def parse_args(argv: list[str] | None = None) -> tuple[Config, RunOptions]:
    """Parse the command line into the resolved (Config, RunOptions)."""
    return config_from_args(build_parser().parse_args(argv))


def config_dict(cfg: Config, opts: RunOptions) -> dict:
    return {**cfg.to_dict(), "run": dataclasses.asdict(opts)}


def save_config(cfg: Config, opts: RunOptions, directory: str) -> str:
    """Write `directory/config.json` atomically; returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config_dict(cfg, opts), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def load_config(path: str) -> tuple[Config, RunOptions]:
    """Read a config.json written by `save_config` (a file or a directory holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the run config ({e})") from None
    run = d.get("run", {})
    unknown = set(run) - {f.name for f in dataclasses.fields(RunOptions)}
    if unknown:
        raise ConfigError(f"{path}: section 'run' has unknown fields {sorted(unknown)}")
    return Config.from_dict(d), RunOptions(**run)


def __getattr__(name: str):
    """`config_to_argv`, `apply_flags` and `flag_fields` moved to `megacpt.flags` (imported
    on first use: megacpt.flags itself imports this module)."""
    if name in ("config_to_argv", "apply_flags", "flag_fields"):
        from megacpt import flags

        return getattr(flags, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
