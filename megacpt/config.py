"""Typed configuration tree: one dataclass per concern, validated in `__post_init__`.

`Config` holds `model`, `parallel`, `data`, `optim`, `training`, `checkpoint` and `logging`.
Every run saves its resolved config as JSON (`Config.to_dict`); `Config.from_dict` reads it
back. The CLI (`megacpt.arguments`) is a thin layer with Megatron's flag names.

This module does not import torch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from megacpt import sizes


#: HF model families megacpt imports and exports (config.json `model_type`)
MODEL_FAMILIES = ("llama", "qwen2", "mistral")


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which field and what to change."""


#: RoPE scaling types we implement (`megacpt.model.attention.rotary_tables`) and the keys each
#: needs (transformers' `rope_scaling` / `rope_parameters` names)
ROPE_SCALING_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}


def check_rope_scaling(rs: dict, where: str) -> None:
    """A clear error for a RoPE scaling we do not implement or that lacks a field."""
    kind = rs.get("rope_type", rs.get("type"))
    if kind not in ROPE_SCALING_KEYS:
        raise ConfigError(f"{where}: rope_type {kind!r} is not supported (supported: "
                          f"{', '.join(ROPE_SCALING_KEYS)}); dynamic, yarn and longrope scaling "
                          f"are not implemented")
    for key in ROPE_SCALING_KEYS[kind]:
        if not isinstance(rs.get(key), (int, float)) or rs[key] <= 0:
            raise ConfigError(f"{where}: rope_type {kind!r} needs a positive number {key!r}, "
                              f"got {rs.get(key)!r}")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class ModelConfig:
    """Shape and numerics of the LLaMA2 decoder."""

    num_layers: int = 2
    """Transformer layers (`--num-layers`)."""
    hidden_size: int = 64
    """Model width (`--hidden-size`)."""
    ffn_hidden_size: int = 176
    """SwiGLU inner width (`--ffn-hidden-size`)."""
    num_attention_heads: int = 4
    """Query heads (`--num-attention-heads`)."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; None means one per query head (MHA)."""
    kv_channels: int | None = None
    """Head dim (`--kv-channels`); None means hidden_size / num_attention_heads."""
    vocab_size: int = 256
    """The tokenizer's vocabulary size (unpadded); the embedding is padded (see below)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this (independent of tensor parallelism)."""
    seq_length: int = 128
    """Training sequence length (`--seq-length`)."""
    max_position_embeddings: int | None = None
    """Longest position the rotary table covers; None means seq_length."""
    rotary_base: float = 10000.0
    """Rotary embedding base (LLaMA2: 10000)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_method_std: float = 0.02
    """Std of the normal init; output projections use std / sqrt(2 * num_layers)."""
    attention_backend: str = "auto"
    """One of auto, flash_attn, sdpa, eager; auto picks the fastest available."""
    use_kernels: bool | None = None
    """Use the Triton RMSNorm/SwiGLU kernels; None means: when they can run on the device."""
    recompute_activations: bool = False
    """Activation checkpointing of whole transformer layers."""
    cross_entropy_chunk_tokens: int = 0
    """`--cross-entropy-chunk-tokens`. 0: the LM head's logits are materialised whole; N > 0:
    the LM head and loss run N tokens at a time and the logits never exist whole (large
    vocabularies); costs one more LM-head matmul in backward."""
    compile: bool = False
    """torch.compile each transformer layer (`--compile`); inside compiled layers inductor
    generates the fused norm/SwiGLU/rotary code, the Triton kernels serve the rest."""
    name: str | None = None
    """Registry size name this shape came from ("1393M", "tiny"), if any."""
    tie_word_embeddings: bool = False
    """The output layer uses the input embedding's weight (Llama 3.2 1B/3B, small Qwen2.5).
    Under pipeline parallelism the last stage holds a copy whose gradient is all-reduced with
    the first stage's (Megatron's embedding group)."""
    add_qkv_bias: bool = False
    """Biases on the q/k/v projections (Qwen2); sharded over tp like the fused QKV rows."""
    rope_scaling: dict | None = None
    """RoPE frequency scaling as in transformers' config.json `rope_scaling`, e.g.
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192}; types: see `megacpt.model.attention`."""
    model_family: str = "llama"
    """HF family the model exports as: llama (LlamaForCausalLM), qwen2 or mistral."""
    sliding_window: int | None = None
    """Mistral's attention window, kept for export; attention here is full causal, so
    sequences may not be longer than it (None: no window)."""

    def __post_init__(self):
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "num_query_groups", "vocab_size", "seq_length", "make_vocab_size_divisible_by"):
            _check(getattr(self, f) > 0, f"model.{f} must be > 0, got {getattr(self, f)}")
        _check(self.cross_entropy_chunk_tokens >= 0,
               f"model.cross_entropy_chunk_tokens must be >= 0 (0: logits whole), "
               f"got {self.cross_entropy_chunk_tokens}")
        _check(self.kv_channels is not None or self.hidden_size % self.num_attention_heads == 0,
               f"model.hidden_size ({self.hidden_size}) must be divisible by "
               f"num_attention_heads ({self.num_attention_heads}), or set kv_channels")
        _check(self.num_attention_heads % self.num_query_groups == 0,
               f"model.num_attention_heads ({self.num_attention_heads}) must be divisible by "
               f"num_query_groups ({self.num_query_groups})")
        _check(self.max_position_embeddings >= self.seq_length,
               f"model.max_position_embeddings ({self.max_position_embeddings}) must be >= "
               f"seq_length ({self.seq_length})")
        _check(self.attention_backend in ("auto", "flash_attn", "sdpa", "eager"),
               f"model.attention_backend must be auto|flash_attn|sdpa|eager, "
               f"got {self.attention_backend!r}")
        _check(self.model_family in MODEL_FAMILIES,
               f"model.model_family must be one of {', '.join(MODEL_FAMILIES)}, "
               f"got {self.model_family!r}")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling, "model.rope_scaling")
        _check(self.sliding_window is None or self.sliding_window >= self.seq_length,
               f"model.seq_length {self.seq_length} is longer than the sliding_window "
               f"{self.sliding_window} of this model: megacpt attends over the whole sequence, "
               f"so it only runs such models on sequences up to the window (--seq-length)")

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        return sizes.pad_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by)

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count (see `megacpt.sizes.param_count`), at the padded vocabulary."""
        return sizes.param_count(self.hidden_size, self.ffn_hidden_size, self.num_layers,
                                 self.num_attention_heads, self.num_query_groups,
                                 self.padded_vocab_size, include_embeddings, self.head_dim,
                                 tied=self.tie_word_embeddings, qkv_bias=self.add_qkv_bias)

    def flops_per_token(self) -> float:
        """Training FLOPs per token (see `megacpt.sizes.flops_per_token`)."""
        return sizes.flops_per_token(self.hidden_size, self.ffn_hidden_size, self.num_layers,
                                     self.num_attention_heads, self.num_query_groups,
                                     self.padded_vocab_size, self.seq_length,
                                     head_dim=self.head_dim)

    @classmethod
    def from_size(cls, name: str, **overrides) -> "ModelConfig":
        """A config with the registered shape `name` ("1393M", "tiny") and any overrides."""
        shape = sizes.get_size(name)
        kw = dict(num_layers=shape.num_layers, hidden_size=shape.hidden_size,
                  ffn_hidden_size=shape.ffn_hidden_size,
                  num_attention_heads=shape.num_attention_heads,
                  num_query_groups=shape.num_query_groups, kv_channels=shape.kv_channels,
                  name=name, **shape.variant_fields())
        if shape.vocab_size is not None:  # a public checkpoint's own vocabulary
            kw["vocab_size"] = shape.vocab_size
        kw.update(overrides)
        if kw.get("vocab_size") is None:
            kw.pop("vocab_size", None)
        return cls(**kw)


