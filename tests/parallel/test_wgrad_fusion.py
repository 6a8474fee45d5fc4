"""Gradient-accumulation fusion (megacpt.parallel.wgrad): linear layers add weight gradients
straight into the fp32 main grads. It must give the unfused main grads and losses, keep the
GradBuffer hooks counting every parameter (they start the dp reductions), leave no .grad
behind, switch off with the hooks, and stay out of torch.compile'd layers. (The multi-rank
layout tests in test_layouts.py run with it on: it is the default.)"""
import dataclasses

import pytest
import torch

import _harness as T
from megacpt.arguments import parse_args
from megacpt.model import LlamaModel
from megacpt.parallel.context import ParallelContext
from megacpt.parallel.optimizer import build_optimizer
from megacpt.parallel.schedule import forward_backward
from megacpt.parallel.wgrad import accumulate_wgrad, linear, wgrad_path

CFG = T.tiny_model_config(num_layers=2)
OPT = T.tiny_optim_config()
BATCHES = T.random_global_batches(3, 4, CFG.seq_length, CFG.vocab_size, seed=7)


@pytest.mark.parametrize("dtype,path", [(torch.float32, "addmm_"),
                                        (torch.bfloat16, "upcast addmm_")])
def test_accumulate_wgrad_adds_dy_t_x(dtype, path):
    assert wgrad_path(torch.device("cpu"), dtype) == path
    g = torch.Generator().manual_seed(0)
    dy, x = (torch.randn(13, k, generator=g).to(dtype) for k in (6, 5))  # [n, out], [n, in]
    acc = torch.randn(6, 5, generator=g)
    want = acc + dy.float().t() @ x.float()  # bf16 inputs, fp32 product and sum
    accumulate_wgrad(acc, dy, x)
    torch.testing.assert_close(acc, want, rtol=1e-6, atol=1e-6)


def _main_grads(fuse: bool, dtype=torch.float32, **cfg):
    """Main grads after one 2-micro-batch forward_backward, and the parameters' .grad."""
    ctx = ParallelContext.single("cpu")
    model = LlamaModel(dataclasses.replace(CFG, **cfg), ctx, dtype=dtype, seed=3)
    opt = build_optimizer(model, OPT, ctx, gradient_accumulation_fusion=fuse)
    tokens, labels = BATCHES[0]
    mbs = [{"tokens": tokens[i:i + 2], "labels": labels[i:i + 2]} for i in (0, 2)]
    opt.zero_grad()
    loss = forward_backward(model, mbs, ctx, grad_sync=opt.grad_sync)
    grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    return loss, grads, model, opt


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_fused_main_grads_equal_unfused(dtype, tol):
    loss_a, fused, model, opt = _main_grads(True, dtype)
    loss_b, plain, _, _ = _main_grads(False, dtype)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for n in plain:
        scale = plain[n].abs().max().item() or 1.0
        torch.testing.assert_close(fused[n], plain[n], rtol=tol, atol=tol * scale, msg=n)
        assert fused[n].abs().max() > 0, n
    for n, p in model.named_parameters():
        assert p.grad is None, n  # the placeholders were dropped by the hooks
        assert p.grad_added_to_main_grad is False, n
    # every parameter reported ready in the final backward (this is what starts dp reductions)
    assert all(b.ready == len(b.params) for b in opt.buffer.buckets)


def test_fused_training_losses_equal_unfused():
    a = T.train_losses(CFG, OPT, BATCHES, 2, gradient_accumulation_fusion=True)
    b = T.train_losses(CFG, OPT, BATCHES, 2, gradient_accumulation_fusion=False)
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-6)
    assert a["grad_norms"] == pytest.approx(b["grad_norms"], rel=1e-5)


def test_removed_hooks_turn_fusion_off():
    _, _, model, opt = _main_grads(True)
    opt.buffer.remove_hooks()
    tokens, labels = BATCHES[1]
    model(tokens, labels).mean().backward()
    ref = LlamaModel(CFG, ParallelContext.single("cpu"), seed=3)
    ref.load_state_dict(model.state_dict())
    ref(tokens, labels).mean().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)  # real gradients in .grad again


def test_linear_is_plain_without_enrolment_or_grad():
    w = torch.randn(4, 3, requires_grad=True)
    w.fuse_wgrad = True  # enrolled but no gradient recorded: no main_grad needed
    x = torch.randn(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w), x @ w.t())
    v = torch.randn(4, 3, requires_grad=True)  # not enrolled: autograd's own gradient
    linear(x, v).sum().backward()
    torch.testing.assert_close(v.grad, torch.ones(2, 4).t() @ x)


@pytest.mark.parametrize("variant", [{"compile": True}, {"recompute_activations": True}],
                         ids=["compile", "recompute"])
def test_fusion_with_compiled_or_recomputed_layers(variant):
    _, eager, _, _ = _main_grads(True)
    _, other, _, _ = _main_grads(True, **variant)
    for n in eager:
        torch.testing.assert_close(other[n], eager[n], rtol=1e-4, atol=1e-5, msg=n)


def test_cli_flag_reaches_config():
    base = ["--model-size", "tiny", "--vocab-size", "300", "--mock-data", "--seq-length", "16",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1"]
    assert parse_args(base)[0].parallel.gradient_accumulation_fusion is True
    cfg, _ = parse_args(base + ["--no-gradient-accumulation-fusion"])
    assert cfg.parallel.gradient_accumulation_fusion is False


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_weights_accumulate_in_fp32(dtype):
    dev = torch.device("cuda")
    path = wgrad_path(dev, dtype)
    assert path in ("addmm out_dtype", "mm + add_")
    g = torch.Generator(device=dev).manual_seed(0)
    dy = torch.randn(4096, 512, device=dev, generator=g).to(dtype)
    x = torch.randn(4096, 256, device=dev, generator=g).to(dtype)
    acc = torch.randn(512, 256, device=dev, generator=g)
    want = acc + dy.float().t() @ x.float()
    accumulate_wgrad(acc, dy, x)
    torch.testing.assert_close(acc, want, rtol=2e-2, atol=2e-1)
