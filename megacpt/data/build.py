"""Build the training blend and the named validation sets from Megatron-style flags.

    train, valid = build_train_valid_datasets(
        ["0.7", "data/zh_text_document", "0.3", "data/en_text_document"], split="969,30,1",
        valid_data_path={"zh": "data/zh_valid_text_document", "en": "..."},
        seq_length=2048, train_samples=train_iters * global_batch_size, eval_samples=None,
        seed=1234, cache_dir="runs/x/index-cache", rank_builds=(rank == 0),
        barrier=torch.distributed.barrier if distributed else None,
        data_state=checkpoint.get("data"))
    # train: BlendedDataset; valid: {"zh": GPTDataset, "en": GPTDataset}

Training samples come from each prefix's train split. Validation sets are fixed held-out
tokens, identical for every model and seed: the `valid_data_path` sets when given (their
whole documents), otherwise each training prefix's valid split, named like the training
dataset. Validation sets are not shuffled and never repeat: `eval_samples` (None = all)
is capped at one pass. `data_state` is a blend `state_dict()` from a checkpoint: member
datasets are sized for the resume and the blend continues each dataset where it stopped
(see `megacpt.data.blend`).
"""
from __future__ import annotations

import logging
from typing import Callable

from megacpt.data.blend import BlendedDataset, parse_named_data_path, required_samples
from megacpt.data.blend import split_name
from megacpt.data.gpt_dataset import GPTDataset, split_ranges
from megacpt.data.indexed import IndexedDataset

logger = logging.getLogger(__name__)


def _valid_sets(valid_data_path) -> list[tuple[str, str]]:
    """[(name, prefix)] from a {name: prefix} dict or `name=PREFIX` words."""
    if valid_data_path is None:
        return []
    if isinstance(valid_data_path, dict):
        return list(valid_data_path.items())
    return [split_name(w) for w in valid_data_path]


def build_valid_dataset(name: str, indexed: IndexedDataset, documents, seq_length: int,
                        eval_samples: int | None, cache_dir, rank_builds, barrier):
    """Unshuffled single pass over `documents`, truncated to `eval_samples` samples."""
    ds = GPTDataset(indexed, name, documents, None, seq_length, seed=0, cache_dir=cache_dir,
                    rank_builds=rank_builds, barrier=barrier, shuffle=False)
    if eval_samples is not None and eval_samples < len(ds):
        ds.limit = int(eval_samples)
    elif eval_samples is not None and eval_samples > len(ds):
        logger.info("validation set %s holds %d samples (< eval_samples %d); using all",
                    name, len(ds), eval_samples)
    return ds


def build_train_valid_datasets(data_path_words: list[str] | str, split: str,
                               valid_data_path: dict[str, str] | list[str] | None,
                               seq_length: int, train_samples: int,
                               eval_samples: int | None, seed: int, cache_dir: str | None,
                               rank_builds: bool = True,
                               barrier: Callable[[], None] | None = None,
                               data_state: dict | None = None):
    """(train BlendedDataset, {name: validation GPTDataset}); see module doc."""
    entries = parse_named_data_path(data_path_words)
    weights = {name: w for name, w, _ in entries}
    need = required_samples(weights, train_samples, data_state)
    members, valid = {}, {}
    for name, _, prefix in entries:
        indexed = IndexedDataset(prefix)
        (tr0, tr1), (va0, va1), _ = split_ranges(split, len(indexed))
        if tr1 <= tr0 and weights[name] > 0:
            raise ValueError(f"--split {split}: the train split of {prefix} "
                             f"({len(indexed)} documents) is empty")
        members[name] = GPTDataset(indexed, name, (tr0, tr1), need[name], seq_length, seed,
                                   cache_dir, rank_builds=rank_builds, barrier=barrier)
        if not valid_data_path and va1 > va0:
            valid[name] = build_valid_dataset(name, indexed, (va0, va1), seq_length,
                                              eval_samples, cache_dir, rank_builds, barrier)
    for name, prefix in _valid_sets(valid_data_path):
        indexed = IndexedDataset(prefix)
        valid[name] = build_valid_dataset(name, indexed, (0, len(indexed)), seq_length,
                                          eval_samples, cache_dir, rank_builds, barrier)
    train = BlendedDataset(members, weights, train_samples, state=data_state)
    logger.info("train blend %s: %d samples; validation sets %s", train.weights,
                train_samples, {n: len(v) for n, v in valid.items()})
    return train, valid
