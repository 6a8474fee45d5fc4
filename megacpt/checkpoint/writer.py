"""Write a checkpoint in any (tp, pp) layout from a `Source`, streaming one tensor at a time.

Every output shard file (`model.safetensors`, `optimizer.safetensors` of each (tp, pp) rank)
is opened up front with its complete header (the shapes are known from the config), then the
parameters are visited in model order: each full tensor is read once from the source, split
for the target tp ranks, written, and dropped. Peak memory is about the largest full tensor
plus its shards (the embedding, or one layer's MLP), independent of the model's depth.

The output goes to a temporary directory beside `save_dir` and is renamed only when complete
(see `format.atomic_output_dir`); the directory layout is documented in `format`. Its meta.json
records every file's checksum like a trainer save (`integrity.record_all`), so the result
loads verified; a source checkpoint of ours is verified before it is read (`verify`), so a
corrupt file is refused instead of being carried into the output under fresh checksums.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from typing import Callable

import torch

from megacpt.checkpoint import format as fmt
from megacpt.checkpoint import integrity
from megacpt.checkpoint.format import CheckpointError
from megacpt.checkpoint.reader import split_rest
from megacpt.checkpoint.source import Source
from megacpt.checkpoint.safetensors_io import SafetensorsWriter
from megacpt.config import Config
from megacpt.data.tokenizer import copy_tokenizer
from megacpt.parallel import sharding

log = logging.getLogger(__name__)

#: optional per-parameter hook: (name, full tensor) -> replacement full tensor
Transform = Callable[[str, torch.Tensor], torch.Tensor]


def write_checkpoint(source: Source, save_dir: str, tp: int, pp: int, *,
                     with_optimizer: bool = True, dtype: torch.dtype | None = None,
                     model_cfg=None, transform: Transform | None = None,
                     extra_files: dict[str, bytes] | None = None,
                     iteration: int | None = None, state: dict | None = None,
                     progress: bool = True, verify: bool = True) -> str:
    """Write `source` to `save_dir` in layout tp x pp; returns the iteration directory.

    `model_cfg` replaces the source's model config (e.g. a grown vocabulary, with `transform`
    producing the matching tensors); `dtype` casts the parameters (not the optimizer state);
    `extra_files` {name: bytes} are written into `save_dir` (after the source's tokenizer,
    so {"tokenizer.model": ...} or {"tokenizer.json": ...} replaces it); `iteration` and
    `state` replace the source's (a new model, e.g. a grown vocabulary, starts at iteration 0
    with an empty state). `verify`: check the recorded checksums of a source checkpoint of
    ours first.
    """
    if verify:
        verify_source(source)
    cfg = Config.from_dict(source.cfg.to_dict())
    if model_cfg is not None:
        cfg.model = model_cfg
    fmt.check_layout(cfg.model, tp, pp)
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    out_dtype = dtype or source.dtype
    if dtype is not None:
        cfg.training.bf16 = dtype == torch.bfloat16
    with_optimizer = with_optimizer and source.has_optimizer
    if with_optimizer and transform is not None:
        raise CheckpointError("optimizer state cannot be carried through a tensor transform; "
                              "pass --no-optimizer")
    with fmt.atomic_output_dir(save_dir) as tmp:
        iteration = source.iteration if iteration is None else iteration
        iter_dir = os.path.join(tmp, fmt.iter_dirname(iteration))
        _write_shards(source, iter_dir, cfg.model, tp, pp, out_dtype, with_optimizer,
                      transform, progress)
        fmt.write_meta(iter_dir, iteration, tp, pp, source.dp, str(out_dtype).replace("torch.", ""),
                       with_optimizer, cfg.to_dict(),
                       dict(source.state if state is None else state))
        integrity.record_all(iter_dir)
        if source.tokenizer_path:
            copy_tokenizer(source.tokenizer_path, tmp)
        for fname, data in (extra_files or {}).items():
            with open(os.path.join(tmp, fname), "wb") as f:
                f.write(data)
        fmt.write_tracker(tmp, iteration)
    return os.path.join(save_dir, fmt.iter_dirname(iteration))


def verify_source(source: Source) -> None:
    """Refuse a checkpoint of ours whose files do not match their recorded checksums (the
    message names the file); other formats record none."""
    if source.kind == "megacpt":
        integrity.verify_all(source.iter_dir)


def _write_shards(source: Source, iter_dir: str, mcfg, tp: int, pp: int, dtype: torch.dtype,
                  with_optimizer: bool, transform: Transform | None, progress: bool) -> None:
    stage_names = {p: fmt.stage_param_names(mcfg, pp, p) for p in range(pp)}
    stage_of = {n: p for p, names in stage_names.items() for n in names}
    opt_entries = {n: source.optimizer_entries(n) for n in stage_of} if with_optimizer else {}
    with ExitStack() as stack:
        models, optims = {}, {}
        for p, names in stage_names.items():
            for t in range(tp):
                d = os.path.join(iter_dir, fmt.shard_dirname(t, p))
                os.makedirs(d)
                entries = [(n, dtype, fmt.local_shape(mcfg, n, tp)) for n in names]
                models[(t, p)] = stack.enter_context(
                    SafetensorsWriter(os.path.join(d, fmt.MODEL_FILE), entries))
                if with_optimizer:
                    oe = [(f"{n}/{k}", dt, fmt.local_shape(mcfg, n, tp) if sh else shape)
                          for n in names for k, dt, sh, shape in opt_entries[n]]
                    optims[(t, p)] = stack.enter_context(
                        SafetensorsWriter(os.path.join(d, fmt.OPTIM_TENSORS), oe))
        for name in progress_iter(fmt.param_names(mcfg), progress, f"writing tp{tp}pp{pp}"):
            # (a tied embedding under pp > 1 is held by the first and the last stage)
            stages = [p for p, names in stage_names.items() if name in names]
            writers = [models[(t, p)] for p in stages for t in range(tp)]
            _write_param(source, name, writers, dtype, transform, tp)
            for key, _, sharded, _ in opt_entries.get(name, []):
                _write_optim(source, name, key, sharded,
                             [optims[(t, p)] for p in stages for t in range(tp)], tp)
    if with_optimizer:
        rest = source.optimizer_rest()
        for p, names in stage_names.items():
            part = split_rest(rest, names)
            for t in range(tp):
                torch.save(part, os.path.join(iter_dir, fmt.shard_dirname(t, p), fmt.OPTIM_REST))


def _write_param(source: Source, name: str, writers: list, dtype: torch.dtype,
                 transform: Transform | None, tp: int) -> None:
    """One parameter to its tp shards (writers: tp per stage holding it, in tp order); the
    full tensor dies when this returns."""
    if transform is None and (source.native_tp == tp or source.reads_slices):
        # shards as stored, or read part by part (the same reads as a resharding --load)
        for k, w in enumerate(writers):
            w.write(name, source.get_shard(name, tp, k % tp).to(dtype))
        return
    full = source.get(name)
    if transform is not None:
        full = transform(name, full)
    for k, w in enumerate(writers):
        w.write(name, sharding.shard(name, full, k % tp, tp).to(dtype))


def _write_optim(source: Source, name: str, key: str, sharded: bool, writers: list,
                 tp: int) -> None:
    if source.native_tp == tp or source.reads_slices:
        for k, w in enumerate(writers):
            w.write(f"{name}/{key}", source.optimizer_get_shard(name, key, tp, k % tp))
        return
    full = source.optimizer_get(name, key)
    for k, w in enumerate(writers):
        w.write(f"{name}/{key}", sharding.shard(name, full, k % tp, tp) if sharded else full)


def progress_iter(items, enabled: bool, desc: str):
    """tqdm when available and enabled, else a log line every ~10% with rate and ETA."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit="tensor")
    except ImportError:
        return _log_progress(items, desc)


def _log_progress(items, desc):
    start, n = time.time(), len(items)
    for i, x in enumerate(items):
        yield x
        if (i + 1) % max(1, n // 10) == 0:
            el = time.time() - start
            rate = (i + 1) / max(el, 1e-9)
            log.info("%s: %d/%d tensors, %.1f/s, ETA %.0fs", desc, i + 1, n, rate,
                     (n - i - 1) / rate)
