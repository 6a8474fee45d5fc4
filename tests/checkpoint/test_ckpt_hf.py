"""HuggingFace interop against transformers on CPU: import (tp2) gives transformers' logits,
export gives back identical weights that LlamaForCausalLM loads; bad inputs are clear."""
import json
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from _ckpt_helpers import make_corpora  # noqa: E402
from megacpt.checkpoint import CheckpointError, load_model  # noqa: E402
from megacpt.checkpoint.convert import main  # noqa: E402
from megacpt.checkpoint.reader import MegacptSource  # noqa: E402
from megacpt.checkpoint.registry import open_source  # noqa: E402


def hf_model(kv_heads: int, **overrides):
    torch.manual_seed(kv_heads)
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=kv_heads, vocab_size=300, max_position_embeddings=64,
              rms_norm_eps=1e-5, rope_theta=10000.0)
    kw.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()


def hf_weights(d) -> dict:
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx):
        out = {}
        for f in sorted(set(json.load(open(idx))["weight_map"].values())):
            out.update(load_file(os.path.join(d, f)))
        return out
    return load_file(os.path.join(d, "model.safetensors"))


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_import_tp2_logits_and_export_bit_exact(kv_heads, tmp_path):
    ref = hf_model(kv_heads)
    ref.save_pretrained(tmp_path / "hf")
    main(["--from-hf", str(tmp_path / "hf"), "--save-dir", str(tmp_path / "ours"),
          "--target-tensor-parallel-size", "2", "--no-progress"])
    with MegacptSource(str(tmp_path / "ours")) as s:
        assert (s.tp, s.pp) == (2, 1) and s.cfg.model.padded_vocab_size == 384
        assert not s.get("embedding.weight")[300:].any()  # padded rows are zero
    tokens = torch.randint(0, 300, (2, 12))
    ours = load_model(str(tmp_path / "ours"))
    with torch.no_grad():
        want = ref(tokens).logits
        torch.testing.assert_close(ours(tokens), want, rtol=0, atol=1e-4)
    main(["--load-dir", str(tmp_path / "ours"), "--to-hf", str(tmp_path / "back"),
          "--max-shard-size", "100KB", "--no-progress"])
    orig, back = hf_weights(tmp_path / "hf"), hf_weights(tmp_path / "back")
    assert orig.keys() == back.keys()
    for k in orig:
        assert orig[k].dtype == back[k].dtype and torch.equal(orig[k], back[k]), k
    assert len(json.load(open(tmp_path / "back" / "model.safetensors.index.json"))[
        "weight_map"]) == len(orig)
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    assert loaded.config.num_key_value_heads == kv_heads
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, want)
    assert os.path.isfile(tmp_path / "back" / "generation_config.json")


def test_sharded_and_bin_imports_with_tokenizer(tmp_path):
    ref = hf_model(2, vocab_size=330)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    corp = make_corpora(str(tmp_path))
    shutil.copy(corp["tokenizer"], tmp_path / "sharded" / "tokenizer.model")
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(tmp_path / "sharded" / "config.json", binary)
    torch.save(ref.state_dict(), binary / "pytorch_model.bin")
    tokens = torch.randint(0, 330, (1, 10))
    with torch.no_grad():
        want = ref(tokens).logits
        for d in ("sharded", "bin"):
            torch.testing.assert_close(load_model(str(tmp_path / d))(tokens), want,
                                       rtol=0, atol=1e-4)
    main(["--from-hf", str(tmp_path / "sharded"), "--save-dir", str(tmp_path / "ours"),
          "--target-pipeline-parallel-size", "2", "--no-progress"])
    assert os.path.isfile(tmp_path / "ours" / "tokenizer.model")
    main(["--load-dir", str(tmp_path / "ours"), "--to-hf", str(tmp_path / "back"),
          "--no-progress"])
    cfg = json.load(open(tmp_path / "back" / "config.json"))
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    special = json.load(open(tmp_path / "back" / "special_tokens_map.json"))
    assert special == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    assert open(tmp_path / "back" / "tokenizer.model", "rb").read() == open(
        corp["tokenizer"], "rb").read()
    # transformers' own tokenizer reads the export and encodes like ours (needs protobuf)
    pytest.importorskip("google.protobuf")
    import sentencepiece

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "back"))
    sp = sentencepiece.SentencePieceProcessor(model_file=corp["tokenizer"])
    for text in (corp["source_texts"][0], corp["target_texts"][0] + " 2024"):  # bytes, digits
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text


def _edit_config(d, **changes):
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, "w"))


@pytest.mark.parametrize("change,match", [
    ({"model_type": "gemma"}, "'model_type' is 'gemma', expected 'llama' or 'qwen2' or "
                              "'mistral'"),
    ({"model_type": "mistral"}, r"'architectures' is \['LlamaForCausalLM'\], expected "
                                r"\['MistralForCausalLM'\]"),
    ({"attention_bias": True}, "'attention_bias' is True, expected false"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic' is not "
                                                            "supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_type 'yarn' is not "
                                                                "supported"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 8},
     "'sliding_window' is 8, shorter than the sequence length 64"),
    ({"intermediate_size": 100}, r"mlp.gate_proj.weight' has shape \(96, 64\) but config.json "
                                 r"implies \(100, 64\)"),
    ({"num_attention_heads": 0}, "'num_attention_heads' is 0, expected a positive integer"),
])
def test_non_llama_or_inconsistent_config_is_rejected(change, match, tmp_path):
    hf_model(2).save_pretrained(tmp_path)
    _edit_config(tmp_path, **change)
    with pytest.raises(CheckpointError, match=match):
        open_source(str(tmp_path))


def test_bad_hf_files_are_rejected(tmp_path, capsys):
    m = hf_model(2, attention_bias=True)
    m.save_pretrained(tmp_path / "bias")
    _edit_config(tmp_path / "bias", attention_bias=False)
    bias = r"holds a bias 'model\.layers\.\d\.self_attn\.\w_proj\.bias'"
    with pytest.raises(CheckpointError, match=bias):
        open_source(str(tmp_path / "bias"))
    hf_model(2).save_pretrained(tmp_path / "sh", max_shard_size="100KB")
    shard = sorted(f for f in os.listdir(tmp_path / "sh") if f.startswith("model-"))[1]
    os.remove(tmp_path / "sh" / shard)
    with pytest.raises(CheckpointError, match=f"lists shard {shard}, which is missing"):
        open_source(str(tmp_path / "sh"))
    hf_model(2).save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(SystemExit):
        main(["--from-hf", str(tmp_path / "tok"), "--save-dir", str(tmp_path / "o"),
              "--no-progress"])
    assert "tokenizer.model: unreadable SentencePiece tokenizer" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")
    os.remove(tmp_path / "tok" / "model.safetensors")
    with pytest.raises(CheckpointError, match="no weights"):
        open_source(str(tmp_path / "tok"))
    with pytest.raises(SystemExit):
        main(["--from-hf", str(tmp_path / "sh" / "nothing"), "--save-dir", str(tmp_path / "p")])
    assert "no config.json there" in capsys.readouterr().err
