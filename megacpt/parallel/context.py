"""The explicit parallel context: one object built at start-up from named axes (tp, pp, dp).

Rank order follows Megatron's default (tp-dp-pp): tensor-parallel ranks are adjacent, then
data-parallel, then pipeline stages:

    global_rank = tp_rank + tp * (dp_rank + dp * pp_rank)

No module-level globals: the context is passed to the layers and schedules that need a group.
With tp = pp = dp = 1 (`ParallelContext.single()`) every group is None and all communication
is the identity, so the model is plain single-device PyTorch.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megacpt.config import ConfigError, ModelConfig
from megacpt.params import (check_layout, check_virtual_split,  # noqa: F401 - re-exported
                            stage_layer_range, virtual_stage_layers)


@dataclass
class ParallelContext:
    """Process groups and coordinates of this rank along each axis."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    rank: int = 0
    world_size: int = 1
    sequence_parallel: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: object = None
    pp_group: object = None
    dp_group: object = None
    #: all tp x pp ranks of one data-parallel replica (model-parallel group): the global
    #: gradient norm is summed over it
    mp_group: object = None
    #: virtual pipeline stages (model chunks) per pipeline rank
    #: (`--virtual-pipeline-model-parallel-size`); > 1 runs the interleaved 1F1B schedule
    vp: int = 1
    #: NCCL only: the pipeline group has run its first collective, so pairwise
    #: batch_isend_irecv may follow (set once by `schedule.PipeComm`)
    p2p_ready: bool = False
    #: the first and last stage's ranks of the same (tp, dp) coordinates, pp > 1 only (None
    #: elsewhere): tied embedding gradients are summed over it (Megatron's embedding group)
    embedding_group: object = None

    # ----- coordinates -----
    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def global_rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    @property
    def next_stage_rank(self) -> int:
        return self.global_rank(self.tp_rank, self.dp_rank, (self.pp_rank + 1) % self.pp)

    @property
    def prev_stage_rank(self) -> int:
        return self.global_rank(self.tp_rank, self.dp_rank, (self.pp_rank - 1) % self.pp)

    @property
    def layout(self) -> str:
        """Short name of the layout, e.g. tp2pp2dp1 (tp1pp2dp1vp2 with virtual stages)."""
        return f"tp{self.tp}pp{self.pp}dp{self.dp}" + (f"vp{self.vp}" if self.vp > 1 else "")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ----- construction -----
    @classmethod
    def single(cls, device: str | torch.device | None = None) -> "ParallelContext":
        """One process, no communication."""
        dev = torch.device(device) if device is not None else default_device()
        return cls(device=dev)

    @classmethod
    def build(cls, tp: int = 1, pp: int = 1, sequence_parallel: bool = False,
              device: str | torch.device | None = None,
              dp: int | None = None,
              timeout_minutes: float | None = None, vp: int = 1) -> "ParallelContext":
        """Build groups over the already-initialised default process group.

        dp is derived as world_size / (tp * pp) unless given, in which case tp * pp * dp must
        equal the world size. Every rank must call this (group creation is collective); it
        may be called again over the same default group for another layout. `timeout_minutes`
        bounds every collective on the new groups (a dead peer ends the job instead of hanging);
        None keeps torch's default. `vp` virtual stages per pipeline rank need pp > 1.
        """
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        if tp < 1 or pp < 1 or world % (tp * pp) != 0:
            raise ConfigError(
                f"tensor-model-parallel-size ({tp}) x pipeline-model-parallel-size ({pp}) must "
                f"divide the world size ({world}); launch {tp * pp * max(1, world // (tp * pp))} "
                f"ranks or change --tensor-model-parallel-size/--pipeline-model-parallel-size")
        if dp is not None and tp * pp * dp != world:
            raise ConfigError(
                f"tensor ({tp}) x pipeline ({pp}) x data ({dp}) parallel sizes = {tp * pp * dp} "
                f"but the world has {world} ranks; launch {tp * pp * dp} ranks or change the "
                f"sizes so that their product is {world}")
        if vp < 1 or (vp > 1 and pp == 1):
            raise ConfigError(f"--virtual-pipeline-model-parallel-size {vp} needs "
                              f"--pipeline-model-parallel-size > 1 (got {pp}); use 1 virtual stage")
        dp = world // (tp * pp)
        dev = torch.device(device) if device is not None else default_device()
        ctx = cls(tp=tp, pp=pp, dp=dp, rank=rank, world_size=world,
                  sequence_parallel=sequence_parallel and tp > 1, device=dev, vp=vp)
        assert ctx.tp * ctx.pp * ctx.dp == ctx.world_size
        if world > 1:
            ctx._make_groups(timeout_minutes)
        return ctx

    def _new_groups(self, rank_lists: list[list[int]], kw: dict):
        """Create a group of each rank list (collective: every rank, same order); return
        the one holding this rank."""
        mine = None
        for ranks in rank_lists:
            grp = dist.new_group(ranks, **kw)
            if self.rank in ranks:
                mine = grp
        return mine

    def _make_groups(self, timeout_minutes: float | None = None) -> None:
        tp, pp, dp = self.tp, self.pp, self.dp
        g = self.global_rank
        kw = {} if timeout_minutes is None else {
            "timeout": datetime.timedelta(minutes=timeout_minutes)}
        # every rank creates every group, in the same order (new_group is collective)
        self.tp_group = self._new_groups([[g(t, d, p) for t in range(tp)]
                                          for p in range(pp) for d in range(dp)], kw)
        self.dp_group = self._new_groups([[g(t, d, p) for d in range(dp)]
                                          for p in range(pp) for t in range(tp)], kw)
        self.pp_group = self._new_groups([[g(t, d, p) for p in range(pp)]
                                          for d in range(dp) for t in range(tp)], kw)
        self.mp_group = self._new_groups([[g(t, d, p) for p in range(pp) for t in range(tp)]
                                          for d in range(dp)], kw)
        if pp > 1:  # first and last stage: the tied embedding's gradient
            self.embedding_group = self._new_groups(
                [[g(t, d, 0), g(t, d, pp - 1)] for d in range(dp) for t in range(tp)], kw)
        # size-1 groups behave like None: no communication
        if tp == 1:
            self.tp_group = None
        if dp == 1:
            self.dp_group = None
        if pp == 1:
            self.pp_group = None
        if tp * pp == 1:
            self.mp_group = None

    # ----- model-shape checks -----
    def check_model(self, cfg: ModelConfig) -> None:
        """Divisibility of the model by this layout (`megacpt.params.check_layout`; raises its
        LayoutError, a ConfigError, saying what to change)."""
        check_layout(cfg, self.tp, self.pp, self.sequence_parallel, what="--tensor/pipeline"
                     "-model-parallel-size layout")
        check_virtual_split(cfg.num_layers, self.pp, self.vp)

    def stage_layers(self, num_layers: int, pp_rank: int | None = None) -> list[int]:
        """Global layer indices held by a pipeline rank, in the order its chunks run
        (uneven splits without virtual stages: earlier stages +1)."""
        return [i for chunk in self.chunk_layers(num_layers, pp_rank) for i in chunk]

    def chunk_layers(self, num_layers: int, pp_rank: int | None = None) -> list[range]:
        """The layers of each model chunk (virtual stage) of a pipeline rank."""
        r = self.pp_rank if pp_rank is None else pp_rank
        return virtual_stage_layers(num_layers, self.pp, self.vp, r)


