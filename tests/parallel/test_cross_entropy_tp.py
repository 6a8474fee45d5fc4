"""vocab_parallel_cross_entropy(use_kernels=True) over tp = 2 (gloo, spawn) vs one process.

Each rank holds half of the padded vocabulary; the Triton shard statistics are combined over
the group and the gradient is written into the rank's logits shard. The gathered loss and
full-logits gradient must equal `cross_entropy_ref` on the whole logits (vocab padding on the
last shard: partly padded, and wholly padded when vocab_size <= V_pad / 2), in fp32 and bf16,
for non-uniform per-token upstream gradients; the no-grad (eval) path gives the same loss and
leaves the logits alone. The children inherit TRITON_INTERPRET=1 from tests/conftest.py (set
in os.environ before they are spawned), so the kernels run interpreted on CPU.
"""
import pytest
import torch

import _harness as T
from megacpt.kernels import cross_entropy_ref

V_PAD = 256
# (vocab_size, dtype): rank 1 holds 72 real columns / only padding
CASES = [(200, torch.float32), (200, torch.bfloat16), (100, torch.float32)]


def _inputs(vocab: int, dtype: torch.dtype):
    """Fixed logits [3, 5, V_PAD], targets [3, 5] (first and last real ids included) and
    per-token upstream gradients with zeros, identical on every rank."""
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(3, 5, V_PAD, generator=g) * 3).to(dtype)
    target = torch.randint(0, vocab, (3, 5), generator=g)
    target[0, 0], target[-1, -1] = 0, vocab - 1
    target[1, 2] = min(V_PAD // 2, vocab - 1)  # rank 1's first column when it is real
    dloss = torch.rand(3, 5, generator=g)
    dloss[0, 1] = dloss[2, 3] = 0.0
    return logits, target, dloss


def _tp_worker(cases) -> list:
    """On each rank: (loss, gathered full-logits gradient, eval loss, logits untouched?)."""
    import torch.distributed as dist

    from megacpt.parallel import comm
    from megacpt.parallel.context import ParallelContext
    from megacpt.parallel.layers import vocab_parallel_cross_entropy

    ctx = ParallelContext.build(tp=dist.get_world_size(), device="cpu")
    out = []
    for vocab, dtype in cases:
        logits, target, dloss = _inputs(vocab, dtype)
        local = comm.split(logits, ctx.tp_group, -1).clone()  # [3, 5, V_PAD / tp]
        before = local.clone()
        with torch.no_grad():
            eval_loss = vocab_parallel_cross_entropy(local, target, ctx.tp_group, vocab,
                                                     use_kernels=True)
        untouched = torch.equal(local, before)
        local.requires_grad_()
        strided = target.t().contiguous().t()  # non-contiguous, like the model's labels.t()
        loss = vocab_parallel_cross_entropy(local, strided, ctx.tp_group, vocab,
                                            use_kernels=True)
        (grad,) = torch.autograd.grad(loss, local, dloss)
        in_place = grad.data_ptr() == local.data_ptr()
        out.append((loss.detach(), comm.all_gather(grad, ctx.tp_group, -1), eval_loss,
                    untouched and in_place))
    return out


@pytest.fixture(scope="module")
def tp2():
    return T.run_distributed(_tp_worker, 2, CASES, timeout=300)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"v{v}-{d}" for v, d in CASES])
def test_tp2_kernel_path_matches_one_process(tp2, case):
    vocab, dtype = CASES[case]
    logits, target, dloss = _inputs(vocab, dtype)
    full = logits.clone().requires_grad_()
    ref = cross_entropy_ref(full, target, vocab)
    (g_ref,) = torch.autograd.grad(ref, full, dloss)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for rank in tp2:
        loss, grad, eval_loss, untouched_and_in_place = rank[case]
        assert loss.dtype == torch.float32 and grad.dtype == dtype
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(eval_loss, loss, rtol=0, atol=0)
        torch.testing.assert_close(grad.float(), g_ref.float(), **tol)
        assert not grad[..., vocab:].any(), "padding columns must get a zero gradient"
        assert untouched_and_in_place
    torch.testing.assert_close(tp2[0][case][0], tp2[1][case][0], rtol=0, atol=0)


def test_tp1_kernel_path_is_the_inplace_kernel():
    """One rank: use_kernels=True is kernels.cross_entropy(inplace=True) on the padded logits;
    the default (torch) path gives F.cross_entropy's loss on the unpadded columns up to fp32
    rounding (it reads the padded logits in place instead of copying the unpadded ones)."""
    from megacpt.parallel.cross_entropy import vocab_parallel_cross_entropy

    logits, target, dloss = _inputs(200, torch.float32)
    ref = vocab_parallel_cross_entropy(logits, target, None, 200)
    torch.testing.assert_close(ref, cross_entropy_ref(logits, target, 200), rtol=1e-6, atol=1e-6)
    x = logits.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(x, target, None, 200, use_kernels=True)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(loss, x, dloss)
    full = logits.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(cross_entropy_ref(full, target, 200), full, dloss)
    torch.testing.assert_close(grad, g_ref, rtol=1e-5, atol=1e-5)
    assert grad.data_ptr() == x.data_ptr()
