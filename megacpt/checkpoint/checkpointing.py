"""Save and resume training checkpoints; load weights from any layout or format.

- `save_checkpoint`: every rank calls it; writes the layout in `megacpt.checkpoint.format`
  (dp-rank-0 ranks write model/optimizer shards, every rank its RNG state, rank 0 the meta,
  the rename of `iter_*.tmp` and, after a barrier, the tracker).
- `load_checkpoint`: exact resume from any (tp, pp, dp) layout, ZeRO-1 or not; each rank
  reads only the slices of the saved shards it needs (resharding on load).
- `load_weights`: weights only, from our checkpoint in any layout, a HuggingFace LLaMA
  directory or a Megatron-LM checkpoint, legacy or torch_dist (`--init-from`, continual
  pre-training).
- `load_model`: one single-device model from any of those, for evaluation and generation.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from megacpt.checkpoint import format as fmt
from megacpt.checkpoint import integrity
from megacpt.checkpoint.format import CheckpointError
from megacpt.checkpoint.format import load_plain
from megacpt.checkpoint.reader import MegacptSource, split_rest
from megacpt.checkpoint.registry import open_source
from megacpt.checkpoint.safetensors_io import save_tensors
from megacpt.config import Config
from megacpt.data.tokenizer import copy_tokenizer, find_tokenizer
from megacpt.parallel.context import ParallelContext

log = logging.getLogger(__name__)


def _barrier(ctx: ParallelContext) -> None:
    if ctx.world_size > 1 and dist.is_initialized():
        dist.barrier()


def agree_on_errors(ctx: ParallelContext, error: Exception | None, what: str) -> None:
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


def _plain_cpu(t: torch.Tensor, key: str) -> torch.Tensor:
    """A CPU tensor with t's values (t itself when it is already on the CPU)."""
    return t.detach().to("cpu").contiguous()


