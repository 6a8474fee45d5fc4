"""Vocabulary extension: ids of the source tokenizer are unchanged, old-token logits are
unchanged on text without new pieces, new rows are the mean of their source sub-pieces, and
the target language needs fewer tokens per character."""
import json
import os

import pytest
import sentencepiece as spm
import torch

from _ckpt_helpers import make_corpora
from megacpt.checkpoint import CheckpointError, load_model, save_checkpoint
from megacpt.checkpoint.reader import MegacptSource
from megacpt.checkpoint.vocab import append_pieces, read_spec
from megacpt.checkpoint.vocab import main
from megacpt.config import Config, ModelConfig
from megacpt.model.llama import LlamaModel

K = 40


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("vocab"))
    corp = make_corpora(d)
    sp = spm.SentencePieceProcessor(model_file=corp["tokenizer"])
    cfg = Config(model=ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64,
                                   num_attention_heads=4, vocab_size=sp.get_piece_size(),
                                   seq_length=32, attention_backend="eager", use_kernels=False))
    model = LlamaModel(cfg.model, seed=3)
    save_checkpoint(os.path.join(d, "src"), 7, model, None, cfg, model.ctx, {"data": {"x": 1}})
    out = os.path.join(d, "out")
    main(["--tokenizer-model", corp["tokenizer"], "--corpus", corp["corpus"], "--new-pieces",
          str(K), "--load-dir", os.path.join(d, "src"), "--save-dir", out,
          "--target-tensor-parallel-size", "2"])
    return corp, sp, model, out


def test_tokenizer_keeps_ids_and_compresses_target(extended):
    corp, sp, _, out = extended
    new = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    v = sp.get_piece_size()
    assert new.get_piece_size() == v + K
    assert all(new.id_to_piece(i) == sp.id_to_piece(i) for i in range(v))
    assert (new.bos_id(), new.eos_id(), new.unk_id()) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    for text in corp["source_texts"][:50]:
        assert new.encode(text) == sp.encode(text)
    report = json.load(open(os.path.join(out, "vocab_extension.json")))
    before, after = report["tokens_per_char"]["before"], report["tokens_per_char"]["after"]
    assert after < 0.7 * before, (before, after)
    used = {i for t in corp["target_texts"] for i in new.encode(t)}
    assert len(used & set(range(v, v + K))) > K // 2  # the new pieces are actually used
    assert read_spec(open(os.path.join(out, "tokenizer.model"), "rb").read())["model_type"] == "bpe"


def test_old_logits_unchanged_and_new_rows_are_source_means(extended):
    corp, sp, model, out = extended
    v = sp.get_piece_size()
    with MegacptSource(out) as s:
        assert (s.tp, s.iteration, s.state, s.has_optimizer) == (2, 0, {}, False)
        assert s.cfg.model.vocab_size == v + K and s.cfg.model.padded_vocab_size == 384
        emb, outw = s.get("embedding.weight"), s.get("output.weight")
    src = dict(model.named_parameters())
    report = json.load(open(os.path.join(out, "vocab_extension.json")))
    for entry in report["pieces"]:
        piece, ids = entry["piece"], entry["source_ids"]
        if piece.startswith("\u2581"):  # independent reference: the source tokenizer itself
            assert ids == sp.encode(piece[1:]), piece
        raw = b"".join(bytes([int(sp.id_to_piece(i)[3:5], 16)]) if sp.is_byte(i)
                       else sp.id_to_piece(i).encode() for i in ids)
        assert raw.decode("utf-8") == piece  # the sub-pieces spell the piece
        for got, full in ((emb, src["embedding.weight"]), (outw, src["output.weight"])):
            torch.testing.assert_close(got[entry["id"]], full[ids].mean(0), rtol=0, atol=1e-7)
    assert torch.equal(emb[:v], src["embedding.weight"][:v]) and not emb[v + K:].any()
    new_model = load_model(out)
    text = " ".join(corp["source_texts"][:3])
    tokens = torch.tensor([sp.encode(text)[:32]])
    assert int(tokens.max()) < v
    with torch.no_grad():
        torch.testing.assert_close(new_model(tokens)[..., :v], model(tokens), rtol=0, atol=1e-6)


def test_bad_inputs(extended, tmp_path, capsys):
    corp, sp, _, out = extended
    (tmp_path / "bad.model").write_bytes(b"garbage")
    with pytest.raises(SystemExit):
        main(["--tokenizer-model", str(tmp_path / "bad.model"), "--corpus", corp["corpus"],
              "--new-pieces", "5", "--load-dir", out, "--save-dir", str(tmp_path / "o")])
    assert "bad.model: unreadable SentencePiece model" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the extended checkpoint no longer matches the source
        main(["--tokenizer-model", corp["tokenizer"], "--corpus", corp["corpus"],
              "--new-pieces", "5", "--load-dir", out, "--save-dir", str(tmp_path / "o")])
    assert f"vocab_size is {sp.get_piece_size() + K}" in capsys.readouterr().err
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(SystemExit):
        main(["--tokenizer-model", corp["tokenizer"], "--corpus", str(tmp_path / "c.jsonl"),
              "--new-pieces", "5", "--load-dir", out, "--save-dir", str(tmp_path / "o")])
    assert "c.jsonl:1: missing key 'text'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")
    with pytest.raises(CheckpointError, match="must be >= 1"):
        from megacpt.checkpoint.vocab import extend_vocab
        extend_vocab(corp["tokenizer"], corp["corpus"], 0, out, str(tmp_path / "o"))


def test_appended_pieces_roundtrip_through_sentencepiece(extended):
    corp, sp, _, _ = extended
    data = open(corp["tokenizer"], "rb").read()
    merged = spm.SentencePieceProcessor(
        model_proto=append_pieces(data, [("\u2581zzq", -1e4), ("qq", -1e4 - 1)]))
    n = sp.get_piece_size()
    assert [merged.id_to_piece(i) for i in (n, n + 1)] == ["\u2581zzq", "qq"]
    assert merged.get_score(n) == -1e4 and not merged.is_control(n)
