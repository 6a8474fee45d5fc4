"""Import Megatron-LM legacy (torch.save) checkpoints of LLaMA-style GPT models.

Layout read (Megatron-LM `megatron/training/checkpointing.py`, non-distributed format):

    DIR/latest_checkpointed_iteration.txt          an iteration number or "release"
    DIR/iter_{it:07d}/ (or DIR/release/)
      mp_rank_{tp:02d}/model_optim_rng.pt           pipeline size 1
      mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt  pipeline size > 1

Each file is a dict {"args": argparse.Namespace, "checkpoint_version": 3.0, "iteration",
"model": state dict of this (tp, pp) shard, "optimizer", "opt_param_scheduler",
"rng_state"}. It is read with `torch.load(weights_only=True, mmap=True)` and an allow-list:
argparse.Namespace, numpy arrays (RNG state) and stand-ins for Megatron's enums
(ModelType, AttnBackend, AttnMaskType), which arrive as `enum(value)` calls.

Model keys, Megatron-core names (`decoder.layers.{i}.` with i local to the stage) or the
older `language_model.encoder.layers.{i}.` names, mapped to ours:

    embedding.word_embeddings.weight                          -> embedding.weight
    self_attention.linear_qkv.layer_norm_weight | input_layernorm.weight | input_norm.weight
                                                              -> layers.g.input_norm.weight
    self_attention.linear_qkv.weight | self_attention.query_key_value.weight
                                                              -> layers.g.attention.qkv.weight
    self_attention.linear_proj.weight | self_attention.dense.weight
                                                              -> layers.g.attention.proj.weight
    mlp.linear_fc1.layer_norm_weight | pre_mlp_layernorm.weight | post_attention_norm.weight
        | post_attention_layernorm.weight                     -> layers.g.post_attention_norm.weight
    mlp.linear_fc1.weight | mlp.dense_h_to_4h.weight          -> layers.g.mlp.gate_up.weight
    mlp.linear_fc2.weight | mlp.dense_4h_to_h.weight          -> layers.g.mlp.down.weight
    decoder.final_layernorm.weight | encoder.final_norm.weight ... -> final_norm.weight
    output_layer.weight                                       -> output.weight

The fused QKV (interleaved per query group) and fc1 (each rank `[gate_r; up_r]`) are split over
tp exactly like ours, so shards are unsharded with `megacpt.parallel.sharding`. Megatron pads
the vocabulary to a multiple of make_vocab_size_divisible_by x tp; the true vocabulary size
comes from `vocab_size=`, `args.vocab_size`, or the tokenizer, and rows are re-padded ours.
"""
from __future__ import annotations

import argparse
import logging
import os
import re

import numpy as np
import torch

from megacpt.checkpoint.format import CheckpointError, full_shape
from megacpt.checkpoint.reader import Source
from megacpt.config import Config, ConfigError, ModelConfig
from megacpt.parallel import sharding

log = logging.getLogger(__name__)

FILE = "model_optim_rng.pt"
_SHARD_RE = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?$")

_LAYER_KEYS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_norm.weight",
    "input_layernorm.weight": "input_norm.weight",
    "input_norm.weight": "input_norm.weight",
    "self_attention.linear_qkv.weight": "attention.qkv.weight",
    "self_attention.query_key_value.weight": "attention.qkv.weight",
    "self_attention.linear_proj.weight": "attention.proj.weight",
    "self_attention.dense.weight": "attention.proj.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_norm.weight",
    "pre_mlp_layernorm.weight": "post_attention_norm.weight",
    "post_attention_norm.weight": "post_attention_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "mlp.linear_fc1.weight": "mlp.gate_up.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up.weight",
    "mlp.linear_fc2.weight": "mlp.down.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down.weight",
}
_LAYER_RE = re.compile(r"(?:language_model\.encoder|decoder)\.layers\.(\d+)\.(.+)$")
_TOP_KEYS = {
    "embedding.word_embeddings.weight": "embedding.weight",
    "language_model.embedding.word_embeddings.weight": "embedding.weight",
    "decoder.final_layernorm.weight": "final_norm.weight",
    "decoder.final_norm.weight": "final_norm.weight",
    "language_model.encoder.final_layernorm.weight": "final_norm.weight",
    "language_model.encoder.final_norm.weight": "final_norm.weight",
    "output_layer.weight": "output.weight",
    "language_model.output_layer.weight": "output.weight",
}
_IGNORED = re.compile(r"(_extra_state|rotary_pos_emb\.inv_freq)$")


class _MegatronEnum:
    """Stand-in for a Megatron enum member in `args` (unpickled as `Enum(value)`)."""

    def __init__(self, value=None):
        self.value = value

    def __repr__(self):
        return f"<megatron enum {self.value!r}>"


def _safe_globals() -> list:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    names = ["megatron.core.enums.ModelType", "megatron.core.transformer.enums.AttnBackend",
             "megatron.core.transformer.enums.AttnMaskType"]
    return [argparse.Namespace, _reconstruct, np.ndarray, np.dtype,
            type(np.dtype(np.uint32))] + [(_MegatronEnum, n) for n in names]


