"""Registered public shapes (Llama 3.x, Qwen2.5, Mistral): parameter counts equal
transformers' model of the same config (built on the meta device) and the published sizes;
--model-size, FLOPs and the communication-volume table work for them."""
import pytest
import torch

from megacpt import sizes
from megacpt.config import ModelConfig
from megacpt.parallel import volume

transformers = pytest.importorskip("transformers")

PUBLIC = list(sizes.PUBLIC_SIZES)


def hf_model_on_meta(cfg: ModelConfig):
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
              intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_attention_heads,
              num_key_value_heads=cfg.num_query_groups, rms_norm_eps=cfg.norm_eps,
              tie_word_embeddings=cfg.tie_word_embeddings)
    family = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
              "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
              "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}
    config_cls, model_cls = family[cfg.model_family]
    if cfg.model_family != "qwen2":
        kw["head_dim"] = cfg.head_dim
    with torch.device("meta"):
        return model_cls(config_cls(**kw))


@pytest.mark.parametrize("name", PUBLIC)
def test_param_count_equals_transformers(name):
    cfg = ModelConfig.from_size(name, make_vocab_size_divisible_by=1)
    hf = hf_model_on_meta(cfg)
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())
    assert cfg.tie_word_embeddings == (hf.lm_head.weight is hf.model.embed_tokens.weight)


def test_published_sizes_and_variants():
    count = {n: ModelConfig.from_size(n, make_vocab_size_divisible_by=1).num_parameters()
             for n in ("Llama-3.2-1B", "Llama-3.1-8B", "Qwen2.5-0.5B", "Mistral-7B")}
    assert count == {"Llama-3.2-1B": 1_235_814_400, "Llama-3.1-8B": 8_030_261_248,
                     "Qwen2.5-0.5B": 494_032_768, "Mistral-7B": 7_241_732_096}
    q = ModelConfig.from_size("Qwen2.5-1.5B", seq_length=4096)
    assert q.add_qkv_bias and q.tie_word_embeddings and q.rotary_base == 1e6
    assert q.vocab_size == 151936 and q.norm_eps == 1e-6
    ll = ModelConfig.from_size("Llama-3.1-8B", vocab_size=130000)  # a tokenizer's vocab wins
    assert ll.vocab_size == 130000 and ll.rope_scaling["factor"] == 8.0
    assert ll.rope_scaling["rope_type"] == "llama3" and ll.head_dim == 128


def test_model_size_cli_flops_and_volume(capsys):
    from megacpt.arguments import parse_args

    cfg, _ = parse_args(["--model-size", "Llama-3.2-1B", "--mock-data", "--train-iters", "1",
                         "--seq-length", "2048"])
    m = cfg.model
    assert (m.vocab_size, m.tie_word_embeddings, m.rotary_base) == (128256, True, 500000.0)
    # 6 N (matmul params incl. the LM head, once) + attention
    n = m.num_parameters(include_embeddings=False) - (2 * 16 + 1) * 2048 + 128256 * 2048
    assert m.flops_per_token() == 6 * n + 6 * 16 * 2048 * 2048
    volume.main(["--model-size", "Qwen2.5-0.5B", "--seq-length", "1024"])
    table = capsys.readouterr().out
    assert "| tp2pp2dp2 |" in table
    untied = ModelConfig.from_size("Qwen2.5-0.5B", tie_word_embeddings=False)
    tied = ModelConfig.from_size("Qwen2.5-0.5B")
    lay = volume.Layout(pp=2, dp=4)
    # tied under pp: the last stage's copy plus the embedding-group all-reduce
    assert volume.step_bytes(tied, lay, 1, 1, 8)["pp"] > volume.step_bytes(untied, lay, 1, 1,
                                                                            8)["pp"]
    assert volume.stage_params(tied, volume.Layout(), 0) == tied.num_parameters()
