"""AdamW over fp32 master weights with data-parallel gradient reduction, optionally ZeRO-1.

`build_optimizer(model, optim_cfg, ctx, use_distributed_optimizer=...)` returns a
`MegaOptimizer`. Per step (`step(lr) -> (grad_norm, applied)`):

1. finish the gradient reduction (`GradBuffer.finish`: dp all-reduce or reduce-scatter of
   fp32 main grads, started in buckets during backward; tp all-reduce of sequence-parallel
   norm grads);
2. the global gradient norm over tp, pp and dp, each element counted once: tp-replicated
   parameters (norm weights) only on tp rank 0, dp-replicated gradients once (with ZeRO-1
   each dp rank adds its own shard);
3. non-finite norm: skip the update, zero the grads, return applied=False;
4. clip to `optim_cfg.clip_grad` (coefficient clip / (norm + 1e-6) when below 1);
5. AdamW (decoupled weight decay on >= 2-D parameters only) on fp32 masters: the parameter
   itself when it is fp32 and unsharded, else an fp32 copy (bf16 params; ZeRO-1 shards);
6. copy masters into the parameters; ZeRO-1 all-gathers the updated shards over dp.

The math is torch's own AdamW kernel, called through its functional form
(`torch.optim.adamw.adamw`): the fused CUDA kernel on GPU (equivalent to Apex FusedAdam, which
is therefore not needed), the foreach kernel on CPU; `MegaOptimizer.impl` says which. The
foreach kernel allocates temporaries the size of its whole tensor list, so it is called on
groups of at most `FOREACH_GROUP_ELEMS` elements (a bounded extra peak, not one more copy of
the model). The
functional form keeps the state in this class (flat ZeRO-1 pieces need no torch.optim param
bookkeeping) and avoids torch.optim's compile machinery at start-up.

State-dict format (what checkpoints store; the same in every dp layout):

    {"step": int,                       # optimizer steps applied
     "param_groups": [{"name": "decay"|"no_decay", "weight_decay": float, "lr": float,
                       "betas": [b1, b2], "eps": float, "params": [global names]}],
     "state": {global_param_name: {"exp_avg": T, "exp_avg_sq": T,
                                   "master": T}}}   # master only for non-fp32 params

Each T is fp32 with the shape of this tp rank's parameter shard, so optimizer state is split
over tp exactly like the parameter (`megacpt.parallel.sharding`). With ZeRO-1, `state_dict()`
gathers the dp shards (a collective: every dp rank must call it) and `load_state_dict()`
takes full tensors and keeps this rank's slice. Masters absent from a loaded state are
re-copied from the parameters at the next step, so weights may be loaded before or after.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw

from megacpt.config import OptimizerConfig
from megacpt.parallel import sharding
from megacpt.parallel.context import ParallelContext
from megacpt.parallel.grads import GradBuffer, Piece

log = logging.getLogger(__name__)

#: the non-fused (foreach) AdamW runs on groups of at most this many elements (32 MiB fp32)
FOREACH_GROUP_ELEMS = 1 << 23


def _groups(idx: list[int], sizes: list[int], limit: int) -> list[list[int]]:
    """Split `idx` into consecutive groups whose `sizes` sum to at most `limit` (a larger
    tensor forms a group of its own)."""
    out, cur, total = [], [], 0
    for i in idx:
        if cur and total + sizes[i] > limit:
            out.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += sizes[i]
    return out + ([cur] if cur else [])


def clip_coefficient(grad_norm: float, max_norm: float) -> float:
    """Factor the gradients are multiplied by (1.0 when no clipping is needed or max_norm=0)."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (grad_norm + 1e-6))


def global_grad_norm(grads: list[torch.Tensor], replicated: list[bool], ctx: ParallelContext,
                     sharded_over_dp: bool) -> float:
    """L2 norm of the whole model's gradient from this rank's `grads`.

    `replicated[i]`: grads[i] is identical on every tp rank (counted on tp rank 0 only).
    Summed over the tp x pp ranks of one replica and, when `sharded_over_dp`, over dp.
    """
    device = grads[0].device if grads else ctx.device
    keep = [g for g, rep in zip(grads, replicated) if not rep or ctx.tp_rank == 0]
    if keep:
        norms = torch._foreach_norm([g.float() for g in keep])
        total = torch.stack(norms).double().pow(2).sum()
    else:
        total = torch.zeros((), dtype=torch.float64, device=device)
    total = total.reshape(1)
    if ctx.mp_group is not None:
        dist.all_reduce(total, group=ctx.mp_group)
    if sharded_over_dp and ctx.dp_group is not None:
        dist.all_reduce(total, group=ctx.dp_group)
    return float(total.sqrt().item())


