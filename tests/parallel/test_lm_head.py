"""Chunked LM head + cross entropy (`megacpt.parallel.lm_head`) against the unchunked path.

The reference is the logits materialised whole: `vocab_parallel_cross_entropy(F.linear(x, W))`
with the same `use_kernels`. The chunked loss, dx and dW must match it for chunk sizes 1, 7
(not dividing n), n and > n, with vocabulary padding, per-token upstream gradients with
zeros, in fp32 (tight) and bf16 (bf16 tolerance), torch and Triton statistics (the kernels
run interpreted on CPU: TRITON_INTERPRET is set by tests/conftest.py). LlamaModel with
cross_entropy_chunk_tokens=5 must give the loss and every gradient of the unchunked model,
and over 2 ranks (tp2, with and without sequence parallelism) train like one process; a tp2
op check covers a shard that is all vocabulary padding. Config and CLI wiring at the end.
"""
import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F

import _harness as T
from megacpt.arguments import parse_args
from megacpt.config import ConfigError, ModelConfig
from megacpt.kernels import kernels_available
from megacpt.model import LlamaModel
from megacpt.parallel.layers import vocab_parallel_cross_entropy
from megacpt.parallel.lm_head import chunked_lm_head_loss

N, H = 13, 24
KERNELS = [False, pytest.param(True, id="kernels")]
FP32 = dict(rtol=1e-6, atol=1e-6)


def _need_kernels(use_kernels: bool) -> None:
    ok, why = kernels_available()
    if use_kernels and not ok:
        pytest.skip(why)


