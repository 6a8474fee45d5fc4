"""Save and resume training checkpoints; load weights from any layout or format.

- `save_checkpoint`: every rank calls it; writes the layout in `megacpt.checkpoint.format`
  (dp-rank-0 ranks write model/optimizer shards, every rank its RNG state, rank 0 the meta,
  the rename of `iter_*.tmp` and, after a barrier, the tracker).
- `load_checkpoint`: exact resume in the SAME (tp, pp) layout (dp may differ: shards do not
  depend on it); a different layout is an error that prints the conversion command.
- `load_weights`: weights only, from our checkpoint in any layout, a HuggingFace LLaMA
  directory or a Megatron-LM checkpoint, legacy or torch_dist (`--init-from`, continual
  pre-training).
- `load_model`: one single-device model from any of those, for evaluation and generation.
"""
from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import torch
import torch.distributed as dist

from megacpt.checkpoint import format as fmt
from megacpt.checkpoint import integrity
from megacpt.checkpoint.format import CheckpointError
from megacpt.checkpoint.format import load_plain
from megacpt.checkpoint.registry import open_source
from megacpt.checkpoint.safetensors_io import SafetensorsReader, load_tensors, save_tensors
from megacpt.config import Config
from megacpt.parallel.context import ParallelContext

log = logging.getLogger(__name__)


def _barrier(ctx: ParallelContext) -> None:
    if ctx.world_size > 1 and dist.is_initialized():
        dist.barrier()


def _agree(ctx: ParallelContext, error: Exception | None, what: str) -> None:
    """A barrier that also tells every rank whether any rank failed `what`: then each raises
    (naming the failed ranks) instead of the healthy ones waiting at the next barrier until
    the distributed timeout. One process: re-raise its own error unchanged."""
    if ctx.world_size == 1 or not dist.is_initialized():
        if isinstance(error, CheckpointError):
            raise error
        if error is not None:  # e.g. OSError: disk full, file-size limit, read-only
            raise CheckpointError(f"{what} failed: {type(error).__name__}: {error}; the "
                                  "previous checkpoint and the tracker are untouched") from error
        return
    flags = torch.zeros(ctx.world_size, device=ctx.device)
    flags[ctx.rank] = float(error is not None)
    dist.all_reduce(flags)
    failed = [r for r, f in enumerate(flags.tolist()) if f]
    if not failed:
        return
    mine = f"; here (rank {ctx.rank}): {type(error).__name__}: {error}" if error else ""
    raise CheckpointError(f"{what} failed on rank(s) {failed}{mine}; the previous checkpoint "
                          "and the tracker are untouched") from error


