"""MegaOptimizer in one process: equals torch AdamW + clip_grad_norm_, bf16 masters, buckets,
non-finite skips, state round trips. (dp / ZeRO-1 / tp / pp equality: test_layouts.py.)"""
import math

import pytest
import torch

from megacpt.model import LlamaModel
from megacpt.parallel.context import ParallelContext
from megacpt.parallel.grads import GradBuffer
from megacpt.parallel.optimizer import build_optimizer, clip_coefficient
from megacpt.parallel.schedule import forward_backward, split_global_batch
from _harness import (random_global_batches, tiny_model_config, tiny_optim_config,
                             train_losses)

CFG = tiny_model_config(num_layers=2)
OPT = tiny_optim_config()
BATCHES = random_global_batches(4, 4, CFG.seq_length, CFG.vocab_size, seed=3)


def reference_adamw(dtype=torch.float32, steps=BATCHES):
    """Plain loop: one backward of the global-batch mean, fp32 masters, torch AdamW, clip."""
    model = LlamaModel(CFG, dtype=dtype, seed=1234)
    params = list(model.parameters())
    masters = [p.detach().float().clone().requires_grad_() for p in params]
    opt = torch.optim.AdamW(
        [{"params": [m for m, p in zip(masters, params) if p.dim() >= 2],
          "weight_decay": OPT.weight_decay},
         {"params": [m for m, p in zip(masters, params) if p.dim() < 2], "weight_decay": 0.0}],
        lr=OPT.lr, betas=(OPT.adam_beta1, OPT.adam_beta2), eps=OPT.adam_eps)
    losses, norms = [], []
    for tokens, labels in steps:
        model.zero_grad()
        # the mean of the two micro-batch means, as the schedule computes it
        loss = sum(model(tokens[i:i + 2], labels[i:i + 2]).float().mean() for i in (0, 2)) / 2
        loss.backward()
        for m, p in zip(masters, params):
            m.grad = p.grad.float()
        norms.append(torch.nn.utils.clip_grad_norm_(masters, OPT.clip_grad).item())
        opt.step()
        with torch.no_grad():
            for m, p in zip(masters, params):
                p.copy_(m)
        losses.append(loss.item())
    return losses, norms


def test_equals_torch_adamw_with_clipping():
    ref_losses, ref_norms = reference_adamw()
    got = train_losses(CFG, OPT, BATCHES, micro_batch_size=2)
    assert max(ref_norms) > OPT.clip_grad  # clipping is exercised
    assert got["losses"] == pytest.approx(ref_losses, rel=1e-6)
    assert got["grad_norms"] == pytest.approx(ref_norms, rel=1e-5)


def test_many_small_buckets_equal_one_bucket():
    one = train_losses(CFG, OPT, BATCHES[:2], 2)
    many = train_losses(CFG, OPT, BATCHES[:2], 2, bucket_size_mb=0.01)
    assert many["losses"] == one["losses"] and many["grad_norms"] == one["grad_norms"]


def test_bf16_params_fp32_masters_and_main_grads():
    ref_losses, ref_norms = reference_adamw(torch.bfloat16, BATCHES[:3])
    got = train_losses(CFG, OPT, BATCHES[:3], 2, dtype=torch.bfloat16)
    assert got["losses"] == pytest.approx(ref_losses, rel=1e-3)
    assert got["grad_norms"] == pytest.approx(ref_norms, rel=1e-2)

    model = LlamaModel(CFG, dtype=torch.bfloat16, seed=1)
    opt = build_optimizer(model, OPT, ParallelContext.single("cpu"))
    assert all(p.main_grad.dtype == torch.float32 for p in model.parameters())
    assert all(m.dtype == torch.float32 for m in opt.masters)
    sd = opt.state_dict()
    name = "layers.0.attention.qkv.weight"
    assert sd["state"][name]["master"].dtype == torch.float32
    assert sd["state"][name]["master"].shape == model.get_parameter(name).shape


def _one_step(model, opt, tokens, labels, lr=1e-2):
    ctx = model.ctx
    opt.zero_grad()
    loss = forward_backward(model, split_global_batch(tokens, labels, 2, ctx), ctx,
                            grad_sync=opt.grad_sync)
    return loss, opt.step(lr)


def test_nonfinite_gradient_skips_update():
    model = LlamaModel(CFG, seed=1)
    opt = build_optimizer(model, OPT, model.ctx)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    tokens, labels = BATCHES[0]
    forward_backward(model, split_global_batch(tokens, labels, 2, model.ctx), model.ctx,
                     grad_sync=opt.grad_sync)
    model.get_parameter("final_norm.weight").main_grad[0] = float("nan")
    norm, applied = opt.step(1e-2)
    assert not applied and math.isnan(norm) and opt.step_count == 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        # cleared lazily: the next step's first gradient overwrites the NaN (checked below)
        assert p.main_grad_empty, f"{n}: grads not cleared after a skipped step"
    loss, (norm, applied) = _one_step(model, opt, tokens, labels)
    assert applied and math.isfinite(norm) and opt.step_count == 1


def test_second_optimizer_on_a_model_replaces_the_first():
    model = LlamaModel(CFG, seed=1234)
    build_optimizer(model, OPT, model.ctx)
    opt = build_optimizer(model, OPT, model.ctx)
    got = _one_step(model, opt, *BATCHES[0])
    fresh = LlamaModel(CFG, seed=1234)
    assert got == _one_step(fresh, build_optimizer(fresh, OPT, fresh.ctx), *BATCHES[0])


