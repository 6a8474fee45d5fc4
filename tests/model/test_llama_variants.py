"""Model variants on one device: the tied output layer is the embedding (one parameter, both
gradients), a 152k vocabulary with the chunked LM-head loss equals the whole-logits path,
RoPE scaling changes only long-wavelength frequencies, unsupported scalings are refused."""
import math

import pytest
import torch

from megacpt.config import ConfigError, ModelConfig
from megacpt.model import LlamaModel
from megacpt.model.attention import rotary_inv_freq

QWEN_VOCAB = 151936  # Qwen2.5's


def _cfg(**kw):
    base = dict(vocab_size=300, seq_length=24, attention_backend="eager", use_kernels=False)
    base.update(kw)
    return ModelConfig.from_size("tiny", **base)


def test_tied_output_is_the_embedding_with_both_gradients():
    model = LlamaModel(_cfg(tie_word_embeddings=True, add_qkv_bias=True))
    names = [n for n, _ in model.named_parameters()]
    assert "output.weight" not in names and names.count("embedding.weight") == 1
    assert "layers.0.attention.qkv.bias" in names
    assert model.output_weight is model.embedding.weight
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 300, (2, 24), generator=g)
    labels = torch.randint(0, 300, (2, 24), generator=g)
    model(tokens, labels).mean().backward()
    grad = model.embedding.weight.grad.clone()
    # reference: the same weights untied, embedding and output gradients summed
    untied = LlamaModel(_cfg(add_qkv_bias=True), seed=None)
    sd = dict(model.state_dict())
    sd["output.weight"] = sd["embedding.weight"]
    untied.load_state_dict(sd)
    untied(tokens, labels).mean().backward()
    torch.testing.assert_close(grad, untied.embedding.weight.grad + untied.output.weight.grad)
    assert model.cfg.num_parameters() == sum(p.numel() for p in model.parameters())


def test_152k_vocab_chunked_loss_equals_whole_logits():
    whole = LlamaModel(_cfg(vocab_size=QWEN_VOCAB, tie_word_embeddings=True, seq_length=16))
    chunked = LlamaModel(_cfg(vocab_size=QWEN_VOCAB, tie_word_embeddings=True, seq_length=16,
                              cross_entropy_chunk_tokens=7))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, QWEN_VOCAB, (2, 16), generator=g)
    labels = torch.randint(0, QWEN_VOCAB, (2, 16), generator=g)
    a, b = whole(tokens, labels), chunked(tokens, labels)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    a.mean().backward()
    b.mean().backward()
    for (n, p), q in zip(whole.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_rope_scaling_llama3_and_refusals():
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    base, scaled = rotary_inv_freq(32, 500000.0), rotary_inv_freq(32, 500000.0, rs)
    wavelen = 2 * math.pi / base
    short, long_ = wavelen < 64 / 4, wavelen > 64 / 1
    assert torch.equal(scaled[short], base[short])  # high frequencies kept
    torch.testing.assert_close(scaled[long_], base[long_] / 8)  # low ones divided by factor
    lin = rotary_inv_freq(32, 10000.0, {"rope_type": "linear", "factor": 2.0})
    torch.testing.assert_close(lin, rotary_inv_freq(32, 10000.0) / 2)
    for kind in ("dynamic", "yarn", "longrope"):
        with pytest.raises(ConfigError, match=f"rope_type '{kind}' is not supported"):
            _cfg(rope_scaling={"rope_type": kind, "factor": 2.0})
    with pytest.raises(ConfigError, match="needs a positive number 'low_freq_factor'"):
        _cfg(rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ConfigError, match="longer than the sliding_window 16"):
        _cfg(sliding_window=16)
