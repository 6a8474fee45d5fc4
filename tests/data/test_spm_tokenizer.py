"""SentencePiece training CLI and the tokenizer wrapper."""
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import sentencepiece as spm

from megacpt.data.tokenizer import SentencePieceTokenizer, build_tokenizer
from megacpt.data.tokenizer_train import main as train_main

from _data_helpers import REPO


def test_special_ids_and_settings(spm_model):
    tok = SentencePieceTokenizer(spm_model)
    assert tok.vocab_size == 1500 and tok.model_path == spm_model
    assert (tok.unk, tok.bos, tok.eod, tok.pad) == (0, 1, 2, 3)
    assert tok.id_to_piece(tok.eod) == "</s>" and tok.id_to_piece(tok.pad) == "<pad>"
    assert tok.piece_to_id("<0x0A>") > 3  # byte-fallback pieces exist


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "床前明月光，疑是地上霜。",
    "mixed 中文 and English\n\twith  double  spaces, tabs and newlines\n",
    "rare: ℵ₀ 🦊 ǅ 12345",
])
def test_roundtrip_without_bos(spm_model, text):
    tok = SentencePieceTokenizer(spm_model)
    ids = tok.tokenize(text)
    assert ids and tok.bos not in ids and tok.eod not in ids and tok.unk not in ids
    assert tok.detokenize(ids) == text
    reference = spm.SentencePieceProcessor(model_file=spm_model)
    assert ids == reference.encode(text)
    assert tok.tokenize_batch([text, text]) == [ids, ids]


def test_pickles_by_path(spm_model):
    tok = build_tokenizer("SentencePieceTokenizer", spm_model)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.tokenize("hello 世界") == tok.tokenize("hello 世界")
    assert len(pickle.dumps(tok)) < 1000
    with pytest.raises(ValueError, match="--tokenizer-type"):
        build_tokenizer("GPT2BPETokenizer", spm_model)


def test_vocab_too_small_names_the_option(small_jsonl, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        train_main(["--input", small_jsonl, "--vocab-size", "300", "--model-prefix",
                    str(tmp_path / "t"), "--num-threads", "1"])
    msg = str(err.value)
    assert "--vocab-size 300 is too small" in msg and "--character-coverage" in msg
    assert "INTERNAL" not in msg and not os.path.exists(tmp_path / "t.model")


def test_character_coverage_outside_sentencepiece_range_is_clear(small_jsonl, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_main(["--input", small_jsonl, "--vocab-size", "1500", "--character-coverage",
                    "0.9", "--model-prefix", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert "--character-coverage must be in [0.98, 1]" in err and "INTERNAL" not in err


def test_missing_input_and_bad_model(tmp_path):
    with pytest.raises(SystemExit):
        train_main(["--input", str(tmp_path / "nope.jsonl"), "--vocab-size", "500",
                    "--model-prefix", str(tmp_path / "t")])
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model: not a SentencePiece model"):
        SentencePieceTokenizer(str(tmp_path / "bad.model"))


def test_tool_script_and_console_script_run():
    for cmd in ([sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"), "--help"],
                [shutil.which("megacpt-train-tokenizer") or "", "--help"]):
        if not cmd[0]:
            continue  # console script not installed in this environment
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "--vocab-size" in out.stdout