def split_optimizer_state(sd: dict, to_cpu: Callable = _plain_cpu
                          ) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state dict -> ({"name/key": tensor}, everything else)."""
    tensors, rest_state = {}, {}
    for name, entry in sd.get("state", {}).items():
        if "/" in str(name):
            raise CheckpointError(f"optimizer state key {name!r} contains '/'; expected global "
                                  f"parameter names")
        for key, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{name}/{key}"] = to_cpu(v, f"optim/{name}/{key}")
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


@dataclass
class Snapshot:
    """What one rank writes for one checkpoint, already copied off the live model/optimizer
    (so training may go on while it is written: `--async-save`)."""

    save_dir: str
    iteration: int
    tmp: str  # iter_*.tmp, renamed to `final` when complete
    final: str
    rank: int
    layout: str
    params: dict[str, torch.Tensor]  # CPU; empty unless dp rank 0
    dtype: torch.dtype
    optim: tuple[dict, dict] | None  # (tensors, rest); dp rank 0 with optimizer state only
    rng: object
    meta: dict | None  # rank 0: fmt.write_meta keyword arguments
    tokenizer: str | None
    keep_last: int | None
    shard_dir: str | None = None  # dp rank 0: where params/optim go

    def nbytes(self) -> int:
        tensors = list(self.params.values()) + (list(self.optim[0].values()) if self.optim else [])
        return sum(t.numel() * t.element_size() for t in tensors)


class SnapshotBuffers:
    """CPU buffers reused by every snapshot of a run (pinned when the tensors are on a GPU):
    a snapshot is a copy into them, not an allocation. One save at a time may use them.

    `prepare` allocates them ahead of the first save and touches their pages in a background
    thread (a fresh buffer pays a page fault per 4 KiB page on first touch: on the CPU that
    is most of a first snapshot's time)."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}
        self._cuda = False
        self._prefault: threading.Thread | None = None

    def _buffer(self, key: str, shape: tuple, dtype: torch.dtype, cuda: bool) -> torch.Tensor:
        buf = self._bufs.get(key)
        if buf is None or tuple(buf.shape) != tuple(shape) or buf.dtype != dtype:
            buf = torch.empty(shape, dtype=dtype, device="cpu", pin_memory=cuda)
            self._bufs[key] = buf
        self._cuda |= cuda
        return buf

    def prepare(self, specs: dict[str, tuple[tuple, torch.dtype]], cuda: bool) -> None:
        """Allocate the buffers {key: (shape, dtype)} now; their pages are touched in a
        background thread that the first snapshot waits for (if it is still running)."""
        self._wait()
        bufs = [self._buffer(k, shape, dtype, cuda) for k, (shape, dtype) in specs.items()]

        def touch():
            for b in bufs:  # zero_ releases the GIL: training goes on meanwhile
                b.zero_()
        self._prefault = threading.Thread(target=touch, daemon=True, name="snapshot-prefault")
        self._prefault.start()

    def _wait(self) -> None:
        if self._prefault is not None:
            self._prefault.join()
            self._prefault = None

    def __call__(self, t: torch.Tensor, key: str) -> torch.Tensor:
        self._wait()
        buf = self._buffer(key, tuple(t.shape), t.dtype, t.is_cuda)
        buf.copy_(t.detach(), non_blocking=t.is_cuda)
        return buf

    def synchronize(self) -> None:
        """One sync for all the non_blocking device-to-host copies of a snapshot."""
        if self._cuda:
            torch.cuda.synchronize()


def snapshot_specs(model, optimizer, cfg: Config, ctx: ParallelContext
                   ) -> dict[str, tuple[tuple, torch.dtype]]:
    """{buffer key: (shape, dtype)} of what `snapshot_checkpoint` copies on this rank (no
    collective): the parameters and, unless `state_dict()` already returns copies on the
    CPU, the optimizer state."""
    if ctx.dp_rank != 0:
        return {}
    named = dict(model.named_parameters())
    specs = {n: (tuple(p.shape), p.dtype) for n, p in named.items()}
    cuda = any(p.is_cuda for p in named.values())
    if optimizer is not None and not cfg.checkpoint.no_save_optim and \
            (cuda or not optimizer.state_dict_is_a_copy):
        for name, entry in optimizer.state_spec().items():
            for key, spec in entry.items():
                specs[f"optim/{name}/{key}"] = spec
    return specs


def snapshot_checkpoint(save_dir: str, iteration: int, model, optimizer, cfg: Config,
                        ctx: ParallelContext, state: dict,
                        buffers: SnapshotBuffers | None = None) -> Snapshot:
    """Collective first half of a save: prepare `iter_*.tmp`, gather the optimizer state
    (ZeRO-1: over dp) and take this rank's part off the model. Without `buffers` the CPU
    tensors may alias the live ones (write them before the next step)."""
    final = os.path.join(save_dir, fmt.iter_dirname(iteration))
    tmp = final + ".tmp"
    if ctx.rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        os.makedirs(os.path.join(tmp, fmt.RNG_DIR))
    _barrier(ctx)
    with_optim = optimizer is not None and not cfg.checkpoint.no_save_optim
    opt_sd = optimizer.state_dict() if with_optim else None  # collective under ZeRO-1
    to_cpu = buffers or _plain_cpu
    named = dict(model.named_parameters())
    params, optim, shard_dir = {}, None, None
    if ctx.dp_rank == 0:
        shard_dir = os.path.join(tmp, fmt.shard_dirname(ctx.tp_rank, ctx.pp_rank))
        params = {n: to_cpu(p, n) for n, p in named.items()}
        if opt_sd is not None:
            # ZeRO-1's state_dict() gathered into new memory: on the CPU nothing to copy
            opt_to_cpu = to_cpu if buffers is None or not optimizer.state_dict_is_a_copy \
                else (lambda t, key: buffers(t, key) if t.is_cuda else _plain_cpu(t, key))
            optim = split_optimizer_state(opt_sd, opt_to_cpu)
    if buffers is not None:
        buffers.synchronize()
    meta = None
    if ctx.rank == 0:
        dtype = next(iter(named.values())).dtype
        meta = dict(iteration=iteration, tp=ctx.tp, pp=ctx.pp, dp=ctx.dp, vp=ctx.vp,
                    dtype=str(dtype).replace("torch.", ""), has_optimizer=opt_sd is not None,
                    config=cfg.to_dict(),
                    state=fmt.json_safe({k: v for k, v in state.items() if k != "rng"},
                                        "state"))
    return Snapshot(save_dir, iteration, tmp, final, ctx.rank, ctx.layout, params,
                    next(iter(named.values())).dtype, optim, copy.deepcopy(state.get("rng")),
                    meta, cfg.data.tokenizer_model, cfg.checkpoint.keep_last_checkpoints,
                    shard_dir)


def write_snapshot(snap: Snapshot) -> list[str]:
    """This rank's files of a snapshot (rank 0 also meta.json and the tokenizer copy); no
    collectives, so it may run in a background thread. Returns the paths (relative to
    `snap.tmp`) of the files this rank owns for checksums (all but meta.json)."""
    if snap.shard_dir is not None:
        os.makedirs(snap.shard_dir, exist_ok=True)
        save_tensors(os.path.join(snap.shard_dir, fmt.MODEL_FILE), snap.params,
                     {"iteration": str(snap.iteration), "layout": snap.layout})
        if snap.optim is not None:
            tensors, rest = snap.optim
            save_tensors(os.path.join(snap.shard_dir, fmt.OPTIM_TENSORS), tensors)
            torch.save(rest, os.path.join(snap.shard_dir, fmt.OPTIM_REST))
    if snap.rng is not None:
        torch.save(snap.rng, os.path.join(snap.tmp, fmt.rng_filename(snap.rank)))
    if snap.meta is not None:
        fmt.write_meta(snap.tmp, **snap.meta)
        tok = snap.tokenizer
        if tok and os.path.exists(tok) and find_tokenizer(snap.save_dir) is None:
            copy_tokenizer(tok, snap.save_dir)
    written = []
    if snap.shard_dir is not None:
        shard = os.path.basename(snap.shard_dir)
        written = [f"{shard}/{n}" for n in sorted(os.listdir(snap.shard_dir))]
    if snap.rng is not None:
        written.append(fmt.rng_filename(snap.rank).replace(os.sep, "/"))
    return written


def publish_snapshot(snap: Snapshot) -> None:
    """Rank 0, once every rank's files are complete: rename into place, point the tracker at
    it, apply retention."""
    _publish(snap.save_dir, snap.tmp, snap.final, snap.iteration)
    log.info("saved checkpoint %s (%s)", snap.final, snap.layout)
    if snap.keep_last:
        prune_checkpoints(snap.save_dir, snap.keep_last)


def save_checkpoint(save_dir: str, iteration: int, model, optimizer, cfg: Config,
                    ctx: ParallelContext, state: dict) -> str:
    """Save this rank's part of a checkpoint (collective: every rank must call it).

    `state`: {"scheduler": dict, "data": dict, "counters": dict, "rng": this rank's RNG
    state (any torch.save-able plain value)}; all but "rng" must be JSON values and go to
    meta.json. Returns the final iteration directory. (`--async-save`:
    `megacpt.checkpoint.async_save.AsyncCheckpointSaver`, the same steps with the writing in
    a background thread.)
    """
    snap = snapshot_checkpoint(save_dir, iteration, model, optimizer, cfg, ctx, state)
    error = None
    try:  # a rank that fails here (disk full, permissions) must not leave the others waiting
        write_snapshot(snap)
    except Exception as e:  # noqa: BLE001 - reported to every rank by agree_on_errors
        error = e
    try:
        agree_on_errors(ctx, error, f"saving checkpoint {snap.tmp}")
        digests = integrity.gather_checksums(snap.tmp, ctx)  # collective: each rank hashes
        try:
            if ctx.rank == 0:
                integrity.record_checksums(snap.tmp, digests)
        except Exception as e:  # noqa: BLE001 - reported to every rank by agree_on_errors
            error = e
        agree_on_errors(ctx, error, f"recording checksums in {snap.tmp}")
    except CheckpointError:
        if ctx.rank == 0:  # every rank is past writing: free the space the partial save took
            shutil.rmtree(snap.tmp, ignore_errors=True)
        raise
    if ctx.rank == 0:
        publish_snapshot(snap)
    _barrier(ctx)
    return snap.final


def prune_checkpoints(save_dir: str, keep: int) -> list[int]:
    """Retention (`--keep-last-checkpoints`): delete the complete `iter_*` directories of
    `save_dir` beyond the newest `keep`, never the one the tracker names, nor one still being
    written (`iter_*.tmp`, not complete yet, is never a candidate). Each is renamed away first,
    so a crash mid-delete leaves no half checkpoint under a complete name. Returns the
    iterations deleted."""
    tracked = fmt.read_tracker(save_dir)
    complete = sorted(it for it in (fmt.parse_iter_dirname(e) for e in os.listdir(save_dir))
                      if it is not None)
    doomed = [it for it in complete[:max(0, len(complete) - keep)] if it != tracked]
    for it in doomed:
        path = os.path.join(save_dir, fmt.iter_dirname(it))
        gone = path + ".deleting"
        os.rename(path, gone)
        shutil.rmtree(gone, ignore_errors=True)
    if doomed:
        log.info("--keep-last-checkpoints %d: deleted iterations %s", keep, doomed)
    return doomed


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


def load_checkpoint(load_dir: str, model, optimizer, cfg: Config,
                    ctx: ParallelContext, stats: dict | None = None) -> tuple[int, dict]:
    """Exact resume from a checkpoint saved in ANY (tp, pp, dp) layout, with or without ZeRO-1:
    fill model (and optimizer) from it; returns (iteration, state).

    Each rank reads only its own part: in the saved layout its shard files; in another, the
    slices of the saved shards that overlap its part (`MegacptSource.get_shard`), one tensor
    at a time. Optimizer state is stored gathered over dp, so the optimizer (ZeRO-1 or not)
    takes its dp share itself (memory: the rank's tp part of the optimizer state is held once
    more until `load_state_dict` has taken it; parameters are copied one at a time).
    `stats`, when given, receives {"bytes_read": tensor bytes this rank read}.
    state["rng"] is this rank's saved RNG state when the world
    size is unchanged, else None (the model has no dropout; the trainer keeps its seeded RNG).
    """
    if cfg.checkpoint.verify_checksums:
        integrity.verify_for_rank(fmt.resolve_iter_dir(load_dir), ctx)
    with MegacptSource(load_dir) as src:
        iter_dir, meta = src.iter_dir, src.meta
        fmt.check_same_model(src.cfg.model, cfg.model, iter_dir)
        same = (src.tp, src.pp) == (ctx.tp, ctx.pp)
        if not same:
            log.info("resharding %s from tp%dpp%d to tp%dpp%d on load", iter_dir, src.tp,
                     src.pp, ctx.tp, ctx.pp)
        names = _fill_model(src, model, ctx)
        if optimizer is not None:
            if not src.has_optimizer:
                raise CheckpointError(f"{os.path.join(iter_dir, fmt.META)}: the checkpoint has "
                                      f"no optimizer state (saved with --no-save-optim or "
                                      f"converted with --no-optimizer); start from it with "
                                      f"--init-from instead of --load")
            tensors = {f"{n}/{k}": src.optimizer_get_shard(n, k, ctx.tp, ctx.tp_rank)
                       for n in names for k, *_ in src.optimizer_entries(n)}
            if same:
                rest = load_plain(os.path.join(iter_dir, fmt.shard_dirname(ctx.tp_rank,
                                                                            ctx.pp_rank),
                                               fmt.OPTIM_REST))
            else:
                rest = split_rest(src.optimizer_rest(), names)
            optimizer.load_state_dict(join_optimizer_state(tensors, rest))
            del tensors
        if stats is not None:
            stats["bytes_read"] = src.bytes_read
        log.info("rank %d loaded %s%s: read %.1f MB of tensors", ctx.rank, iter_dir,
                 "" if same else f" (resharded from tp{src.tp}pp{src.pp})", src.bytes_read / 1e6)
    state = dict(meta["state"])
    state["rng"] = None
    rng_path = os.path.join(iter_dir, fmt.rng_filename(ctx.rank))
    saved_world = src.tp * src.pp * src.dp
    if saved_world == ctx.world_size and os.path.isfile(rng_path):
        state["rng"] = _load_rng(rng_path)
    else:
        log.info("no RNG state for rank %d in %s; keeping the current RNG", ctx.rank, iter_dir)
    return int(meta["iteration"]), state


def _fill_model(src: MegacptSource, model, ctx: ParallelContext) -> list[str]:
    """Copy this rank's part of every parameter of `model` from `src`; the names filled."""
    params = dict(model.named_parameters())
    want = set(fmt.stage_param_names(src.cfg.model, ctx.pp, ctx.pp_rank))
    if set(params) != want:
        raise CheckpointError(f"{src.iter_dir}: the model's stage holds {sorted(params)[:3]}..., "
                              f"the parameter table says {sorted(want)[:3]}...")
    with torch.no_grad():
        for name, p in params.items():
            part = src.get_shard(name, ctx.tp, ctx.tp_rank)
            if tuple(part.shape) != tuple(p.shape):
                raise CheckpointError(f"{src.iter_dir}: {name!r} gives shape "
                                      f"{tuple(part.shape)} at tp{ctx.tp}, the model expects "
                                      f"{tuple(p.shape)}")
            p.copy_(part)
    return list(params)


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


def load_model(path: str, device="cpu", dtype: torch.dtype | None = None, *,
               verify: bool = True, **source_options):
    """A single-device `LlamaModel` (eval mode) from any checkpoint `load_weights` reads
    (`verify`: check our checkpoints' recorded checksums first).

    `model(tokens [b, s])` gives logits `[b, s, vocab]` over the unpadded vocabulary.
    `model.tokenizer_path` names the checkpoint's tokenizer (SentencePiece tokenizer.model or
    HuggingFace tokenizer.json; `megacpt.data.tokenizer.load_tokenizer` reads either), or None.
    """
    from megacpt.model.llama import LlamaModel

    with open_source(path, **source_options) as src:
        if verify and src.kind == "megacpt":
            integrity.verify_model_files(src.iter_dir, src.tp, src.pp)
        mcfg = src.cfg.model
        ctx = ParallelContext.single(device)
        model = LlamaModel(mcfg, ctx, dtype=dtype or src.dtype, device=device, seed=None)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(src.get(name))
        model.tokenizer_path = src.tokenizer_path
    model.eval()
    return model

