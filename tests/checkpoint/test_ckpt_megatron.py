"""Megatron-LM legacy import: a checkpoint built here in Megatron's documented structure
(argparse.Namespace args, per-(tp, pp) model_optim_rng.pt, stage-local layer numbers, vocab
padded to 128 x tp) imports to the model it was made from."""
import argparse
import enum
import os
import sys
import types

import pytest
import torch

from _ckpt_helpers import tiny_config
from megacpt.checkpoint import CheckpointError, load_model
from megacpt.checkpoint.convert import main
from megacpt.model.llama import LlamaModel
from megacpt.parallel import sharding
from megacpt.parallel.context import stage_layer_range

MCORE = {"input_norm.weight": "self_attention.linear_qkv.layer_norm_weight",
         "attention.qkv.weight": "self_attention.linear_qkv.weight",
         "attention.proj.weight": "self_attention.linear_proj.weight",
         "post_attention_norm.weight": "mlp.linear_fc1.layer_norm_weight",
         "mlp.gate_up.weight": "mlp.linear_fc1.weight", "mlp.down.weight": "mlp.linear_fc2.weight"}
OLD = {"input_norm.weight": "input_norm.weight",
       "attention.qkv.weight": "self_attention.query_key_value.weight",
       "attention.proj.weight": "self_attention.dense.weight",
       "post_attention_norm.weight": "post_attention_norm.weight",
       "mlp.gate_up.weight": "mlp.dense_h_to_4h.weight",
       "mlp.down.weight": "mlp.dense_4h_to_h.weight"}


@pytest.fixture
def fake_megatron_enum(monkeypatch):
    """An enum pickled as megatron.core.enums.ModelType, as in real Megatron args."""
    mods = {n: types.ModuleType(n) for n in ("megatron", "megatron.core", "megatron.core.enums")}
    model_type = enum.Enum("ModelType", "encoder_or_decoder encoder_and_decoder")
    model_type.__module__ = "megatron.core.enums"
    mods["megatron.core.enums"].ModelType = model_type
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    return model_type.encoder_or_decoder


def make_args(cfg, tp, pp, **extra):
    m = cfg.model
    args = dict(num_layers=m.num_layers, hidden_size=m.hidden_size,
                ffn_hidden_size=m.ffn_hidden_size, num_attention_heads=m.num_attention_heads,
                group_query_attention=True, num_query_groups=m.num_query_groups,
                kv_channels=m.head_dim, seq_length=m.seq_length,
                max_position_embeddings=m.seq_length,
                padded_vocab_size=-(-m.vocab_size // (128 * tp)) * 128 * tp,
                make_vocab_size_divisible_by=128, normalization="RMSNorm", swiglu=True,
                untie_embeddings_and_output_weights=True, add_bias_linear=False,
                position_embedding_type="rope", rotary_base=10000, norm_epsilon=m.norm_eps,
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, rotary_percent=1.0)
    args.update(extra)
    return argparse.Namespace(**args)


def write_legacy(root, model, cfg, tp, pp, names, old_style=False, **arg_extra):
    """Megatron's legacy directory for `model` (full weights) in layout tp x pp."""
    full = {n: p.detach() for n, p in model.named_parameters()}
    args = make_args(cfg, tp, pp, **arg_extra)
    vocab_rows = args.padded_vocab_size
    pre = "language_model.encoder." if old_style else "decoder."
    it = os.path.join(root, "iter_0000010")
    for p in range(pp):
        layers = stage_layer_range(cfg.model.num_layers, pp, p)
        for t in range(tp):
            sd = {}

            def put(key, name, tensor):
                sd[key] = sharding.shard(name, tensor, t, tp).clone()

            if p == 0:
                emb = torch.randn(vocab_rows, cfg.model.hidden_size)  # garbage padding rows
                emb[: cfg.model.vocab_size] = full["embedding.weight"][: cfg.model.vocab_size]
                put(("language_model." if old_style else "") + "embedding.word_embeddings.weight",
                    "embedding.weight", emb)
            for local, g in enumerate(layers):
                for ours, theirs in names.items():
                    put(f"{pre}layers.{local}.{theirs}", f"layers.{g}.{ours}",
                        full[f"layers.{g}.{ours}"])
                sd[f"{pre}layers.{local}.self_attention.core_attention._extra_state"] = None
            if p == pp - 1:
                put(pre + ("final_norm.weight" if old_style else "final_layernorm.weight"),
                    "final_norm.weight", full["final_norm.weight"])
                out = torch.randn(vocab_rows, cfg.model.hidden_size)
                out[: cfg.model.vocab_size] = full["output.weight"][: cfg.model.vocab_size]
                put(("language_model." if old_style else "") + "output_layer.weight",
                    "output.weight", out)
            d = os.path.join(it, f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else ""))
            os.makedirs(d)
            torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 10, "model": sd,
                        "optimizer": {"step": 10}, "opt_param_scheduler": {"num_steps": 80},
                        "rng_state": [{"np_rng_state": __import__("numpy").random.get_state()}]},
                       os.path.join(d, "model_optim_rng.pt"))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("10")