@dataclass
class ParallelConfig:
    """How the model and batch are split over ranks (tp ranks adjacent, then dp, then pp)."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel ranks (`--tensor-model-parallel-size`)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages (`--pipeline-model-parallel-size`)."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline rank for the interleaved 1F1B schedule
    (`--virtual-pipeline-model-parallel-size`); None/1: plain 1F1B."""
    num_layers_per_virtual_pipeline_stage: int | None = None
    """The same given as layers per chunk (`--num-layers-per-virtual-pipeline-stage`):
    virtual stages = num_layers / pp / this. At most one of the two."""
    pipeline_schedule: str = "1f1b"
    """`--pipeline-schedule`: 1f1b (interleaved with virtual stages) or zb-h1 (zero-bubble
    H1: backward split into input and weight gradients; no virtual stages)."""
    sequence_parallel: bool = False
    """Shard norms/activations along the sequence over tp ranks (`--sequence-parallel`)."""
    use_distributed_optimizer: bool = False
    """ZeRO-1: shard fp32 master weights and Adam state over dp (`--use-distributed-optimizer`)."""
    grad_bucket_size_mb: float = 25.0
    """Size of gradient all-reduce buckets in MiB."""
    gradient_accumulation_fusion: bool = True
    """Linear layers add weight gradients straight into the fp32 main grads
    (`--no-gradient-accumulation-fusion` turns it off; see megacpt.parallel.wgrad)."""
    distributed_backend: str | None = None
    """nccl or gloo; None: nccl with CUDA, else gloo."""
    distributed_timeout_minutes: float = 10.0
    """Collectives give up after this long (a dead rank ends the job instead of hanging)."""

    def __post_init__(self):
        _check(self.tensor_model_parallel_size >= 1, "parallel.tensor_model_parallel_size must be >= 1")
        _check(self.pipeline_model_parallel_size >= 1, "parallel.pipeline_model_parallel_size must be >= 1")
        _check(self.pipeline_schedule in ("1f1b", "zb-h1"),
               f"parallel.pipeline_schedule must be 1f1b or zb-h1, got {self.pipeline_schedule!r}")
        _check(self.pipeline_schedule == "1f1b" or not (
            self.virtual_pipeline_model_parallel_size or self.num_layers_per_virtual_pipeline_stage),
            "parallel.pipeline_schedule zb-h1 runs without virtual pipeline stages")
        _check(self.pipeline_schedule == "1f1b" or self.gradient_accumulation_fusion,
               "parallel.pipeline_schedule zb-h1 needs gradient_accumulation_fusion "
               "(drop --no-gradient-accumulation-fusion)")
        for name in ("virtual_pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage"):
            v = getattr(self, name)
            _check(v is None or v >= 1, f"parallel.{name} must be >= 1 when given, got {v}")
        _check(self.distributed_backend in (None, "nccl", "gloo"),
               f"parallel.distributed_backend must be nccl or gloo, got {self.distributed_backend!r}")


