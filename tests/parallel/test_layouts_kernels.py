"""The Triton path under parallelism: with --use-kernels (RMSNorm, SwiGLU, QKV split + rotary,
vocab-parallel cross entropy), tp2 + sequence parallelism and pp2 train like one process
with the kernels, which trains like one process without them (CPU: triton's interpreter,
inherited by the spawned ranks from tests/conftest.py)."""
import dataclasses

import pytest

import _harness as T
from megacpt.kernels import kernels_available

CFG = T.tiny_model_config(use_kernels=True)
OPT = T.tiny_optim_config()
MBS, GLOBAL, STEPS = 2, 4, 3
BATCHES = T.random_global_batches(STEPS, GLOBAL, CFG.seq_length, CFG.vocab_size, seed=3)
LAYOUTS = [dict(tp=2, sequence_parallel=True), dict(pp=2)]


@pytest.fixture(scope="module")
def results():
    ok, why = kernels_available()
    if not ok:
        pytest.skip(why)
    with T.torch_threads(1):
        with_kernels = T.train_losses(CFG, OPT, BATCHES, MBS)
        without = T.train_losses(dataclasses.replace(CFG, use_kernels=False), OPT, BATCHES, MBS)
    jobs = [("train_losses", dict(model_cfg=CFG, optim_cfg=OPT, batches=BATCHES,
                                  micro_batch_size=MBS, **lay)) for lay in LAYOUTS]
    ranks = T.run_distributed(T.jobs_worker, 2, jobs, timeout=420)
    return with_kernels, without, ranks[0]


def test_kernels_train_like_torch(results):
    with_kernels, without, _ = results
    assert with_kernels["losses"] == pytest.approx(without["losses"], rel=1e-5)
    assert with_kernels["grad_norms"] == pytest.approx(without["grad_norms"], rel=1e-4)


def test_parallel_layouts_with_kernels_equal_one_process(results):
    with_kernels, _, layouts = results
    assert [r["layout"] for r in layouts] == ["tp2pp1dp1+sp", "tp1pp2dp1"]
    for r in layouts:
        assert r["losses"] == pytest.approx(with_kernels["losses"], rel=1e-5), r["layout"]
        assert r["eval_loss"] == pytest.approx(with_kernels["eval_loss"], rel=1e-5), r["layout"]
        assert r["grad_norms"] == pytest.approx(with_kernels["grad_norms"], rel=1e-4), r["layout"]