@pytest.fixture(scope="module")
def source():
    cfg = tiny_config(num_layers=4)
    return cfg, LlamaModel(cfg.model, seed=11)


def _logits(model, vocab):
    tokens = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(tokens)


def test_mcore_tp2pp2_imports_exactly(source, tmp_path, fake_megatron_enum):
    cfg, model = source
    write_legacy(str(tmp_path / "meg"), model, cfg, 2, 2, MCORE, model_type=fake_megatron_enum)
    main(["--from-megatron", str(tmp_path / "meg"), "--save-dir", str(tmp_path / "ours"),
          "--vocab-size", "200", "--target-tensor-parallel-size", "4", "--no-progress"])
    got = load_model(str(tmp_path / "ours"))
    for (n, p), (_, q) in zip(model.named_parameters(), got.named_parameters()):
        if n in ("embedding.weight", "output.weight"):  # Megatron's padding rows dropped
            assert torch.equal(p[:200], q[:200]) and not q[200:].any(), n
        else:
            assert torch.equal(p, q), n
    torch.testing.assert_close(_logits(got, 200), _logits(model, 200), rtol=0, atol=1e-6)


def test_old_names_pp1_with_vocab_in_args(source, tmp_path):
    cfg, model = source
    write_legacy(str(tmp_path), model, cfg, 2, 1, OLD, old_style=True, vocab_size=200)
    got = load_model(str(tmp_path))  # detected from the directory, read directly
    assert got.cfg.vocab_size == 200 and got.cfg.padded_vocab_size == 256
    torch.testing.assert_close(_logits(got, 200), _logits(model, 200), rtol=0, atol=1e-6)


@pytest.mark.parametrize("change,match", [
    ({"swiglu": False}, "args.swiglu is False, expected True"),
    ({"add_bias_linear": True}, "args.add_bias_linear is True, expected False"),
    ({"normalization": "LayerNorm"}, "args.normalization is 'LayerNorm', expected 'RMSNorm'"),
])
def test_non_llama_args_are_rejected(source, tmp_path, change, match):
    cfg, model = source
    write_legacy(str(tmp_path), model, cfg, 1, 1, MCORE, vocab_size=200, **change)
    with pytest.raises(CheckpointError, match=match):
        load_model(str(tmp_path))


def test_missing_shard_and_unlisted_types(source, tmp_path):
    cfg, model = source
    write_legacy(str(tmp_path / "a"), model, cfg, 2, 2, MCORE, vocab_size=200)
    os.remove(tmp_path / "a" / "iter_0000010" / "mp_rank_01_001" / "model_optim_rng.pt")
    os.rmdir(tmp_path / "a" / "iter_0000010" / "mp_rank_01_001")
    with pytest.raises(CheckpointError, match="shard mp_rank_01_001 is missing"):
        load_model(str(tmp_path / "a"))
    write_legacy(str(tmp_path / "b"), model, cfg, 1, 1, MCORE, vocab_size=200,
                 unsafe=torch.nn.Linear)  # a global outside the allow-list
    with pytest.raises(CheckpointError, match="cannot be read with weights_only=True"):
        load_model(str(tmp_path / "b"))
