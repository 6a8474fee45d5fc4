"""The parameter table (`megacpt.params`): names, shapes, splits, keys and the layout check all
come from it, and a model variant is one row."""
import dataclasses

import pytest
import torch

from megacpt import params
from megacpt.checkpoint import format as fmt
from megacpt.checkpoint.hf import hf_shapes, hf_tensors
from megacpt.checkpoint.megatron_common import layer_keys, top_keys
from megacpt.config import ConfigError
from megacpt.model.llama import LlamaModel
from megacpt.parallel import sharding
from _harness import tiny_model_config


def test_table_matches_the_model_it_describes():
    cfg = tiny_model_config()
    model = LlamaModel(cfg, seed=3)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert sorted(shapes) == sorted(params.param_names(cfg))
    assert shapes == {n: params.full_shape(cfg, n) for n in shapes}
    for n, p in model.named_parameters():  # init rule of the table
        if params.init_std(cfg, n) is None:
            assert torch.all(p == params.init_constant(n))
        else:
            assert abs(p.std().item() / params.init_std(cfg, n) - 1) < 0.35, n
    # the stages of any pp cover the model once, in order
    for pp in (1, 2, 4):
        names = [n for r in range(pp) for n in params.stage_param_names(cfg, pp, r)]
        assert names == params.param_names(cfg)
    assert fmt.param_names is params.param_names  # the format re-exports, never redefines


def test_local_shapes_and_sharding_agree():
    cfg = tiny_model_config()
    for n in params.param_names(cfg):
        full = torch.randn(params.full_shape(cfg, n))
        for tp in (1, 2, 4):
            parts = [sharding.shard(n, full, r, tp) for r in range(tp)]
            assert all(tuple(p.shape) == params.local_shape(cfg, n, tp) for p in parts)
            assert torch.equal(sharding.unshard(n, parts), full)


def test_hf_and_megatron_names_come_from_the_table():
    cfg = tiny_model_config(num_layers=2)
    hf = dict(hf_shapes(cfg))
    assert hf["model.layers.1.self_attn.k_proj.weight"] == (4 * 4, 32)  # ng * d, h
    assert hf["lm_head.weight"] == (200, 32)  # unpadded vocabulary
    assert len(hf) == 2 + 1 + 2 * 9
    assert layer_keys()["self_attention.linear_qkv.weight"] == "attention.qkv.weight"
    assert top_keys()["language_model.encoder.final_layernorm.weight"] == "final_norm.weight"
    assert params.megatron_keys("layers.3.mlp.down.weight")[0] == \
        "decoder.layers.3.mlp.linear_fc2.weight"


def test_check_layout_is_the_one_check_with_one_error_type():
    cfg = tiny_model_config()
    params.check_layout(cfg, 4, 5)
    with pytest.raises(params.LayoutError, match=r"num_query_groups \(--num-query-groups\) = 4 "
                                                 r"is not divisible by tensor-parallel size 8"):
        params.check_layout(dataclasses.replace(cfg, num_attention_heads=8), 8, 1)
    with pytest.raises(params.LayoutError, match="fewer than pipeline-parallel size 6"):
        params.check_layout(cfg, 1, 6)
    assert issubclass(params.LayoutError, ConfigError)
    with pytest.raises(params.LayoutError, match="not a parameter"):
        params.lookup("layers.0.attention.qkv.scale")


def test_a_variant_is_one_row(monkeypatch):
    """q/k/v biases as one extra row: names, shapes, tp split, HF keys (fused per group) and
    the Megatron key map all follow without another edit."""
    bias = params.ParamSpec(
        "layers.{i}.attention.qkv.bias",
        lambda c: ((c.num_attention_heads + 2 * c.num_query_groups) * c.head_dim,),
        params.ROW, params.ZEROS,
        ("model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.k_proj.bias",
         "model.layers.{i}.self_attn.v_proj.bias"), params.HF_QKV,
        megatron=("decoder.layers.{i}.self_attention.linear_qkv.bias",),
        when=lambda c: c.num_query_groups < c.num_attention_heads)  # stands in for a flag
    table = list(params.TABLE)
    table.insert(3, bias)
    monkeypatch.setattr(params, "TABLE", tuple(table))
    params.lookup.cache_clear()
    try:
        cfg = tiny_model_config(num_layers=1)
        assert params.layer_param_names(cfg, 0)[2] == "layers.0.attention.qkv.bias"
        assert "layers.0.attention.qkv.bias" not in params.param_names(
            tiny_model_config(num_layers=1, num_query_groups=8))  # `when` is false: no row
        assert params.local_shape(cfg, "layers.0.attention.qkv.bias", 2) == (32,)
        assert params.init_constant("layers.0.attention.qkv.bias") == 0.0
        assert dict(hf_shapes(cfg))["model.layers.0.self_attn.k_proj.bias"] == (16,)
        full = torch.arange(64.0)
        (qn, q), (kn, k), (vn, v) = hf_tensors(cfg, "layers.0.attention.qkv.bias", full)
        assert qn.endswith("q_proj.bias") and q.shape == (32,) and k.shape == (16,)
        assert torch.equal(sharding.qkv_from_separate(q, k, v, 8, 4), full)
        assert layer_keys()["self_attention.linear_qkv.bias"] == "attention.qkv.bias"
    finally:
        params.lookup.cache_clear()
