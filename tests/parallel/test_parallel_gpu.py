"""GPU tier: the CPU suite's single-rank checks on CUDA with an NCCL process group.

Skipped without CUDA (tests/conftest.py). One spawned rank initialises NCCL, trains the tiny
model on the GPU (plain and ZeRO-1 optimizer, torch's fused AdamW kernel) and must match the
CPU single-process run; bf16 must train close to fp32.
"""
import pytest
import torch

import _harness as T

pytestmark = pytest.mark.gpu

CFG = T.tiny_model_config()
OPT = T.tiny_optim_config()
BATCHES = T.random_global_batches(5, 8, CFG.seq_length, CFG.vocab_size, seed=11)


def _train(**kw):
    return ("train_losses", dict(model_cfg=CFG, optim_cfg=OPT, batches=BATCHES,
                                 micro_batch_size=2, device="cuda", **kw))


@pytest.fixture(scope="module")
def cuda_runs():
    jobs = [_train(), _train(use_distributed_optimizer=True), _train(dtype=torch.bfloat16),
            _train(pp=1, tp=1, bucket_size_mb=0.002)]
    return T.run_distributed(T.jobs_worker, 1, jobs, backend="nccl", timeout=600)[0]


@pytest.fixture(scope="module")
def cpu_reference():
    with T.torch_threads(1):
        return T.train_losses(CFG, OPT, BATCHES, 2)


def test_cuda_nccl_single_rank_equals_cpu(cuda_runs, cpu_reference):
    plain, zero1, _, buckets = cuda_runs
    for run in (plain, zero1, buckets):
        assert run["losses"] == pytest.approx(cpu_reference["losses"], rel=1e-4), run["layout"]
        assert run["eval_loss"] == pytest.approx(cpu_reference["eval_loss"], rel=1e-4)
        assert run["grad_norms"] == pytest.approx(cpu_reference["grad_norms"], rel=1e-3)


def test_cuda_bf16_trains_close_to_fp32(cuda_runs):
    plain, _, bf16, _ = cuda_runs
    assert bf16["layout"].endswith("+bfloat16")
    assert bf16["losses"] == pytest.approx(plain["losses"], rel=2e-2)


def test_fused_adamw_is_used_on_cuda():
    from megacpt.model import LlamaModel
    from megacpt.parallel.context import ParallelContext
    from megacpt.parallel.optimizer import build_optimizer

    ctx = ParallelContext.single("cuda")
    model = LlamaModel(CFG, ctx, dtype=torch.bfloat16, device="cuda")
    opt = build_optimizer(model, OPT, ctx)
    assert "fused" in opt.impl
    assert all(s.device.type == "cuda" for s in opt.steps)