@dataclass
class DataConfig:
    """Where samples come from."""

    data_path: list[str] = field(default_factory=list)
    """`--data-path` words: weight/prefix pairs (`0.7 zh 0.3 en`) or prefixes alone."""
    split: str = "969,30,1"
    """Train/valid/test split of each training prefix, by documents."""
    valid_data_path: dict[str, str] = field(default_factory=dict)
    """Named held-out sets (`--valid-data-path zh=PREFIX en=PREFIX`) for per-language loss."""
    tokenizer_model: str | None = None
    """`--tokenizer-model`: SentencePiece .model, HF tokenizer.json or a directory holding
    one (`megacpt.data.tokenizer.load_tokenizer`); sets the vocabulary size."""
    tokenizer_type: str | None = None
    """Megatron's `--tokenizer-type` (e.g. HuggingFaceTokenizer); None: from the path."""
    data_cache_path: str | None = None
    """Where sample/shuffle indices are cached; default: beside the data."""
    num_workers: int = 1
    """DataLoader worker processes."""
    target: str | None = None
    """Name of the target-language dataset (for metrics headers); default: first in the blend."""

    def __post_init__(self):
        from megacpt.data.tokenizer import TOKENIZER_TYPES

        if self.tokenizer_type is not None and self.tokenizer_type not in TOKENIZER_TYPES:
            raise ConfigError(f"data.tokenizer_type is {self.tokenizer_type!r}, expected one of "
                              f"{', '.join(TOKENIZER_TYPES)}")
        parts = self.split.replace("/", ",").split(",")
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(f"data.split must be comma-separated numbers like 969,30,1, "
                              f"got {self.split!r}") from None
        _check(len(vals) <= 3 and sum(vals) > 0 and min(vals) >= 0,
               f"data.split must have up to 3 non-negative parts, got {self.split!r}")


