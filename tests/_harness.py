"""Test helpers: the one multi-process launcher, tiny models and the layout-equivalence worker.

`run_distributed(fn, world_size, *args)` starts `world_size` fresh processes (spawn), joins
them into one gloo (or NCCL) process group (file rendezvous in a temporary directory, so no
TCP port is raced for), calls `fn(*args)` in each and returns the list of per-rank return
values. Any rank's exception is re-raised in the caller with that rank's
traceback; a hung or crashed rank fails the call after `timeout` seconds instead of hanging
the test session. `fn`, its arguments and its results must be picklable (module-level
functions); they travel as plain pickles.

Tests reuse worlds: spawn each world size once and run every layout of that size inside it
(`ParallelContext.build` can be called repeatedly over one default group). `jobs_worker` runs
a list of named jobs of this module in one world: `train_losses` (per-step losses of a tiny
model in a layout), `tp_forward_grads` (unsharded loss, logits, weights, gradients),
`comm_check` / `vocab_ce_check` (primitives against their definitions),
`process_group_members`, `comm_bytes_of_step` (bytes sent per axis, via `count_comm`).

The global-batch rule that the layout tests (and the trainer) rely on lives in
`megacpt.parallel.schedule.split_global_batch`.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import queue
import shutil
import socket
import sys
import tempfile
import time
import traceback
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megacpt.config import ModelConfig, OptimizerConfig


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(path: str, name: str | None = None):
    """Import a script that is not in a package (examples/, tools/, data/...) from `path`
    (relative to the repository root, or absolute) as a module."""
    import importlib.util

    full = path if os.path.isabs(path) else os.path.join(REPO, path)
    name = name or os.path.splitext(os.path.basename(full))[0]
    spec = importlib.util.spec_from_file_location(name, full)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run the block with `n` intra-op threads (tests on shared cores), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (for launchers that need one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, store: str, backend: str, threads: int,
           results, payload: bytes) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                init_method=f"file://{store}")
        fn, args = pickle.loads(payload)
        # plain pickle bytes, not torch's shared-memory handles, which die with this process
        results.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # report everything, including KeyboardInterrupt/SystemExit
        results.put((rank, False, traceback.format_exc()))
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer already gone; nothing to clean
            pass
    # skip the slow interpreter teardown of a torch process once the result is delivered
    results.close()
    results.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 180.0,
                    backend: str = "gloo", threads: int = 1) -> list:
    """Run `fn(*args)` on `world_size` spawned ranks; return the per-rank results in rank order.

    Raises RuntimeError carrying the failing rank's traceback, or TimeoutError naming the
    ranks that had not answered after `timeout` seconds (all children are then terminated).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    tmp = tempfile.mkdtemp(prefix="megacpt-dist-")
    # a file rendezvous: no TCP port to race for with other jobs on the machine
    store = os.path.join(tmp, "store")
    payload = pickle.dumps((fn, args))
    procs = [ctx.Process(target=_child, daemon=True,
                         args=(r, world_size, store, backend, threads, results, payload))
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(out))
                raise TimeoutError(f"run_distributed({fn.__name__}, world_size={world_size}): "
                                   f"ranks {missing} did not finish within {timeout:.0f}s")
            try:
                rank, ok, val = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if r not in out and p.exitcode is not None]
                if dead:
                    # give the dead rank's queue message a moment to arrive before blaming it
                    time.sleep(0.5)
                    if results.empty():
                        raise RuntimeError(
                            f"run_distributed({fn.__name__}): rank {dead[0]} exited with code "
                            f"{procs[dead[0]].exitcode} without a result") from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} failed in {fn.__name__}:\n{val}")
            out[rank] = pickle.loads(val)
    finally:
        for p in procs:
            p.join(timeout=5 if len(out) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        shutil.rmtree(tmp, ignore_errors=True)
    return [out[r] for r in range(world_size)]


# ----- tiny models and data for the equivalence tests -----

def tiny_model_config(**overrides) -> ModelConfig:
    """A few-thousand-parameter LLaMA that every tested layout divides (tp 4, pp 4, GQA).

    The vocabulary (200) is padded to 256, so vocab padding is exercised on every tp rank
    count; 5 layers make pp 2 and pp 4 uneven splits.
    """
    kw = dict(num_layers=5, hidden_size=32, ffn_hidden_size=64, num_attention_heads=8,
              num_query_groups=4, vocab_size=200, seq_length=16, attention_backend="eager",
              use_kernels=False)
    kw.update(overrides)
    return ModelConfig(**kw)


def tiny_optim_config(**overrides) -> OptimizerConfig:
    """AdamW settings with a large LR and a clip that binds, so layouts must agree exactly."""
    kw = dict(lr=1e-2, min_lr=0.0, weight_decay=0.1, clip_grad=0.5)
    kw.update(overrides)
    return OptimizerConfig(**kw)


def random_global_batches(steps: int, global_batch: int, seq_length: int, vocab_size: int,
                          seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` fixed global batches of (tokens, labels) LongTensor[global_batch, seq_length]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        seq = torch.randint(0, vocab_size, (global_batch, seq_length + 1), generator=g)
        out.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return out


def train_losses(model_cfg: ModelConfig, optim_cfg: OptimizerConfig, batches: list,
                 micro_batch_size: int, tp: int = 1, pp: int = 1, sequence_parallel: bool = False,
                 use_distributed_optimizer: bool = False, dtype: torch.dtype = torch.float32,
                 bucket_size_mb: float = 25.0, seed: int = 1234, device: str = "cpu",
                 return_state: bool = False, gradient_accumulation_fusion: bool = True,
                 vp: int = 1, schedule: str = "1f1b") -> dict:
    """Train from `seed` on `batches` in layout (tp, pp, dp = world / tp / pp; vp virtual
    stages per pipeline rank).

    Runs in the current process group (or alone when none is initialised). Returns
    {"layout", "losses", "grad_norms", "eval_loss"} (identical on every rank by contract;
    eval_loss is a forward-only pass over the first batch after training) and, with
    `return_state`, "model" and "optimizer" state dicts (CPU tensors, collective).
    """
    from megacpt.model import LlamaModel
    from megacpt.parallel.context import ParallelContext
    from megacpt.parallel.optimizer import build_optimizer
    from megacpt.parallel.schedule import forward_backward, split_global_batch

    ctx = ParallelContext.build(tp=tp, pp=pp, sequence_parallel=sequence_parallel,
                                device=device, vp=vp)
    model = LlamaModel(model_cfg, ctx, dtype=dtype, device=device, seed=seed)
    opt = build_optimizer(model, optim_cfg, ctx, bucket_size_mb=bucket_size_mb,
                          use_distributed_optimizer=use_distributed_optimizer,
                          gradient_accumulation_fusion=gradient_accumulation_fusion)
    losses, norms = [], []
    for tokens, labels in batches:
        opt.zero_grad()
        losses.append(forward_backward(model, split_global_batch(tokens, labels,
                                                                 micro_batch_size, ctx), ctx,
                                       grad_sync=opt.grad_sync, schedule=schedule))
        norm, applied = opt.step(optim_cfg.lr)
        if not applied:
            raise RuntimeError(f"{ctx.layout}: optimizer step skipped (grad norm {norm})")
        norms.append(norm)
    tokens, labels = batches[0]
    eval_loss = forward_backward(model, split_global_batch(tokens, labels, micro_batch_size, ctx),
                                 ctx, forward_only=True)
    name = ctx.layout + ("+sp" if ctx.sequence_parallel else "") + (
        "+zero1" if use_distributed_optimizer else "") + (
        "" if dtype == torch.float32 else f"+{str(dtype).split('.')[-1]}") + (
        "" if schedule == "1f1b" else f"+{schedule}")
    out = {"layout": name, "losses": losses, "grad_norms": norms, "eval_loss": eval_loss}
    if return_state:
        out["model"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        out["optimizer"] = _to_cpu(opt.state_dict())
    return out


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def tp_forward_grads(model_cfg: ModelConfig, tokens: torch.Tensor, labels: torch.Tensor,
                     tp: int, sequence_parallel: bool = False, seed: int = 1234) -> dict | None:
    """Forward/backward of the whole model (pp = 1) split over `tp` ranks; unsharded results.

    Returns (on global rank 0; None elsewhere) {"loss": [b, s], "logits": [b, s, V],
    "weights": {name: full tensor}, "grads": {name: full gradient of loss.mean()}}.
    """
    from megacpt.model import LlamaModel
    from megacpt.parallel import comm, sharding
    from megacpt.parallel.context import ParallelContext

    ctx = ParallelContext.build(tp=tp, pp=1, sequence_parallel=sequence_parallel, device="cpu")
    model = LlamaModel(model_cfg, ctx, seed=seed)
    loss = model(tokens, labels)  # [b, s]
    loss.mean().backward()
    with torch.no_grad():
        logits = model(tokens)  # [b, s, V]
    weights, grads = {}, {}
    for name, p in model.named_parameters():
        g = p.grad
        if getattr(p, "sequence_parallel", False):
            g = comm.all_reduce(g.clone(), ctx.tp_group)  # partial over sequence chunks
        gparts = [comm.all_gather(t.unsqueeze(0), ctx.tp_group, 0) for t in (p.detach(), g)]
        weights[name] = sharding.unshard(name, list(gparts[0].unbind(0)))
        grads[name] = sharding.unshard(name, list(gparts[1].unbind(0)))
    if ctx.rank != 0:
        return None
    return {"loss": loss.detach(), "logits": logits, "weights": weights, "grads": grads}


COMM_FUNCS = ("copy_to_tp", "reduce_from_tp", "scatter_to_tp", "gather_from_tp",
              "scatter_to_sp", "gather_from_sp", "reduce_scatter_to_sp")


def comm_input(rank: int, shape=(4, 2, 6)) -> torch.Tensor:
    """A distinct, exactly representable input per rank for the comm-primitive checks."""
    return torch.arange(48, dtype=torch.float32).reshape(shape) + 100.0 * rank


def comm_grad(name: str, rank: int, shape) -> torch.Tensor:
    """The output gradient rank `rank` feeds into primitive `name` (exact small integers)."""
    g = torch.Generator().manual_seed(COMM_FUNCS.index(name) * 97 + rank)
    return torch.randint(-5, 6, tuple(shape), generator=g).float()


def comm_check() -> dict:
    """Every comm primitive over all ranks as one tp group: {name: (output, input grad)}."""
    from megacpt.parallel import comm
    from megacpt.parallel.context import ParallelContext

    ctx = ParallelContext.build(tp=dist.get_world_size(), device="cpu")
    out = {}
    for name in COMM_FUNCS:
        x = comm_input(ctx.tp_rank).requires_grad_()
        y = getattr(comm, name)(x, ctx.tp_group)
        y.backward(comm_grad(name, ctx.tp_rank, y.shape))
        out[name] = (y.detach(), x.grad)
    return out


def ce_logits(padded: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed logits [6, 3, padded] and targets [6, 3] (< 100) for the cross-entropy check."""
    g = torch.Generator().manual_seed(17)
    return (torch.randn(6, 3, padded, generator=g) * 3,
            torch.randint(0, 100, (6, 3), generator=g))


def vocab_ce_check(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vocab_parallel_cross_entropy over all ranks as one tp group: (loss, full logits grad)."""
    from megacpt.parallel import comm
    from megacpt.parallel.context import ParallelContext
    from megacpt.parallel.layers import vocab_parallel_cross_entropy

    ctx = ParallelContext.build(tp=dist.get_world_size(), device="cpu")
    logits, target = ce_logits()
    local = comm.split(logits, ctx.tp_group, -1).requires_grad_()  # [6, 3, padded/tp]
    loss = vocab_parallel_cross_entropy(local, target, ctx.tp_group, vocab_size)
    loss.sum().backward()
    return loss.detach(), comm.all_gather(local.grad, ctx.tp_group, -1)


def process_group_members(layouts: list[tuple[int, int]]) -> list[tuple[str, dict]]:
    """For each (tp, pp): the layout name and the sorted global ranks of this rank's tp, dp,
    pp and mp groups (None for a size-1 group)."""
    from megacpt.parallel.context import ParallelContext

    out = []
    for tp, pp in layouts:
        ctx = ParallelContext.build(tp=tp, pp=pp, device="cpu")
        members = {}
        for name in ("tp", "dp", "pp", "mp"):
            g = getattr(ctx, f"{name}_group")
            members[name] = None if g is None else sorted(dist.get_process_group_ranks(g))
        out.append((ctx.layout, members))
    return out


@contextlib.contextmanager
def count_comm(ctx):
    """Count the bytes this rank sends (ring algorithms, as `megacpt.parallel.volume`) per axis
    while the block runs. Scalar collectives are ignored; comm.reduce_scatter counts as a
    reduce-scatter even where gloo implements it with an all-reduce."""
    from megacpt.parallel import comm

    counts = {"tp": 0.0, "pp": 0.0, "dp": 0.0, "mp": 0.0}
    axis = {id(g): k for k, g in (("tp", ctx.tp_group), ("dp", ctx.dp_group),
                                  ("pp", ctx.pp_group), ("mp", ctx.mp_group)) if g is not None}
    nested = [0]
    saved = {n: getattr(dist, n) for n in ("all_reduce", "all_gather", "isend")}
    saved_rs = comm.reduce_scatter

    def add(group, nbytes):
        if not nested[0]:
            counts[axis.get(id(group), "pp") if group is not None else "pp"] += nbytes

    def all_reduce(t, *a, group=None, **kw):
        n = dist.get_world_size(group)
        if t.numel() > 1:
            add(group, 2 * (n - 1) / n * t.numel() * t.element_size())
        return saved["all_reduce"](t, *a, group=group, **kw)

    def all_gather(outs, t, *a, group=None, **kw):
        add(group, (len(outs) - 1) * t.numel() * t.element_size())
        return saved["all_gather"](outs, t, *a, group=group, **kw)

    def isend(t, *a, **kw):
        add(None, t.numel() * t.element_size())
        return saved["isend"](t, *a, **kw)

    def reduce_scatter(x, group, dim=0):
        n = comm._size(group)
        if n > 1:
            add(group, (n - 1) / n * x.numel() * x.element_size())
        nested[0] += 1
        try:
            return saved_rs(x, group, dim)
        finally:
            nested[0] -= 1

    for name, fn in (("all_reduce", all_reduce), ("all_gather", all_gather), ("isend", isend)):
        setattr(dist, name, fn)
    comm.reduce_scatter = reduce_scatter
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
        comm.reduce_scatter = saved_rs


def comm_bytes_of_step(model_cfg: ModelConfig, optim_cfg: OptimizerConfig, batch: tuple,
                       micro_batch_size: int, tp: int = 1, pp: int = 1,
                       sequence_parallel: bool = False,
                       use_distributed_optimizer: bool = False, vp: int = 1,
                       schedule: str = "1f1b") -> dict:
    """Bytes this rank sends on each axis during one training step (see `count_comm`);
    `vp` virtual stages run interleaved 1F1B, `schedule` as `forward_backward`'s."""
    from megacpt.model import LlamaModel
    from megacpt.parallel.context import ParallelContext
    from megacpt.parallel.optimizer import build_optimizer
    from megacpt.parallel.schedule import forward_backward, split_global_batch

    ctx = ParallelContext.build(tp=tp, pp=pp, sequence_parallel=sequence_parallel,
                                device="cpu", vp=vp)
    model = LlamaModel(model_cfg, ctx, seed=1)
    opt = build_optimizer(model, optim_cfg, ctx,
                          use_distributed_optimizer=use_distributed_optimizer)
    mbs = split_global_batch(*batch, micro_batch_size, ctx)
    with count_comm(ctx) as counts:
        opt.zero_grad()
        forward_backward(model, mbs, ctx, grad_sync=opt.grad_sync, schedule=schedule)
        opt.step(optim_cfg.lr)
    return {"pp_rank": ctx.pp_rank, "dp_size": ctx.dp, "num_microbatches": len(mbs), **counts}


def train_and_save(model_cfg: ModelConfig, optim_cfg: OptimizerConfig, batches: list,
                   micro_batch_size: int, save_dir: str, tp: int = 1, pp: int = 1,
                   vp: int = 1) -> list[float]:
    """Train on `batches` in layout (tp, pp, vp), save a checkpoint (with optimizer) of the
    last step to `save_dir`; returns the losses."""
    from megacpt.checkpoint import save_checkpoint
    from megacpt.config import Config
    from megacpt.model import LlamaModel
    from megacpt.parallel.context import ParallelContext
    from megacpt.parallel.optimizer import build_optimizer
    from megacpt.parallel.schedule import forward_backward, split_global_batch

    ctx = ParallelContext.build(tp=tp, pp=pp, device="cpu", vp=vp)
    model = LlamaModel(model_cfg, ctx, seed=1234)
    opt = build_optimizer(model, optim_cfg, ctx)
    losses = []
    for tokens, labels in batches:
        opt.zero_grad()
        losses.append(forward_backward(model, split_global_batch(tokens, labels,
                                                                 micro_batch_size, ctx), ctx,
                                       grad_sync=opt.grad_sync))
        opt.step(optim_cfg.lr)
    cfg = Config(model=model_cfg, optim=optim_cfg)
    save_checkpoint(save_dir, len(batches), model, opt, cfg, ctx, {"rng": None})
    return losses


def jobs_worker(jobs: list[tuple[str, dict]]) -> list:
    """Run named jobs of this module (`("train_losses", kwargs)`, ...) in one world."""
    allowed = {"train_losses": train_losses, "tp_forward_grads": tp_forward_grads,
               "comm_check": comm_check, "process_group_members": process_group_members,
               "vocab_ce_check": vocab_ce_check, "comm_bytes_of_step": comm_bytes_of_step,
               "train_and_save": train_and_save}
    unknown = [name for name, _ in jobs if name not in allowed]
    if unknown:
        raise KeyError(f"jobs_worker: unknown jobs {unknown}; known: {sorted(allowed)}")
    return [allowed[name](**kwargs) for name, kwargs in jobs]