def _inputs(n=N, h=H, v_pad=64, vocab=50, dtype=torch.float32, seed=0):
    """x [n, h], weight [v_pad, h] (logits of a few units), target [n] with the first and last
    real ids, upstream grad [n] with zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).to(dtype)
    w = (torch.randn(v_pad, h, generator=g) * 0.5).to(dtype)
    target = torch.randint(0, vocab, (n,), generator=g)
    target[0], target[-1] = 0, vocab - 1
    dloss = torch.rand(n, generator=g) * 2
    dloss[1] = dloss[n // 2] = 0.0
    return x, w, target, dloss


def _loss_and_grads(fn, x, w, target, dloss):
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(xr, wr, target)
    dx, dw = torch.autograd.grad(loss, (xr, wr), dloss)
    return loss.detach(), dx, dw


def _compare(vocab, v_pad, chunk, use_kernels, dtype, tol, n=N):
    x, w, target, dloss = _inputs(n=n, v_pad=v_pad, vocab=vocab, dtype=dtype)
    ref = _loss_and_grads(lambda a, b, t: vocab_parallel_cross_entropy(
        F.linear(a, b), t, None, vocab, use_kernels), x, w, target, dloss)
    got = _loss_and_grads(lambda a, b, t: chunked_lm_head_loss(
        a, b, t, None, vocab, chunk, use_kernels), x, w, target, dloss)
    for name, a, e in zip(("loss", "dx", "dw"), got, ref):
        assert a.dtype == e.dtype, name
        scale = max(1.0, e.float().abs().max().item())
        torch.testing.assert_close(a.float(), e.float(), rtol=tol["rtol"],
                                   atol=tol["atol"] * scale, msg=lambda m, n=name: f"{n}: {m}")
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == dtype
    assert got[1][1].abs().max() == 0  # a token with zero upstream grad adds nothing to dx


@pytest.mark.parametrize("use_kernels", KERNELS)
@pytest.mark.parametrize("chunk", [1, 7, N, N + 5])
def test_chunked_equals_unchunked_fp32(chunk, use_kernels):
    _need_kernels(use_kernels)
    _compare(vocab=50, v_pad=64, chunk=chunk, use_kernels=use_kernels, dtype=torch.float32,
             tol=FP32)


@pytest.mark.parametrize("use_kernels", KERNELS)
def test_chunked_equals_unchunked_bf16(use_kernels):
    _need_kernels(use_kernels)
    _compare(vocab=50, v_pad=64, chunk=7, use_kernels=use_kernels, dtype=torch.bfloat16,
             tol=dict(rtol=3e-2, atol=3e-2))


@pytest.mark.parametrize("use_kernels", KERNELS)
def test_chunked_wide_vocab(use_kernels):
    """Rows wider than one kernel block (4096 columns), padding in the last block."""
    _need_kernels(use_kernels)
    _compare(vocab=5000, v_pad=5120, chunk=4, use_kernels=use_kernels, dtype=torch.float32,
             tol=dict(rtol=1e-5, atol=1e-6), n=9)


def test_saves_no_logits_and_eval_matches():
    x, w, target, _ = _inputs()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = chunked_lm_head_loss(xr, wr, target, None, 50, 4)
    shapes = sorted(tuple(t.shape) for t in loss.grad_fn.saved_tensors)
    assert shapes == sorted([(N, H), (64, H), (N,), (N,)])  # x, weight, target, lse
    with torch.no_grad():
        assert torch.equal(chunked_lm_head_loss(x, w, target, None, 50, 4), loss.detach())


@pytest.mark.parametrize("chunk", [0, -3])
def test_rejects_bad_chunk_tokens(chunk):
    x, w, target, _ = _inputs()
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        chunked_lm_head_loss(x, w, target, None, 50, chunk)


def test_rejects_bad_shapes():
    x, w, target, _ = _inputs()
    with pytest.raises(ValueError, match="target must be int64"):
        chunked_lm_head_loss(x, w, target[:-1], None, 50, 4)
    with pytest.raises(ValueError, match="same h"):
        chunked_lm_head_loss(x, w[:, :-1], target, None, 50, 4)


# ----------------------------------------------------------------------------- the model
def _model_loss_grads(cfg, tokens, labels, weights):
    model = LlamaModel(cfg, seed=7)
    loss = model(tokens, labels)  # [b, s]
    (loss * weights).sum().backward()
    with torch.no_grad():
        eval_loss = model(tokens, labels)
    return loss.detach(), eval_loss, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("use_kernels", KERNELS)
def test_model_chunked_equals_unchunked(use_kernels):
    _need_kernels(use_kernels)
    cfg = T.tiny_model_config(use_kernels=use_kernels,
                              num_layers=2 if use_kernels else 5)  # interpreter: fewer layers
    (tokens, labels), = T.random_global_batches(1, 2, cfg.seq_length, cfg.vocab_size, seed=5)
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1))
    weights[0, :3] = 0.0
    ref = _model_loss_grads(cfg, tokens, labels, weights)
    got = _model_loss_grads(dataclasses.replace(cfg, cross_entropy_chunk_tokens=5), tokens,
                            labels, weights)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)
    assert got[0].shape == labels.shape
    torch.testing.assert_close(got[1], ref[1], rtol=1e-6, atol=1e-6)
    assert got[2].keys() == ref[2].keys()
    for name, g in ref[2].items():
        torch.testing.assert_close(got[2][name], g, rtol=1e-5, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------- 2 ranks
CFG = T.tiny_model_config(cross_entropy_chunk_tokens=5)
OPT = T.tiny_optim_config()
MBS, GLOBAL, STEPS = 2, 4, 3
BATCHES = T.random_global_batches(STEPS, GLOBAL, CFG.seq_length, CFG.vocab_size, seed=3)
LAYOUTS = [dict(tp=2), dict(tp=2, sequence_parallel=True)]
# (vocab, use_kernels): 200 leaves rank 1 72 real columns of 128, 60 leaves it only padding
OP_CASES = [(200, False), (60, False), (200, True), (60, True)]


def _tp_op_check(cases) -> list:
    """On each rank, per case: chunked vs unchunked (loss, dx, this shard's dW) at tp = 2."""
    import torch.distributed as dist

    from megacpt.parallel import comm
    from megacpt.parallel.context import ParallelContext

    ctx = ParallelContext.build(tp=dist.get_world_size(), device="cpu")
    group = ctx.tp_group

    def head(x, w, target, vocab, use_kernels, chunk):  # chunk 0: the logits whole
        x = comm.copy_to_tp(x, group)
        if chunk:
            return chunked_lm_head_loss(x, w, target, group, vocab, chunk, use_kernels)
        return vocab_parallel_cross_entropy(F.linear(x, w), target, group, vocab, use_kernels)

    out = []
    for vocab, use_kernels in cases:
        x, w, target, dloss = _inputs(v_pad=256, vocab=vocab)
        w = comm.split(w, group, 0)  # [128, h], this rank's vocabulary shard
        out.append([_loss_and_grads(functools.partial(head, vocab=vocab, use_kernels=use_kernels,
                                                      chunk=chunk), x, w, target, dloss)
                    for chunk in (0, 4)])
    return out


def _world(jobs, cases) -> tuple:
    return T.jobs_worker(jobs), _tp_op_check(cases)


@pytest.fixture(scope="module")
def tp2():
    cases = [c for c in OP_CASES if not c[1] or kernels_available()[0]]
    with T.torch_threads(1):
        one = T.train_losses(CFG, OPT, BATCHES, MBS)
        whole = T.train_losses(dataclasses.replace(CFG, cross_entropy_chunk_tokens=0), OPT,
                               BATCHES, MBS)
    jobs = [("train_losses", dict(model_cfg=CFG, optim_cfg=OPT, batches=BATCHES,
                                  micro_batch_size=MBS, **lay)) for lay in LAYOUTS]
    ranks = T.run_distributed(_world, 2, jobs, cases, timeout=300)
    return one, whole, ranks, cases


def test_chunked_trains_like_unchunked(tp2):
    one, whole, _, _ = tp2
    # the layout tests' tolerances: a 1e-2 LR and a binding clip amplify rounding over steps
    assert one["losses"] == pytest.approx(whole["losses"], rel=1e-5)
    assert one["grad_norms"] == pytest.approx(whole["grad_norms"], rel=1e-4)


def test_tp2_chunked_layouts_equal_one_process(tp2):
    one, _, ranks, _ = tp2
    layouts = ranks[0][0]
    assert [r["layout"] for r in layouts] == ["tp2pp1dp1", "tp2pp1dp1+sp"]
    for r in layouts:
        assert r["losses"] == pytest.approx(one["losses"], rel=1e-5), r["layout"]
        assert r["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5), r["layout"]
        assert r["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-4), r["layout"]


def test_tp2_chunked_op_equals_unchunked(tp2):
    _, _, ranks, cases = tp2
    for rank, (_, results) in enumerate(ranks):
        for (vocab, use_kernels), (ref, got) in zip(cases, results):
            for name, a, e in zip(("loss", "dx", "dw"), got, ref):
                where = f"rank {rank} vocab {vocab} kernels {use_kernels} {name}"
                torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6,
                                           msg=lambda m, where=where: f"{where}: {m}")
            assert torch.isfinite(got[0]).all()


# ----------------------------------------------------------------------------- config + CLI
def test_config_rejects_negative_chunk_tokens():
    assert ModelConfig().cross_entropy_chunk_tokens == 0
    with pytest.raises(ConfigError, match="cross_entropy_chunk_tokens"):
        ModelConfig(cross_entropy_chunk_tokens=-1)


def test_cli_flag_reaches_config():
    base = ["--model-size", "tiny", "--vocab-size", "300", "--mock-data", "--seq-length", "16",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1"]
    cfg, _ = parse_args(base)
    assert cfg.model.cross_entropy_chunk_tokens == 0
    cfg, _ = parse_args(base + ["--cross-entropy-chunk-tokens", "4096"])
    assert cfg.model.cross_entropy_chunk_tokens == 4096
    with pytest.raises(ConfigError, match="cross_entropy_chunk_tokens"):
        parse_args(base + ["--cross-entropy-chunk-tokens", "-1"])