def split_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state dict -> ({"name/key": tensor}, everything else)."""
    tensors, rest_state = {}, {}
    for name, entry in sd.get("state", {}).items():
        if "/" in str(name):
            raise CheckpointError(f"optimizer state key {name!r} contains '/'; expected global "
                                  f"parameter names")
        for key, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{name}/{key}"] = v.detach().to("cpu").contiguous()
            else:
                rest_state.setdefault(name, {})[key] = v
    rest = {k: v for k, v in sd.items() if k != "state"}
    rest["state"] = rest_state
    return tensors, rest


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """Inverse of `split_optimizer_state`."""
    sd = {k: v for k, v in rest.items() if k != "state"}
    state = {name: dict(entry) for name, entry in rest.get("state", {}).items()}
    for k, t in tensors.items():
        name, _, key = k.rpartition("/")
        state.setdefault(name, {})[key] = t
    sd["state"] = state
    return sd


def save_checkpoint(save_dir: str, iteration: int, model, optimizer, cfg: Config,
                    ctx: ParallelContext, state: dict) -> str:
    """Save this rank's part of a checkpoint (collective: every rank must call it).

    `state`: {"scheduler": dict, "data": dict, "counters": dict, "rng": this rank's RNG
    state (any torch.save-able plain value)}; all but "rng" must be JSON values and go to
    meta.json. Returns the final iteration directory.
    """
    final = os.path.join(save_dir, fmt.iter_dirname(iteration))
    tmp = final + ".tmp"
    if ctx.rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        os.makedirs(os.path.join(tmp, fmt.RNG_DIR))
    _barrier(ctx)
    with_optim = optimizer is not None and not cfg.checkpoint.no_save_optim
    opt_sd = optimizer.state_dict() if with_optim else None  # collective under ZeRO-1
    error = None
    try:  # a rank that fails here (disk full, permissions) must not leave the others waiting
        dtype = _write_rank_files(tmp, iteration, model, opt_sd, ctx, state.get("rng"))
        if ctx.rank == 0:
            _write_meta(tmp, save_dir, iteration, dtype, opt_sd is not None, cfg, ctx, state)
    except Exception as e:  # noqa: BLE001 - reported to every rank by _agree
        error = e
    try:
        _agree(ctx, error, f"saving checkpoint {tmp}")
        digests = integrity.gather_checksums(tmp, ctx)  # collective: each rank hashes its files
        try:
            if ctx.rank == 0:
                integrity.record_checksums(tmp, digests)
        except Exception as e:  # noqa: BLE001 - reported to every rank by _agree
            error = e
        _agree(ctx, error, f"recording checksums in {tmp}")
    except CheckpointError:
        if ctx.rank == 0:  # every rank is past writing: free the space the partial save took
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if ctx.rank == 0:
        _publish(save_dir, tmp, final, iteration)
        log.info("saved checkpoint %s (%s)", final, ctx.layout)
    _barrier(ctx)
    return final


def _write_meta(tmp: str, save_dir: str, iteration: int, dtype: torch.dtype, with_optim: bool,
                cfg: Config, ctx: ParallelContext, state: dict) -> None:
    """Rank 0: meta.json (layout, dtype, resolved config, counters) and the tokenizer copy."""
    meta_state = {k: v for k, v in state.items() if k != "rng"}
    fmt.write_meta(tmp, iteration, ctx.tp, ctx.pp, ctx.dp, str(dtype).replace("torch.", ""),
                   with_optim, cfg.to_dict(), meta_state, vp=ctx.vp)
    tok = cfg.data.tokenizer_model
    if tok and os.path.isfile(tok) and not os.path.exists(os.path.join(save_dir, fmt.TOKENIZER)):
        shutil.copyfile(tok, os.path.join(save_dir, fmt.TOKENIZER))


def _write_rank_files(tmp: str, iteration: int, model, opt_sd: dict | None,
                      ctx: ParallelContext, rng) -> torch.dtype:
    """This rank's files: model/optimizer shard (dp rank 0 only) and its RNG state."""
    params = dict(model.named_parameters())
    if ctx.dp_rank == 0:
        shard = os.path.join(tmp, fmt.shard_dirname(ctx.tp_rank, ctx.pp_rank))
        os.makedirs(shard, exist_ok=True)
        save_tensors(os.path.join(shard, fmt.MODEL_FILE),
                     {n: p.detach().to("cpu").contiguous() for n, p in params.items()},
                     {"iteration": str(iteration), "layout": ctx.layout})
        if opt_sd is not None:
            tensors, rest = split_optimizer_state(opt_sd)
            save_tensors(os.path.join(shard, fmt.OPTIM_TENSORS), tensors)
            torch.save(rest, os.path.join(shard, fmt.OPTIM_REST))
    if rng is not None:
        torch.save(rng, os.path.join(tmp, fmt.rng_filename(ctx.rank)))
    return next(iter(params.values())).dtype


def _publish(save_dir: str, tmp: str, final: str, iteration: int) -> None:
    """Rename the complete temp directory into place, then point the tracker at it."""
    old = None
    if os.path.exists(final):  # re-saving an iteration: keep it until the new one is in
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    fmt.write_tracker(save_dir, iteration)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    for name in os.listdir(save_dir):  # temp dirs of saves killed mid-write
        if name.startswith("iter_") and name.endswith((".tmp", ".old")):
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)


def convert_command(load_dir: str, tp: int, pp: int) -> str:
    return (f"python tools/convert_checkpoint.py --load-dir {load_dir} "
            f"--save-dir {load_dir.rstrip('/')}_tp{tp}pp{pp} "
            f"--target-tensor-parallel-size {tp} --target-pipeline-parallel-size {pp}")


def _vp(vp: int) -> str:
    return f"vp{vp}" if vp > 1 else ""