@dataclass
class OptimizerConfig:
    """AdamW and the learning-rate schedule (defaults: the paper's recipe)."""

    lr: float = 2e-4
    """Peak learning rate (`--lr`); the paper uses 2e-4."""
    min_lr: float = 2e-5
    """Floor of the decay (`--min-lr`)."""
    lr_warmup_fraction: float | None = 0.05
    """Fraction of training spent in linear warm-up (`--lr-warmup-fraction`); paper: 5%."""
    lr_warmup_iters: int = 0
    """Warm-up steps when no fraction is given (`--lr-warmup-iters`)."""
    lr_decay_style: str = "cosine"
    """cosine, linear, constant or WSD (`--lr-decay-style`; WSD: warm-up, stable at lr, then a
    decay over the last lr_wsd_decay_iters steps of lr_decay_iters)."""
    lr_decay_iters: int | None = None
    """Steps over which to decay; None means train_iters."""
    lr_wsd_decay_style: str = "exponential"
    """Shape of the WSD decay: exponential, linear, cosine or minus_sqrt (Megatron's
    `--lr-wsd-decay-style`)."""
    lr_wsd_decay_iters: int | None = None
    """Steps of the WSD decay (`--lr-wsd-decay-iters`, or `--lr-wsd-decay-samples`)."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (not norms) (`--weight-decay`)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (`--clip-grad`); 0 disables."""

    def __post_init__(self):
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(0 <= self.min_lr <= self.lr, f"optim.min_lr ({self.min_lr}) must be in [0, lr={self.lr}]")
        _check(self.lr_decay_style in ("cosine", "linear", "constant", "WSD"),
               f"optim.lr_decay_style must be cosine|linear|constant|WSD, "
               f"got {self.lr_decay_style!r}")
        _check(self.lr_wsd_decay_style in ("exponential", "linear", "cosine", "minus_sqrt"),
               f"optim.lr_wsd_decay_style must be exponential|linear|cosine|minus_sqrt, got "
               f"{self.lr_wsd_decay_style!r}")
        _check(self.lr_decay_style != "WSD" or (self.lr_wsd_decay_iters or 0) >= 1,
               "optim.lr_decay_style WSD needs lr_wsd_decay_iters >= 1 (--lr-wsd-decay-iters "
               "or --lr-wsd-decay-samples)")
        if self.lr_warmup_fraction is not None:
            _check(0 <= self.lr_warmup_fraction < 1,
                   f"optim.lr_warmup_fraction must be in [0, 1), got {self.lr_warmup_fraction}")
        _check(self.clip_grad >= 0, f"optim.clip_grad must be >= 0, got {self.clip_grad}")


