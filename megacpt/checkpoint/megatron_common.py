"""Helpers shared by the Megatron-LM importers (`megatron_legacy`, `megatron_dist`).

- reading Megatron's pickles (`model_optim_rng.pt`, a torch_dist checkpoint's `common.pt`)
  with `torch.load(weights_only=True)` and an allow-list (`load_legacy_file`)
- the iteration directory a Megatron save dir's tracker names (`legacy_iter_dir`)
- our ModelConfig from Megatron's `args` (`config_from_args`, `config_and_tokenizer`)
- vocabulary re-padding from Megatron's padding to ours (`repad_vocab`)
- the key maps, derived from the `megatron` column of the parameter table (`megacpt.params`):
  Megatron-Core names (`decoder.layers.{i}.self_attention.linear_qkv.weight`, ...) and the
  older `language_model.encoder.layers.{i}.` / `language_model.embedding.` forms
"""
from __future__ import annotations

import argparse
import logging
import os
import re

import numpy as np
import torch

from megacpt import params
from megacpt.checkpoint.format import CheckpointError
from megacpt.config import Config, ConfigError, ModelConfig

log = logging.getLogger(__name__)

#: per-layer keys, `decoder.layers.{i}.<leaf>` or `language_model.encoder.layers.{i}.<leaf>`
LAYER_RE = re.compile(r"(?:language_model\.encoder|decoder)\.layers\.(\d+)\.(.+)$")
#: tensors that are no parameters (TransformerEngine extra state, rotary tables)
IGNORED = re.compile(r"(_extra_state|rotary_pos_emb\.inv_freq)$")


def _legacy_form(key: str) -> str:
    """The pre-Megatron-Core name of a top-level key."""
    if key.startswith("decoder."):
        return "language_model.encoder." + key.removeprefix("decoder.")
    return "language_model." + key


def layer_keys() -> dict[str, str]:
    """{Megatron layer leaf name: our layer leaf name}, e.g. {"mlp.linear_fc2.weight":
    "mlp.down.weight"}, from the parameter table."""
    out = {}
    for spec in params.TABLE:
        if spec.stage == params.LAYER:
            ours = spec.template.split("{i}.", 1)[1]
            for key in spec.megatron:
                out[key.split("{i}.", 1)[1]] = ours
    return out


def top_keys() -> dict[str, str]:
    """{Megatron key: our name} of the parameters outside the layers, both name forms."""
    out = {}
    for spec in params.TABLE:
        if spec.stage != params.LAYER:
            for key in spec.megatron:
                out[key] = out[_legacy_form(key)] = spec.template
    return out


def expected_key(name: str, stacked: bool = False) -> str:
    """Megatron's preferred key of our parameter `name` (for error messages)."""
    key = params.megatron_keys(name)[0]
    return re.sub(r"layers\.\d+\.", "layers.", key) if stacked else key


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


def legacy_iter_dir(path: str) -> str | None:
    tracker = os.path.join(path, "latest_checkpointed_iteration.txt")
    if os.path.isfile(tracker):
        text = open(tracker).read().strip()
        sub = "release" if text == "release" else (f"iter_{int(text):07d}"
                                                   if text.isdigit() else None)
        return os.path.join(path, sub) if sub else None
    return path


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

        vocab = check_tokenizer(tokenizer_path).vocab_size
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




def _existing(path):
    return path if path and os.path.isfile(path) else None
