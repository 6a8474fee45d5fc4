"""The `Source` base: a model config plus full tensors by global parameter name.

A `Source` hides where tensors come from; one module per format implements it (ours:
`reader.MegacptSource`; `hf.HFSource`; `megatron_legacy.MegatronSource`;
`megatron_dist.MegatronDistSource`) and `registry.open_source(path)` picks one from what a
directory contains. This base knows no format. Every source answers in our parameter names and
layout (the table in `megacpt.params`: fused per-group QKV, fused gate-up, vocabulary padded
to the multiple), one tensor at a time, so converters stream: memory holds about one full
tensor, never the model.
"""
from __future__ import annotations

import abc

import torch

from megacpt import params
from megacpt.checkpoint.format import CheckpointError
from megacpt.config import Config
from megacpt.parallel import sharding


class Source(abc.ABC):
    """Base: a model config plus full tensors by global parameter name."""

    kind = "?"
    path: str
    cfg: Config
    dtype: torch.dtype
    iteration: int = 0
    state: dict = {}
    tokenizer_path: str | None = None
    has_optimizer: bool = False
    #: tp size the tensors are stored split into (get_shard at this tp is a plain read)
    native_tp: int | None = None
    #: data-parallel size of the run that saved it (informational; shards do not depend on it)
    dp: int = 1
    #: get_shard / optimizer_get_shard read only the part asked for, in any tp (no full tensor)
    reads_slices: bool = False

    def names(self) -> list[str]:
        return params.param_names(self.cfg.model)

    @abc.abstractmethod
    def get(self, name: str) -> torch.Tensor:
        """The full tensor of parameter `name` (padded vocabulary)."""

    def get_shard(self, name: str, tp: int, tp_rank: int) -> torch.Tensor:
        """One tp rank's part of parameter `name` in a tp-way layout."""
        return sharding.shard(name, self.get(name), tp_rank, tp).contiguous()

    # optimizer state (only our own checkpoints have it)
    def optimizer_entries(self, name: str) -> list[tuple[str, torch.dtype, bool, tuple]]:
        """[(key, dtype, sharded_like_param, shape)]; shape is full when sharded."""
        return []

    def optimizer_get(self, name: str, key: str) -> torch.Tensor:
        raise CheckpointError(f"{self.path}: a {self.kind} checkpoint has no optimizer state")

    def optimizer_get_shard(self, name: str, key: str, tp: int, tp_rank: int) -> torch.Tensor:
        """One tp rank's part of an optimizer state tensor (see `optimizer_entries`)."""
        full = self.optimizer_get(name, key)
        local = [e for e in self.optimizer_entries(name) if e[0] == key][0]
        return sharding.shard(name, full, tp_rank, tp).contiguous() if local[2] else full

    def optimizer_rest(self) -> dict:
        return {}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