@dataclass
class TrainingConfig:
    """Batch, length of training, numerics and evaluation."""

    micro_batch_size: int = 2
    """Sequences per rank per forward pass (`--micro-batch-size`)."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all dp ranks (`--global-batch-size`)."""
    train_iters: int | None = None
    """Optimizer steps (`--train-iters`); or derive from train_tokens / tokens_per_param."""
    train_tokens: int | None = None
    """Tokens to train on (`--train-tokens`); sets train_iters."""
    tokens_per_param: float | None = None
    """Train tokens = this x parameters (`--tokens-per-param`; the paper uses 20)."""
    seed: int = 1234
    """Seed for init, data order and dropout-free RNG state (`--seed`)."""
    bf16: bool = False
    """bf16 parameters and activations with fp32 master weights and grads (`--bf16`)."""
    eval_interval: int = 100
    """Validate every this many steps (`--eval-interval`); also at the end."""
    eval_iters: int = 10
    """Validation micro-batches per named set (`--eval-iters`)."""
    exit_interval: int | None = None
    """Save and exit after this step (`--exit-interval`)."""
    device: str | None = None
    """cuda or cpu; None picks cuda when available."""
    max_nonfinite_steps: int = 5
    """Stop after this many consecutive steps with non-finite loss or grad norm."""

    def __post_init__(self):
        _check(self.micro_batch_size > 0, "training.micro_batch_size must be > 0")
        _check(self.global_batch_size > 0, "training.global_batch_size must be > 0")
        _check(self.global_batch_size % self.micro_batch_size == 0,
               f"training.global_batch_size ({self.global_batch_size}) must be a multiple of "
               f"micro_batch_size ({self.micro_batch_size})")


@dataclass
class CheckpointConfig:
    """Saving, resuming and initialising from other checkpoints."""

    save: str | None = None
    """Directory to save checkpoints to (`--save`)."""
    load: str | None = None
    """Directory to resume from exactly (`--load`)."""
    save_interval: int | None = None
    """Save every this many steps (`--save-interval`); also at the end when save is set."""
    init_from: str | None = None
    """Weights-only start (`--init-from`): our checkpoint in any layout or a HuggingFace
    LLaMA directory; fresh optimizer, iteration 0, LR re-warm-up (the paper's CPT)."""
    no_save_optim: bool = False
    """Leave optimizer state out of saved checkpoints."""
    verify_checksums: bool = True
    """Check the checksums recorded in a checkpoint's meta.json before loading it (`--load`,
    `--init-from`); off with `--no-verify-checksums` (saves one read of the files)."""
    save_iters: list[int] = field(default_factory=list)
    """Also save at these iterations (`--save-iters`; e.g. where WSD cooldown branches start)."""
    keep_last_checkpoints: int | None = None
    """`--keep-last-checkpoints N`: after each save keep only the newest N complete
    checkpoints in `save` (never the one the tracker names, nor one being written); None:
    keep all."""
    async_save: bool = False
    """`--async-save`: snapshot the state to CPU and write the checkpoint in a background
    thread while training goes on (finished before the next save, at exit and on SIGTERM)."""

    def __post_init__(self):
        _check(self.keep_last_checkpoints is None or self.keep_last_checkpoints >= 1,
               f"checkpoint.keep_last_checkpoints (--keep-last-checkpoints) must be >= 1, got "
               f"{self.keep_last_checkpoints}")


@dataclass
class LoggingConfig:
    """Console and file logging."""

    log_dir: str | None = None
    """Directory for metrics.jsonl, the resolved config and TensorBoard (`--log-dir`)."""
    log_interval: int = 10
    """Console line every this many steps (`--log-interval`)."""
    tensorboard: bool = True
    """Also write TensorBoard events when tensorboard is installed."""
    run_kind: str | None = None
    """scratch or cpt in the metrics header; None: cpt when init_from is set."""
    wandb_project: str | None = None
    """Weights & Biases project (`--wandb-project`); None: no W&B logging."""
    wandb_exp_name: str | None = None
    """W&B run name (`--wandb-exp-name`); None: W&B picks one."""
    wandb_save_dir: str | None = None
    """Directory for W&B's local files (`--wandb-save-dir`); None: LOG_DIR/wandb."""


@dataclass
class Config:
    """The whole resolved configuration of a run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        """Inverse of `to_dict`; unknown fields are an error naming the section."""
        sections = {"model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig,
                    "optim": OptimizerConfig, "training": TrainingConfig,
                    "checkpoint": CheckpointConfig, "logging": LoggingConfig}
        parts = {}
        for name, sub_cls in sections.items():
            sub = d.get(name, {})
            unknown = set(sub) - {g.name for g in dataclasses.fields(sub_cls)}
            _check(not unknown, f"config section {name!r} has unknown fields {sorted(unknown)}")
            parts[name] = sub_cls(**sub)
        return cls(**parts)
