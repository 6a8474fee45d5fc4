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

Model keys: Megatron-Core names (`decoder.layers.{i}.` with i local to the stage) or the
older `language_model.encoder.layers.{i}.` names, mapped to ours by the `megatron` column of
the parameter table (`megacpt.params`; maps built in `megatron_common`), e.g.

    embedding.word_embeddings.weight                          -> embedding.weight
    self_attention.linear_qkv.weight | self_attention.query_key_value.weight
                                                              -> layers.g.attention.qkv.weight
    mlp.linear_fc1.weight | mlp.dense_h_to_4h.weight          -> layers.g.mlp.gate_up.weight
    output_layer.weight                                       -> output.weight

The fused QKV (interleaved per query group) and fc1 (each rank `[gate_r; up_r]`) are split over
tp exactly like ours, so shards are unsharded with `megacpt.parallel.sharding`. Megatron pads
the vocabulary to a multiple of make_vocab_size_divisible_by x tp; the true vocabulary size
comes from `vocab_size=`, `args.vocab_size`, or the tokenizer, and rows are re-padded ours.
"""
from __future__ import annotations

import logging
import os
import re

import torch

from megacpt.checkpoint.format import CheckpointError, full_shape
from megacpt.checkpoint.megatron_common import (IGNORED, LAYER_RE, config_and_tokenizer,
                                                layer_keys, legacy_iter_dir, load_legacy_file,
                                                repad_vocab, top_keys)
from megacpt.checkpoint.source import Source
from megacpt.parallel import sharding

log = logging.getLogger(__name__)

FILE = "model_optim_rng.pt"
_SHARD_RE = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?$")



def is_megatron_legacy(path: str) -> bool:
    d = legacy_iter_dir(path)
    if not d or not os.path.isdir(d):
        return False
    return any(_SHARD_RE.match(e) and os.path.isfile(os.path.join(d, e, FILE))
               for e in os.listdir(d))


class MegatronSource(Source):
    """A Megatron-LM legacy checkpoint (weights only; the optimizer state is not imported)."""

    kind = "megatron"

    def __init__(self, path: str, vocab_size: int | None = None,
                 tokenizer_model: str | None = None, make_vocab_size_divisible_by: int = 128,
                 **_ignored):
        self.path = path
        d = legacy_iter_dir(path)
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
        layer_map, top_map = layer_keys(), top_keys()
        for p in range(self.pp):
            local = set()
            for key in self._sds[(0, p)]:
                m = LAYER_RE.match(key)
                if m and m.group(2) in layer_map:
                    i = int(m.group(1))
                    local.add(i)
                    self._where[f"layers.{offset + i}.{layer_map[m.group(2)]}"] = (p, key)
                elif key in top_map:
                    self._where[top_map[key]] = (p, key)
                elif not IGNORED.search(key):
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