def load_checkpoint(load_dir: str, model, optimizer, cfg: Config,
                    ctx: ParallelContext) -> tuple[int, dict]:
    """Exact resume: fill model (and optimizer) from the checkpoint; (iteration, state).

    state["rng"] is this rank's saved RNG state, or None when there is none for this rank
    (e.g. after a layout conversion or with a different world size).
    """
    iter_dir = fmt.resolve_iter_dir(load_dir)
    if cfg.checkpoint.verify_checksums:
        integrity.verify_for_rank(iter_dir, ctx)
    meta = fmt.read_meta(iter_dir)
    meta_path = os.path.join(iter_dir, fmt.META)
    tp, pp = int(meta["layout"]["tp"]), int(meta["layout"]["pp"])
    vp = int(meta["layout"].get("vp", 1))
    if (tp, pp, vp) != (ctx.tp, ctx.pp, ctx.vp):
        raise CheckpointError(
            f"{iter_dir} was saved in layout tp{tp}pp{pp}{_vp(vp)} but this run is "
            f"tp{ctx.tp}pp{ctx.pp}{_vp(ctx.vp)}; " + (
                f"convert it first: {convert_command(load_dir, ctx.tp, ctx.pp)}"
                if ctx.vp == 1 else "resume with the virtual stages it was saved with, or "
                "start from its weights with --init-from"))
    fmt.check_same_model(fmt.config_from_meta(meta, meta_path).model, cfg.model, iter_dir)
    shard = os.path.join(iter_dir, fmt.shard_dirname(ctx.tp_rank, ctx.pp_rank))
    _load_shard(os.path.join(shard, fmt.MODEL_FILE), model)
    if optimizer is not None:
        if not meta.get("has_optimizer"):
            raise CheckpointError(f"{meta_path}: the checkpoint has no optimizer state (saved "
                                  f"with --no-save-optim or converted with --no-optimizer); "
                                  f"start from it with --init-from instead of --load")
        tensors = _read_tensors(os.path.join(shard, fmt.OPTIM_TENSORS))
        rest = load_plain(os.path.join(shard, fmt.OPTIM_REST))
        optimizer.load_state_dict(join_optimizer_state(tensors, rest))
    state = dict(meta["state"])
    state["rng"] = None
    rng_path = os.path.join(iter_dir, fmt.rng_filename(ctx.rank))
    saved_world = tp * pp * int(meta["layout"].get("dp", 1))
    if saved_world == ctx.world_size and os.path.isfile(rng_path):
        state["rng"] = _load_rng(rng_path)
    else:
        log.info("no RNG state for rank %d in %s; keeping the current RNG", ctx.rank, iter_dir)
    return int(meta["iteration"]), state


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_tensors(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _load_shard(path: str, model) -> None:
    try:
        reader = SafetensorsReader(path)
    except ValueError as e:
        raise CheckpointError(f"{e} (missing or damaged shard)") from None
    with reader, torch.no_grad():
        params = dict(model.named_parameters())
        extra = [k for k in reader.keys() if k not in params]
        if extra:
            raise CheckpointError(f"{path}: holds tensors the model does not have: {extra[:3]}")
        for name, p in params.items():
            if name not in reader:
                raise CheckpointError(f"{path}: missing tensor {name!r}")
            if tuple(reader.shape(name)) != tuple(p.shape):
                raise CheckpointError(f"{path}: tensor {name!r} has shape "
                                      f"{tuple(reader.shape(name))}, the model expects "
                                      f"{tuple(p.shape)}")
            p.copy_(reader.get(name))


def _load_rng(path: str):
    """RNG states may hold numpy arrays (numpy's MT19937 state): allow exactly those."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    safe = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(safe):
        return load_plain(path)


def load_weights(path: str, model, ctx: ParallelContext | None = None, *, verify: bool = True,
                 **source_options) -> None:
    """Fill `model` (this rank's stage and tp shard) with weights from `path`: our checkpoint
    in any layout, a HuggingFace LLaMA directory or a Megatron-LM checkpoint (legacy or
    torch_dist). `verify`: check our checkpoints' recorded checksums first."""
    ctx = ctx or model.ctx
    source_options.setdefault("make_vocab_size_divisible_by",
                              model.cfg.make_vocab_size_divisible_by)  # for HF / Megatron
    with open_source(path, **source_options) as src, torch.no_grad():
        if verify and src.kind == "megacpt":
            integrity.verify_model_files(src.iter_dir, src.tp, src.pp)
        fmt.check_same_model(src.cfg.model, model.cfg, f"{path} ({src.kind})")
        for name, p in model.named_parameters():
            part = src.get_shard(name, ctx.tp, ctx.tp_rank)
            if tuple(part.shape) != tuple(p.shape):
                raise CheckpointError(f"{path}: {name!r} gives shape {tuple(part.shape)} at "
                                      f"tp{ctx.tp}, the model expects {tuple(p.shape)}")
            p.copy_(part)
    log.info("loaded weights from %s (%s checkpoint)", path, src.kind)


def load_model(path: str, device="cpu", dtype: torch.dtype | None = None, **source_options):
    """A single-device `LlamaModel` (eval mode) from any checkpoint `load_weights` reads.

    `model(tokens [b, s])` gives logits `[b, s, vocab]` over the unpadded vocabulary.
    `model.tokenizer_path` names the checkpoint's SentencePiece model, or is None.
    """
    from megacpt.model.llama import LlamaModel

    with open_source(path, **source_options) as src:
        mcfg = src.cfg.model
        ctx = ParallelContext.single(device)
        model = LlamaModel(mcfg, ctx, dtype=dtype or src.dtype, device=device, seed=None)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(src.get(name))
        model.tokenizer_path = src.tokenizer_path
    model.eval()
    return model