def _adamw_impl(device: torch.device) -> tuple[dict, str]:
    """Keyword arguments selecting torch's AdamW kernel for `device`, and its name."""
    if device.type == "cuda":
        return {"fused": True}, "torch AdamW math (fused CUDA kernel)"
    return {"foreach": True}, "torch AdamW math (foreach)"


class MegaOptimizer:
    """AdamW on fp32 masters with dp-bucketed (or ZeRO-1) gradient reduction; see module doc."""

    def __init__(self, model: torch.nn.Module, cfg: OptimizerConfig, ctx: ParallelContext,
                 use_distributed_optimizer: bool = False, bucket_size_mb: float = 25.0,
                 gradient_accumulation_fusion: bool = True):
        self.cfg, self.ctx, self.zero1 = cfg, ctx, use_distributed_optimizer
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("build_optimizer: the model has no trainable parameters")
        self.named = dict(named)
        # tied embeddings under pp: the first and last stage each hold embedding.weight
        model_cfg = getattr(model, "cfg", None)  # a LlamaModel's ModelConfig (or a test module)
        tied = (("embedding.weight",) if ctx.pp > 1 and model_cfg is not None
                and model_cfg.tie_word_embeddings else ())
        # a model given to a second optimizer: GradBuffer removes the old buffer's hooks
        self.buffer = GradBuffer(named, ctx, bucket_size_mb, shard_over_dp=self.zero1,
                                 fuse_wgrad=gradient_accumulation_fusion, tied=tied,
                                 tied_group=ctx.embedding_group)
        self.pieces: list[Piece] = self.buffer.pieces()
        self.replicated = [sharding.shard_kind(pc.name) == sharding.REPLICATED
                           for pc in self.pieces]
        # the last stage's copy of a tied embedding is left out of the gradient norm
        self.in_norm = [not (pc.name in tied and not ctx.is_first_stage) for pc in self.pieces]
        self.decay = [pc.param.dim() >= 2 for pc in self.pieces]
        # masters: the fp32 parameter itself when unsharded, else an fp32 copy of the piece
        self.own_master = [self.zero1 or pc.param.dtype != torch.float32 for pc in self.pieces]
        with torch.no_grad():
            self.masters = [self._piece_values(pc).float().clone() if own else pc.param
                            for pc, own in zip(self.pieces, self.own_master)]
        device = named[0][1].device
        self.kernel, self.impl = _adamw_impl(device)
        step_dev = device if self.kernel.get("fused") else "cpu"
        self.exp_avg = [torch.zeros_like(m, dtype=torch.float32) for m in self.masters]
        self.exp_avg_sq = [torch.zeros_like(m, dtype=torch.float32) for m in self.masters]
        self.steps = [torch.zeros((), dtype=torch.float32, device=step_dev) for _ in self.masters]
        self.step_count, self.last_lr = 0, cfg.lr
        self._masters_stale = False
        log.info("optimizer: %s on %s, ZeRO-1 %s, %d gradient buckets", self.impl, ctx.layout,
                 "on" if self.zero1 else "off", len(self.buffer.buckets))

    @property
    def grad_sync(self) -> GradBuffer:
        """What the pipeline step needs: `forward_backward(..., grad_sync=opt.grad_sync)`."""
        return self.buffer

    # ----- helpers -----
    def _piece_values(self, pc: Piece) -> torch.Tensor:
        """The current parameter values of a piece (master-shaped)."""
        flat = pc.param.detach().reshape(-1)[pc.lo: pc.hi]
        return flat if self.zero1 else flat.view(pc.param.shape)

    def _sync_masters_from_params(self) -> None:
        with torch.no_grad():
            for pc, m, own in zip(self.pieces, self.masters, self.own_master):
                if own:
                    m.copy_(self._piece_values(pc))
        self._masters_stale = False

    def zero_grad(self) -> None:
        """Clear the fp32 main grads (and any stray `.grad`)."""
        self.buffer.zero()
        for p in self.named.values():
            p.grad = None

    # ----- the step -----
    @torch.no_grad()
    def step(self, lr: float) -> tuple[float, bool]:
        """Reduce, clip and apply one AdamW update at learning rate `lr`."""
        if self._masters_stale:
            self._sync_masters_from_params()
        self.buffer.finish()
        grads = [self.buffer.piece_grad(pc) for pc in self.pieces]
        counted = [i for i, keep in enumerate(self.in_norm) if keep]
        norm = global_grad_norm([grads[i] for i in counted],
                                [self.replicated[i] for i in counted], self.ctx,
                                sharded_over_dp=self.zero1)
        if not math.isfinite(norm):
            self.zero_grad()
            return norm, False
        coef = clip_coefficient(norm, self.cfg.clip_grad)
        if coef < 1.0 and grads:
            torch._foreach_mul_(grads, coef)
        sizes = [m.numel() for m in self.masters]
        limit = sum(sizes) if self.kernel.get("fused") else FOREACH_GROUP_ELEMS
        for decay in (True, False):
            for idx in _groups([i for i, d in enumerate(self.decay) if d == decay], sizes, limit):
                adamw([self.masters[i] for i in idx], [grads[i] for i in idx],
                      [self.exp_avg[i] for i in idx], [self.exp_avg_sq[i] for i in idx], [],
                      [self.steps[i] for i in idx], amsgrad=False, beta1=self.cfg.adam_beta1,
                      beta2=self.cfg.adam_beta2, lr=lr, eps=self.cfg.adam_eps, maximize=False,
                      weight_decay=self.cfg.weight_decay if decay else 0.0, **self.kernel)
        self._write_back()
        self.step_count += 1
        self.last_lr = lr
        return norm, True

    def _write_back(self) -> None:
        """Copy updated masters into the parameters (ZeRO-1: all-gather over dp)."""
        if not self.zero1:
            for pc, m, own in zip(self.pieces, self.masters, self.own_master):
                if own:
                    pc.param.copy_(m)
            return
        for b in self.buffer.buckets:
            flat = torch.zeros(b.padded, dtype=b.params[0].dtype, device=b.grad.device)
            for pc, m in zip(self.pieces, self.masters):
                if pc.bucket == b.index:
                    flat[pc.start: pc.start + pc.hi - pc.lo].copy_(m)
            self._all_gather_dp(flat, *self.buffer.shard_range(b))
            for p, off in zip(b.params, b.offsets):
                p.copy_(flat[off: off + p.numel()].view(p.shape))

    def _all_gather_dp(self, flat: torch.Tensor, lo: int, hi: int) -> None:
        """Fill `flat` from every dp rank's `[lo, hi)` shard (equal-size, in dp-rank order)."""
        group = self.ctx.dp_group
        if group is None:
            return
        if dist.get_backend(group) == "nccl":
            dist.all_gather_into_tensor(flat, flat[lo:hi].clone(), group=group)
        else:
            dist.all_gather(list(flat.chunk(self.ctx.dp)), flat[lo:hi].clone(), group=group)

    # ----- state -----
    def _piece_state(self, i: int) -> dict[str, torch.Tensor]:
        d = {"exp_avg": self.exp_avg[i], "exp_avg_sq": self.exp_avg_sq[i]}
        if self.pieces[i].param.dtype != torch.float32:
            d["master"] = self.masters[i]
        return d

    @torch.no_grad()
    def state_dict(self) -> dict:
        """See the module docstring; with ZeRO-1 a collective over dp."""
        if self._masters_stale:
            self._sync_masters_from_params()
        per_piece = [self._piece_state(i) for i in range(len(self.pieces))]
        if self.zero1:
            state = self._gather_zero1_state(per_piece)
        else:
            state = {pc.name: {k: v.detach().view(pc.param.shape) for k, v in d.items()}
                     for pc, d in zip(self.pieces, per_piece)}
        groups = []
        for gname, decay in (("decay", True), ("no_decay", False)):
            groups.append({"name": gname, "lr": self.last_lr,
                           "weight_decay": self.cfg.weight_decay if decay else 0.0,
                           "betas": [self.cfg.adam_beta1, self.cfg.adam_beta2],
                           "eps": self.cfg.adam_eps,
                           "params": sorted({pc.name for pc, d in zip(self.pieces, self.decay)
                                             if d == decay})})
        return {"step": self.step_count, "param_groups": groups, "state": state}

    @property
    def state_dict_is_a_copy(self) -> bool:
        """Whether `state_dict()`'s tensors are new memory that later steps leave alone (ZeRO-1
        gathers them) rather than views of the live state (an async checkpoint snapshot needs
        to copy only the latter)."""
        return self.zero1

    def state_spec(self) -> dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
        """{name: {key: (shape, dtype)}} of the tensors `state_dict()["state"]` holds, without
        a collective (to preallocate snapshot buffers)."""
        return {pc.name: {k: (tuple(pc.param.shape), torch.float32)
                          for k in ("exp_avg", "exp_avg_sq")
                          + (("master",) if pc.param.dtype != torch.float32 else ())}
                for pc in self.pieces}

    def _gather_zero1_state(self, per_piece: list[dict]) -> dict:
        keys = ["exp_avg", "exp_avg_sq"]
        if any(p.dtype != torch.float32 for p in self.named.values()):
            keys.append("master")
        state: dict[str, dict[str, torch.Tensor]] = {}
        for b in self.buffer.buckets:
            mine = [(pc, d) for pc, d in zip(self.pieces, per_piece) if pc.bucket == b.index]
            for key in keys:
                flat = torch.zeros(b.padded, dtype=torch.float32, device=b.grad.device)
                for pc, d in mine:
                    if key in d:
                        flat[pc.start: pc.start + pc.hi - pc.lo].copy_(d[key])
                self._all_gather_dp(flat, *self.buffer.shard_range(b))
                for name, p, off in zip(b.names, b.params, b.offsets):
                    if key != "master" or p.dtype != torch.float32:
                        state.setdefault(name, {})[key] = flat[off: off + p.numel()].view(p.shape)
        return state

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """Restore from `state_dict()` output of any dp layout with the same tp split."""
        for key in ("step", "state"):
            if key not in sd:
                raise KeyError(f"optimizer state dict has no {key!r} entry (keys: {sorted(sd)})")
        state = sd["state"]
        missing = sorted({pc.name for pc in self.pieces} - set(state))
        if missing:
            raise KeyError(f"optimizer state dict lacks parameters {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}")
        for pc in self.pieces:
            for k in ("exp_avg", "exp_avg_sq"):
                shape = tuple(state[pc.name][k].shape)
                if shape != tuple(pc.param.shape):
                    raise ValueError(f"optimizer state {pc.name}.{k} has shape {shape}, but "
                                     f"this rank's parameter shard is {tuple(pc.param.shape)} "
                                     f"(saved with another tensor-parallel layout?)")
        self.step_count = int(sd["step"])
        stale = False
        for i, pc in enumerate(self.pieces):
            entry = state[pc.name]
            self.exp_avg[i].copy_(self._slice(pc, entry["exp_avg"]))
            self.exp_avg_sq[i].copy_(self._slice(pc, entry["exp_avg_sq"]))
            self.steps[i].fill_(float(self.step_count))
            if self.own_master[i] and "master" in entry:
                self.masters[i].copy_(self._slice(pc, entry["master"]))
            elif self.own_master[i]:
                stale = True  # re-copied from the parameters at the next step
        self._masters_stale = stale

    def _slice(self, pc: Piece, full: torch.Tensor) -> torch.Tensor:
        flat = full.reshape(-1)[pc.lo: pc.hi]
        return flat if self.zero1 else flat.view(pc.param.shape)


def build_optimizer(model: torch.nn.Module, optim_cfg: OptimizerConfig, ctx: ParallelContext,
                    *, use_distributed_optimizer: bool = False,
                    bucket_size_mb: float = 25.0,
                    gradient_accumulation_fusion: bool = True) -> MegaOptimizer:
    """The optimizer for this rank's model stage (see the module docstring)."""
    return MegaOptimizer(model, optim_cfg, ctx, use_distributed_optimizer, bucket_size_mb,
                         gradient_accumulation_fusion)