def test_weight_decay_only_on_matrices():
    model = LlamaModel(CFG, seed=1)
    opt = build_optimizer(model, OPT, model.ctx)
    norm_w = model.get_parameter("final_norm.weight")
    mat = model.get_parameter("layers.0.mlp.down.weight")
    w0, m0 = norm_w.detach().clone(), mat.detach().clone()
    opt.zero_grad()
    norm, applied = opt.step(0.5)  # zero gradients: only weight decay moves anything
    assert applied and norm == 0.0
    assert torch.equal(norm_w, w0)
    torch.testing.assert_close(mat, m0 * (1 - 0.5 * OPT.weight_decay))


def test_state_dict_round_trip_continues_identically():
    def fresh():
        m = LlamaModel(CFG, seed=1234)
        return m, build_optimizer(m, OPT, m.ctx)

    model, opt = fresh()
    for tokens, labels in BATCHES[:2]:
        _one_step(model, opt, tokens, labels)
    sd = opt.state_dict()
    assert sd["step"] == 2 and set(sd["state"]) == {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        assert set(sd["state"][n]) == {"exp_avg", "exp_avg_sq"}  # fp32: no separate master
        assert sd["state"][n]["exp_avg"].shape == p.shape
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    saved = {n: {k: v.clone() for k, v in st.items()} for n, st in sd["state"].items()}
    cont = [_one_step(model, opt, *b) for b in BATCHES[2:]]

    model2, opt2 = fresh()
    opt2.load_state_dict({"step": 2, "param_groups": sd["param_groups"], "state": saved})
    model2.load_state_dict(weights)  # weights loaded after the optimizer state: still fine
    cont2 = [_one_step(model2, opt2, *b) for b in BATCHES[2:]]
    assert cont2 == cont


def test_load_state_dict_errors_name_the_problem():
    model = LlamaModel(CFG, seed=1)
    opt = build_optimizer(model, OPT, model.ctx)
    sd = opt.state_dict()
    with pytest.raises(KeyError, match="lacks parameters"):
        opt.load_state_dict({"step": 0, "state": {}})
    name = "output.weight"
    sd["state"][name]["exp_avg"] = sd["state"][name]["exp_avg"][:10]
    with pytest.raises(ValueError, match="output.weight.exp_avg has shape"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("dp", [2, 3])
def test_zero1_pieces_partition_every_parameter(dp):
    """Over the dp ranks, ZeRO-1 pieces cover each parameter element exactly once, also when
    buckets are padded (odd sizes) and when shard edges cut through parameters."""
    model = LlamaModel(tiny_model_config(num_layers=1, hidden_size=20, num_attention_heads=4,
                                         num_query_groups=2, ffn_hidden_size=35, vocab_size=100),
                       seed=1)
    named = list(model.named_parameters())
    padded_somewhere = False
    for mb in (25.0, 0.0005):
        cover = {n: torch.zeros(p.numel(), dtype=torch.int64) for n, p in named}
        for r in range(dp):
            ctx = ParallelContext(dp=dp, rank=r, world_size=dp)
            buf = GradBuffer(named, ctx, bucket_size_mb=mb, shard_over_dp=True)
            assert all(b.padded % dp == 0 and b.padded - b.numel < dp for b in buf.buckets)
            padded_somewhere |= any(b.padded > b.numel for b in buf.buckets)
            for pc in buf.pieces():
                cover[pc.name][pc.lo:pc.hi] += 1
                lo, hi = buf.shard_range(buf.buckets[pc.bucket])
                assert lo <= pc.start and pc.start + pc.hi - pc.lo <= hi
            buf.remove_hooks()
        assert all(bool((c == 1).all()) for c in cover.values())
    assert padded_somewhere or dp == 2


def test_clip_coefficient():
    assert clip_coefficient(2.0, 1.0) == pytest.approx(0.5, rel=1e-5)
    assert clip_coefficient(0.5, 1.0) == 1.0
    assert clip_coefficient(10.0, 0.0) == 1.0


@pytest.mark.parametrize("fuse", [True, False])
def test_lazy_main_grad_reset(fuse):
    """zero() does no memset: the step's first gradient overwrites stale (here NaN) main grads,
    later micro-batches add, and a parameter without a gradient reads 0 after finish()."""
    from megacpt.parallel.wgrad import linear

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.Parameter(torch.randn(3, 4))
            self.unused = torch.nn.Parameter(torch.randn(5))

        def forward(self, x):
            return linear(x, self.used)

    model = Two()
    buf = GradBuffer(list(model.named_parameters()), ParallelContext.single("cpu"),
                     fuse_wgrad=fuse)
    xs = [torch.randn(2, 4), torch.randn(6, 4)]
    for b in buf.buckets:
        b.grad.fill_(float("nan"))  # stale values of an earlier step
    buf.zero()
    for i, x in enumerate(xs):
        buf.set_final_backward(i == len(xs) - 1)
        model(x).square().sum().backward()
    buf.finish()
    want = sum(2 * (x @ model.used.detach().t()).t() @ x for x in xs)  # d/dW sum((xW^T)^2)
    torch.testing.assert_close(model.used.main_grad, want)
    assert torch.equal(model.unused.main_grad, torch.zeros(5))