def resolve_virtual_stages(num_layers: int, pp: int, vp: int | None,
                           layers_per_virtual_stage: int | None) -> int:
    """Virtual stages per pipeline rank from Megatron's two flags (at most one given):
    `--virtual-pipeline-model-parallel-size` directly, or
    `--num-layers-per-virtual-pipeline-stage` N: vp = num_layers / pp / N."""
    if vp is not None and layers_per_virtual_stage is not None:
        raise ConfigError("give --virtual-pipeline-model-parallel-size or "
                          "--num-layers-per-virtual-pipeline-stage, not both")
    if layers_per_virtual_stage is not None:
        n = layers_per_virtual_stage
        if n < 1 or num_layers % pp or (num_layers // pp) % n:
            raise ConfigError(f"--num-layers-per-virtual-pipeline-stage {n}: --num-layers "
                              f"{num_layers} / --pipeline-model-parallel-size {pp} must be a "
                              f"multiple of it")
        vp = num_layers // pp // n
    vp = 1 if vp is None else vp
    if vp < 1:
        raise ConfigError(f"--virtual-pipeline-model-parallel-size must be >= 1, got {vp}")
    if vp > 1 and pp == 1:
        raise ConfigError("virtual pipeline stages need --pipeline-model-parallel-size > 1")
    check_virtual_split(num_layers, pp, vp)
    return vp


def default_device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(backend: str | None = None, timeout_minutes: float = 10.0) -> None:
    """Initialise torch.distributed from torchrun's env:// variables or from MPI.

    Under `mpiexec` (no RANK in the environment but an MPI launcher's variables), mpi4py gives
    rank, size and local rank; rank 0's host becomes MASTER_ADDR. Does nothing for a single
    process without a launcher.
    """
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        if not _from_mpi():
            return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend=backend, init_method="env://",
                            timeout=datetime.timedelta(minutes=timeout_minutes))


_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")


def _from_mpi() -> bool:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from MPI; False if not under MPI."""
    if not any(v in os.environ for v in _MPI_VARS):
        return False
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError("launched under mpiexec but mpi4py is not installed: "
                           "pip install 'megacpt[mpi]' (mpi4py + mpich)") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        return False
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    master = comm.bcast(MPI.Get_processor_name() if comm.Get_rank() == 0 else None, root=0)
    os.environ.setdefault("MASTER_ADDR", master if master else "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ["RANK"] = str(comm.Get_rank())
    os.environ["WORLD_SIZE"] = str(comm.Get_size())
    os.environ["LOCAL_RANK"] = str(local.Get_rank())
    os.environ["LOCAL_WORLD_SIZE"] = str(local.Get_size())
    return True
