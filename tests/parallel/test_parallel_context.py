"""ParallelContext: rank order, stage splits, layout/model checks with actionable errors, and
start-up under mpiexec (mpi4py) and the spawn launcher. (Process-group membership in every
layout of 8 ranks is checked inside test_layouts.py's 8-rank world.)"""
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from megacpt.config import ConfigError
from megacpt.parallel.context import ParallelContext, stage_layer_range
from _harness import free_port, run_distributed, tiny_model_config


def test_rank_order_is_tp_then_dp_then_pp():
    tp, dp, pp = 2, 3, 2
    coords = []
    for rank in range(tp * dp * pp):
        ctx = ParallelContext(tp=tp, pp=pp, dp=dp, rank=rank, world_size=tp * dp * pp)
        coords.append((ctx.pp_rank, ctx.dp_rank, ctx.tp_rank))
        assert ctx.global_rank(ctx.tp_rank, ctx.dp_rank, ctx.pp_rank) == rank
    assert coords == sorted(coords)  # tp fastest, then dp, then pp
    ctx = ParallelContext(tp=tp, pp=pp, dp=dp, rank=3, world_size=12)  # tp1 dp1 pp0
    assert (ctx.next_stage_rank, ctx.is_first_stage, ctx.is_last_stage) == (9, True, False)
    assert ParallelContext(tp=tp, pp=pp, dp=dp, rank=9, world_size=12).prev_stage_rank == 3


def test_stage_layer_ranges_cover_all_layers_unevenly():
    assert [list(stage_layer_range(5, 2, r)) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [len(stage_layer_range(26, 4, r)) for r in range(4)] == [7, 7, 6, 6]
    for layers, pp in [(5, 4), (8, 4), (7, 3)]:
        got = [i for r in range(pp) for i in stage_layer_range(layers, pp, r)]
        assert got == list(range(layers))


@pytest.mark.parametrize("tp,override,match", [
    (4, dict(num_attention_heads=6, num_query_groups=6, hidden_size=48),
     r"\(--num-attention-heads\) = 6 is not divisible by tensor-parallel size 4 "
     r"\(--tensor-model-parallel-size\)"),
    (4, dict(num_query_groups=2), r"\(--num-query-groups\) = 2 is not divisible"),
    (4, dict(ffn_hidden_size=66), r"\(--ffn-hidden-size\) = 66"),
    (4, dict(make_vocab_size_divisible_by=2, vocab_size=202), "padded vocabulary"),
])
def test_check_model_names_what_to_change(tp, override, match):
    cfg = tiny_model_config(**override)
    with pytest.raises(ConfigError, match=match):
        ParallelContext(tp=tp, world_size=tp).check_model(cfg)


def test_check_model_pipeline_and_sequence_errors():
    with pytest.raises(ConfigError, match=r"5 layers \(--num-layers\), fewer than "
                                          r"pipeline-parallel size 8"):
        ParallelContext(pp=8, world_size=8).check_model(tiny_model_config())
    with pytest.raises(ConfigError, match="--seq-length 18 must be divisible"):
        ParallelContext(tp=4, world_size=4, sequence_parallel=True).check_model(
            tiny_model_config(seq_length=18))


def test_padded_vocab_does_not_depend_on_tp():
    cfg = tiny_model_config(vocab_size=36152)
    assert cfg.padded_vocab_size == 36224  # multiple of 128, whatever tp
    for tp in (1, 2, 4, 8):
        ParallelContext(tp=tp, world_size=tp).check_model(
            tiny_model_config(vocab_size=36152, hidden_size=64, num_attention_heads=8,
                              num_query_groups=8))


def test_build_rejects_sizes_that_do_not_fit_the_world():
    with pytest.raises(ConfigError, match=r"must divide the world size \(1\)"):
        ParallelContext.build(tp=2)
    with pytest.raises(ConfigError, match="world has 1 ranks"):
        ParallelContext.build(tp=1, pp=1, dp=2)
    ctx = ParallelContext.build()
    assert (ctx.tp, ctx.pp, ctx.dp, ctx.tp_group) == (1, 1, 1, None)


def _failing_worker():
    if dist.get_rank() == 1:
        raise ValueError("rank one is broken on purpose")
    return dist.get_rank()


def test_launcher_reports_the_failing_rank():
    with pytest.raises(RuntimeError, match="(?s)rank 1 of 2 failed in _failing_worker.*"
                                           "ValueError: rank one is broken on purpose"):
        run_distributed(_failing_worker, 2, timeout=120)


def test_launcher_times_out_instead_of_hanging():
    with pytest.raises(TimeoutError, match=r"ranks \[0\] did not finish within 8s"):
        run_distributed(time.sleep, 1, 600, timeout=8)


MPI_SCRIPT = """
import torch, torch.distributed as dist
from megacpt.parallel.context import ParallelContext, init_distributed
init_distributed()
ctx = ParallelContext.build(tp=2)
t = torch.tensor([float(ctx.rank + 1)])
dist.all_reduce(t, group=ctx.tp_group)
import sys
out = sys.argv[1] + f".{ctx.rank}"  # one file per rank: stdout of two ranks can interleave
with open(out, "w") as f:
    f.write(" ".join(str(v) for v in ("RESULT", ctx.rank, ctx.world_size, ctx.tp_rank,
                                      dist.get_backend(), int(t.item()))))
# tear gloo down before the interpreter exits: a rank still tearing down its gloo threads at
# exit can abort ("terminate called without an active exception")
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec is not on PATH")
def test_mpiexec_initialises_the_context(tmp_path):
    env = dict(os.environ, MASTER_PORT=str(free_port()))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(k, None)
    out = str(tmp_path / "result")
    proc = subprocess.run(["mpiexec", "-n", "2", sys.executable, "-c", MPI_SCRIPT, out],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [open(f"{out}.{r}").read() for r in range(2)]
    assert lines == ["RESULT 0 2 0 gloo 3", "RESULT 1 2 1 gloo 3"]
