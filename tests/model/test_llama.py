"""The LLaMA2 model on one device: backends, recompute and kernels agree; loss is CE."""
import pytest
import torch
import torch.nn.functional as F

from megacpt.config import ModelConfig
from megacpt.model import LlamaModel


def _cfg(**kw):
    base = dict(vocab_size=300, seq_length=24)
    base.update(kw)
    return ModelConfig.from_size("tiny", **base)


def _loss_and_grads(model, tokens, labels):
    model.zero_grad()
    loss = model(tokens, labels=labels).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 300, (3, 24), generator=g)
    return tokens, torch.randint(0, 300, (3, 24), generator=g)


def test_loss_is_cross_entropy_of_logits(batch):
    tokens, labels = batch
    model = LlamaModel(_cfg())
    logits = model(tokens)
    assert logits.shape == (3, 24, 300)
    ref = F.cross_entropy(logits.reshape(-1, 300), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(model(tokens, labels=labels).reshape(-1), ref, atol=1e-5, rtol=1e-5)


def test_padded_vocab_columns_are_masked(batch):
    tokens, labels = batch
    model = LlamaModel(_cfg())
    assert model.output.weight.shape[0] == 384  # 300 padded to a multiple of 128
    with torch.no_grad():
        model.output.weight[300:] = 5.0  # large padded logits must not change the loss
    loss = model(tokens, labels=labels)
    ref = F.cross_entropy(model(tokens).reshape(-1, 300), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(loss.reshape(-1), ref, atol=1e-5, rtol=1e-5)


def test_initial_loss_near_uniform(batch):
    tokens, labels = batch
    loss = LlamaModel(_cfg())(tokens, labels=labels).mean().item()
    assert abs(loss - torch.log(torch.tensor(300.0)).item()) < 0.2


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_eager_and_sdpa_agree(batch, groups):
    tokens, labels = batch
    a = LlamaModel(_cfg(attention_backend="eager", num_query_groups=groups))
    b = LlamaModel(_cfg(attention_backend="sdpa", num_query_groups=groups))
    la, ga = _loss_and_grads(a, tokens, labels)
    lb, gb = _loss_and_grads(b, tokens, labels)
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=1e-5, rtol=1e-4, msg=n)


def test_attention_is_causal(batch):
    tokens, _ = batch
    model = LlamaModel(_cfg())
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 300
    torch.testing.assert_close(model(tokens)[:, :12], model(changed)[:, :12])
    assert not torch.allclose(model(tokens)[:, 12:], model(changed)[:, 12:])


def test_recompute_gives_same_grads(batch):
    tokens, labels = batch
    la, ga = _loss_and_grads(LlamaModel(_cfg()), tokens, labels)
    lb, gb = _loss_and_grads(LlamaModel(_cfg(recompute_activations=True)), tokens, labels)
    torch.testing.assert_close(la, lb)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], msg=n)


def test_kernels_on_off_same_loss_and_grads(batch):
    from megacpt.kernels import kernels_available

    ok, why = kernels_available(torch.device("cpu"))
    if not ok:
        pytest.skip(why)
    tokens, labels = batch
    la, ga = _loss_and_grads(LlamaModel(_cfg(use_kernels=False)), tokens, labels)
    model = LlamaModel(_cfg(use_kernels=True))
    assert model.use_kernels
    lb, gb = _loss_and_grads(model, tokens, labels)
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=1e-5, rtol=1e-4, msg=n)


def test_compiled_layers_same_loss_and_grads(batch):
    """--compile: inductor-compiled layers (C++ on CPU) match eager, names unchanged, with
    recompute too; a second step reuses the compiled code."""
    from torch._dynamo.utils import counters

    tokens, labels = batch
    counters.clear()
    eager = LlamaModel(_cfg(use_kernels=False))
    compiled = LlamaModel(_cfg(use_kernels=False, compile=True, recompute_activations=True))
    assert [n for n, _ in eager.named_parameters()] == [n for n, _ in compiled.named_parameters()]
    assert "compiled layers=on" in compiled.describe()
    for _ in range(2):
        la, ga = _loss_and_grads(eager, tokens, labels)
        lb, gb = _loss_and_grads(compiled, tokens, labels)
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], atol=1e-5, rtol=1e-4, msg=n)
        with torch.no_grad():
            for pe, pc in zip(eager.parameters(), compiled.parameters()):
                pe.sub_(0.5 * pe.grad)
                pc.sub_(0.5 * pc.grad)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really captured the layers


def test_same_seed_same_weights_other_seed_differs():
    a, b, c = LlamaModel(_cfg(), seed=7), LlamaModel(_cfg(), seed=7), LlamaModel(_cfg(), seed=8)
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
        if "norm" not in n:
            assert not torch.equal(pa, pc), n


def test_output_projection_init_is_scaled():
    m = LlamaModel(ModelConfig.from_size("debug-s", vocab_size=512, seq_length=16))
    qkv = m.layers["0"].attention.qkv.weight.std().item()
    proj = m.layers["0"].attention.proj.weight.std().item()
    assert abs(qkv - 0.02) < 0.002
    assert abs(proj - 0.02 / (2 * 4) ** 0.5) < 0.001


def test_bf16_forward_backward(batch):
    tokens, labels = batch
    model = LlamaModel(_cfg(), dtype=torch.bfloat16)
    loss = model(tokens, labels=labels)
    assert loss.dtype == torch.float32
    loss.mean().backward()
    assert model.layers["0"].mlp.down.weight.grad.dtype == torch.bfloat16


def test_too_long_sequence_is_clear_error():
    model = LlamaModel(_cfg())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 40, dtype=torch.long))


def test_flash_attn_requested_without_package_is_clear():
    with pytest.raises(RuntimeError, match="flash_attn"):
        LlamaModel(_cfg(attention_backend="flash_attn"))


@pytest.mark.gpu
def test_cuda_bf16_backends_agree(batch):
    tokens, labels = (t.cuda() for t in batch)
    a = LlamaModel(_cfg(attention_backend="eager"), dtype=torch.bfloat16, device="cuda")
    b = LlamaModel(_cfg(attention_backend="auto"), dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(a(tokens, labels=labels), b(tokens, labels=labels), atol=2e-2, rtol=2e-2)