def load_legacy_file(path: str) -> dict:
    """torch.load one Megatron-LM pickle (model_optim_rng.pt, or a torch_dist checkpoint's
    common.pt) with weights_only=True and the allow-list above."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing")
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - any unpickling error is reported the same way
            raise CheckpointError(f"{path}: cannot be read with weights_only=True ({e})") from None


def _legacy_iter_dir(path: str) -> str | None:
    tracker = os.path.join(path, "latest_checkpointed_iteration.txt")
    if os.path.isfile(tracker):
        text = open(tracker).read().strip()
        sub = "release" if text == "release" else (f"iter_{int(text):07d}"
                                                   if text.isdigit() else None)
        return os.path.join(path, sub) if sub else None
    return path


def is_megatron_legacy(path: str) -> bool:
    d = _legacy_iter_dir(path)
    if not d or not os.path.isdir(d):
        return False
    return any(_SHARD_RE.match(e) and os.path.isfile(os.path.join(d, e, FILE))
               for e in os.listdir(d))


def _arg(args, *names, default=None):
    for n in names:
        if getattr(args, n, None) is not None:
            return getattr(args, n)
    return default


def config_from_args(args, where: str, vocab_size: int | None,
                     make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """Our ModelConfig from Megatron's args; anything not LLaMA-like is an error."""
    expect = {"normalization": "RMSNorm", "swiglu": True,
              "untie_embeddings_and_output_weights": True, "add_bias_linear": False,
              "add_qkv_bias": False, "position_embedding_type": "rope",
              "rotary_interleaved": False, "apply_layernorm_1p": False}
    defaults = {"add_qkv_bias": False, "rotary_interleaved": False, "apply_layernorm_1p": False}
    for field, want in expect.items():
        have = getattr(args, field, defaults.get(field))
        if have != want:
            raise CheckpointError(f"{where}: args.{field} is {have!r}, expected {want!r} "
                                  f"(only LLaMA-style GPT checkpoints can be imported)")
    if float(_arg(args, "rotary_percent", default=1.0)) != 1.0:
        raise CheckpointError(f"{where}: args.rotary_percent is {args.rotary_percent}, "
                              f"expected 1.0")
    heads = args.num_attention_heads
    groups = args.num_query_groups if getattr(args, "group_query_attention", False) else heads
    kv = _arg(args, "kv_channels")
    try:
        return ModelConfig(
            num_layers=args.num_layers, hidden_size=args.hidden_size,
            ffn_hidden_size=args.ffn_hidden_size, num_attention_heads=heads,
            num_query_groups=groups,
            kv_channels=None if kv in (None, args.hidden_size // heads) else kv,
            vocab_size=vocab_size, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            seq_length=args.seq_length,
            max_position_embeddings=_arg(args, "max_position_embeddings",
                                         default=args.seq_length),
            rotary_base=float(_arg(args, "rotary_base", default=10000)),
            norm_eps=float(_arg(args, "norm_epsilon", "layernorm_epsilon", default=1e-5)),
            init_method_std=float(_arg(args, "init_method_std", default=0.02)))
    except (ConfigError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{where}: args do not describe a valid model ({e})") from None


def config_and_tokenizer(args, where: str, vocab_size: int | None,
                         tokenizer_model: str | None, make_vocab_size_divisible_by: int = 128
                         ) -> tuple[str | None, Config]:
    """(tokenizer path, our Config) from Megatron's args. The true vocabulary size comes from
    `vocab_size`, else args.vocab_size, else the tokenizer; failing all, Megatron's padded
    size (with a warning)."""
    tokenizer_path = tokenizer_model or _existing(_arg(args, "tokenizer_model"))
    vocab = vocab_size or _arg(args, "vocab_size")
    if vocab is None and tokenizer_path:
        from megacpt.checkpoint.hf import check_tokenizer

        vocab = check_tokenizer(tokenizer_path).get_piece_size()
    if vocab is None:
        vocab = _arg(args, "padded_vocab_size")
        if vocab is None:
            raise CheckpointError(f"{where}: args has neither vocab_size nor padded_vocab_size; "
                                  f"pass vocab_size (--vocab-size) or the tokenizer")
        log.warning("%s: true vocabulary size unknown (pass vocab_size or the tokenizer); "
                    "using Megatron's padded size %d", where, vocab)
    return tokenizer_path, Config(model=config_from_args(args, where, int(vocab),
                                                         make_vocab_size_divisible_by))


def repad_vocab(mcfg: ModelConfig, name: str, full: torch.Tensor, where: str) -> torch.Tensor:
    """Embedding/output rows re-padded from Megatron's padding to ours (other names as is)."""
    if name not in ("embedding.weight", "output.weight"):
        return full
    if full.shape[0] < mcfg.vocab_size:
        raise CheckpointError(f"{where}: {name} has {full.shape[0]} rows, fewer than the "
                              f"vocabulary size {mcfg.vocab_size}")
    out = full.new_zeros(mcfg.padded_vocab_size, mcfg.hidden_size)
    out[: mcfg.vocab_size] = full[: mcfg.vocab_size]
    return out


class MegatronSource(Source):
    """A Megatron-LM legacy checkpoint (weights only; the optimizer state is not imported)."""

    kind = "megatron"

    def __init__(self, path: str, vocab_size: int | None = None,
                 tokenizer_model: str | None = None, make_vocab_size_divisible_by: int = 128,
                 **_ignored):
        self.path = path
        d = _legacy_iter_dir(path)
        if d is None or not os.path.isdir(d):
            raise CheckpointError(f"{path}: tracker names no readable iteration directory")
        self.iter_dir = d
        grid = {}
        for e in os.listdir(d):
            m = _SHARD_RE.match(e)
            if m and os.path.isdir(os.path.join(d, e)):
                grid[(int(m.group(1)), int(m.group(2) or 0))] = os.path.join(d, e, FILE)
        tp = max(t for t, _ in grid) + 1
        pp = max(p for _, p in grid) + 1
        for t in range(tp):
            for p in range(pp):
                if (t, p) not in grid:
                    raise CheckpointError(f"{d}: shard {_shard_name(t, p, pp)} is missing "
                                          f"(found a tp{tp}pp{pp} layout)")
        self.tp, self.pp = tp, pp
        self.native_tp = None  # vocabulary re-padding: always go through full tensors
        sds = {k: load_legacy_file(f) for k, f in sorted(grid.items())}
        first = sds[(0, 0)]
        args = first.get("args")
        if args is None:
            raise CheckpointError(f"{grid[(0, 0)]}: has no 'args' (not a Megatron-LM checkpoint)")
        for k, want in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
            if getattr(args, k, want) != want:
                raise CheckpointError(f"{grid[(0, 0)]}: args.{k} = {getattr(args, k)} but the "
                                      f"directory holds {want} such shards")
        if "model" not in first:
            raise CheckpointError(f"{grid[(0, 0)]}: no 'model' entry (virtual-pipeline "
                                  f"checkpoints with model0, model1, ... are not supported)")
        self.tokenizer_path, self.cfg = config_and_tokenizer(
            args, grid[(0, 0)], vocab_size, tokenizer_model, make_vocab_size_divisible_by)
        self.iteration, self.state = 0, {}
        self._index(sds, grid)
        self.dtype = self._parts("embedding.weight")[0].dtype
        self.cfg.training.bf16 = self.dtype == torch.bfloat16

    def _index(self, sds: dict, grid: dict) -> None:
        """Map our global names to (pp stage, Megatron key) and check the tensors."""
        self._where: dict[str, tuple[int, str]] = {}
        self._sds = {k: v["model"] for k, v in sds.items()}
        offset = 0
        for p in range(self.pp):
            local = set()
            for key in self._sds[(0, p)]:
                m = _LAYER_RE.match(key)
                if m and m.group(2) in _LAYER_KEYS:
                    i = int(m.group(1))
                    local.add(i)
                    self._where[f"layers.{offset + i}.{_LAYER_KEYS[m.group(2)]}"] = (p, key)
                elif key in _TOP_KEYS:
                    self._where[_TOP_KEYS[key]] = (p, key)
                elif not _IGNORED.search(key):
                    raise CheckpointError(f"{grid[(0, p)]}: unexpected model tensor {key!r} "
                                          f"(biases or non-LLaMA layers cannot be imported)")
            offset += len(local)
        mcfg = self.cfg.model
        if offset != mcfg.num_layers:
            raise CheckpointError(f"{self.iter_dir}: shards hold {offset} layers but args."
                                  f"num_layers is {mcfg.num_layers}")
        for name in self.names():
            if name not in self._where:
                raise CheckpointError(f"{self.iter_dir}: no tensor for {name!r} in any shard")
            if name in ("embedding.weight", "output.weight"):
                continue
            parts = self._parts(name)
            have = tuple(sharding.full_shape(name, parts[0].shape, self.tp))
            if have != full_shape(mcfg, name):
                p, key = self._where[name]
                raise CheckpointError(f"{grid[(0, p)]}: {key} gives {name} shape {have}, the "
                                      f"args imply {full_shape(mcfg, name)}")

    def _parts(self, name: str) -> list[torch.Tensor]:
        p, key = self._where[name]
        return [self._sds[(t, p)][key] for t in range(self.tp)]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"{self.path}: the model has no parameter {name!r}")
        full = sharding.unshard(name, [t.clone() for t in self._parts(name)])
        return repad_vocab(self.cfg.model, name, full, self.path)

    def close(self) -> None:
        self._sds = {}


def _shard_name(t: int, p: int, pp: int) -> str:
    return f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")


def _existing(path):
    return path if path and os.path.isfile(path) else None
