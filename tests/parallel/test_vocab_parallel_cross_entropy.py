"""The torch (reference) path of `megacpt.parallel.cross_entropy` on one rank, vs
`cross_entropy_ref` (F.cross_entropy on the unpadded columns, in fp32).

It computes the loss from per-row statistics read in place from the padded logits and the
gradient block by block, so it must match the reference in loss and gradient for fp32 and
bf16 logits, padded and unpadded, with rows spread over several blocks; leave the logits
untouched; give NaN for an out-of-vocabulary target; and never allocate an fp32 copy of the
whole logits (checked with the profiler's allocation records)."""
import json

import pytest
import torch

from megacpt.kernels import cross_entropy_ref
from megacpt.parallel import cross_entropy as CE


def _case(dtype, v_pad=300, n=(4, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*n, v_pad, generator=g) * 4).to(dtype)
    target = torch.randint(0, 250, n, generator=g)
    dloss = torch.rand(n, generator=g)
    dloss[0, 0] = 0.0
    return logits, target, dloss


@pytest.mark.parametrize("dtype,vocab,block", [(torch.float32, 250, 1 << 24),
                                               (torch.float32, 300, 1000),
                                               (torch.bfloat16, 250, 600)])
def test_torch_path_matches_reference(monkeypatch, dtype, vocab, block):
    monkeypatch.setattr(CE, "_BLOCK_ELEMS", block)  # small blocks: rows span several
    logits, target, dloss = _case(dtype)
    before = logits.clone()
    x = logits.clone().requires_grad_()
    loss = CE.vocab_parallel_cross_entropy(x, target, None, vocab)
    ref_in = logits.clone().requires_grad_()
    ref = cross_entropy_ref(ref_in.float(), target, vocab)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=2e-6)
    (grad,) = torch.autograd.grad(loss, x, dloss)
    (g_ref,) = torch.autograd.grad(ref, ref_in, dloss)
    assert grad.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(grad, g_ref, **tol)
    assert not grad[..., vocab:].any(), "padding columns get a zero gradient"
    assert torch.equal(x.detach(), before), "the torch path leaves the logits alone"
    with torch.no_grad():  # eval: statistics only, the same loss
        torch.testing.assert_close(CE.vocab_parallel_cross_entropy(x, target, None, vocab),
                                   loss.detach(), rtol=0, atol=0)


def test_out_of_vocabulary_target_gives_nan():
    logits, target, _ = _case(torch.float32)
    target[1, 2] = 260  # a padding column
    loss = CE.vocab_parallel_cross_entropy(logits, target, None, 250)
    assert torch.isnan(loss[1, 2]) and torch.isfinite(loss[0]).all()


def test_no_fp32_copy_of_the_logits(tmp_path, monkeypatch):
    """bf16 logits [n, v]: forward + backward allocate at most the gradient (bf16, n x v) plus
    fp32 blocks bounded by _BLOCK_ELEMS - not the n x v fp32 copy F.cross_entropy needs."""
    from torch.profiler import ProfilerActivity, profile

    n, v = 512, 8192
    monkeypatch.setattr(CE, "_BLOCK_ELEMS", n * v // 16)
    logits = torch.randn(n, v).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, v - 100, (n,))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        CE.vocab_parallel_cross_entropy(logits, target, None, v - 100).sum().backward()
    trace = tmp_path / "t.json"
    prof.export_chrome_trace(str(trace))
    peak = max((e["args"]["Total Allocated"] for e in json.loads(trace.read_text())["traceEvents"]
                if e.get("name") == "[memory]"), default=0)
    fp32_copy = n * v * 4
    assert peak < fp32_copy, f"peak {peak} B reaches an fp32 copy of the logits ({fp32_copy} B)"
