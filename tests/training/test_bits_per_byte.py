"""Bits per byte: validation rows carry `bpb` = loss / ln 2 / (text bytes per token), with the
bytes counted from the text itself; the console shows it and the scaling tools read it."""
import json
import math
import os

import torch

from megacpt.parallel.context import ParallelContext
from megacpt.training.bits_per_byte import bits_per_byte, bytes_per_token

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(REPO, "examples", "data")


def _tokenizer(tmp):
    from megacpt.data import tokenizer_train
    from megacpt.data.tokenizer import SentencePieceTokenizer

    prefix = os.path.join(tmp, "tok")
    tokenizer_train.main(["--input", f"{DATA}/en_valid.jsonl.gz", f"{DATA}/zh_valid.jsonl.gz",
                          "--vocab-size", "1100", "--character-coverage", "0.98",
                          "--model-prefix", prefix, "--num-threads", "1"])
    return SentencePieceTokenizer(prefix + ".model")


def test_bytes_per_token_counts_the_text_bytes(tmp_path):
    tok = _tokenizer(str(tmp_path))
    texts = ["The house of the river.", "子曰：学而时习之，不亦说乎？㐀", "naïve café 2024"]
    ids = [tok.tokenize(t) for t in texts]
    assert any(tok.id_to_piece(i).startswith("<0x") for i in sum(ids, []))  # byte fallback
    width = max(map(len, ids)) + 1
    labels = torch.full((len(texts), width), tok.eod)  # </s> padding counts 0 bytes
    for r, x in enumerate(ids):
        labels[r, : len(x)] = torch.tensor(x)
    table = torch.tensor(tok.token_bytes(), dtype=torch.float64)
    bpt = bytes_per_token([{"labels": labels}], table, ParallelContext.single("cpu"))
    text_bytes = sum(len(t.encode("utf-8")) + 1 for t in texts)  # +1: the dummy-prefix space
    assert bpt == text_bytes / labels.numel()
    assert bits_per_byte(2.0, bpt) == 2.0 / math.log(2) / bpt
    assert bits_per_byte(float("nan"), bpt) is None and bits_per_byte(2.0, None) is None


def test_valid_rows_console_and_scaling_inputs(tmp_path, capsys):
    from megacpt import train
    from megacpt.data import preprocess
    from megacpt.scaling.runs import load_run

    tok = _tokenizer(str(tmp_path))
    prefixes = {}
    for lang in ("en", "zh"):
        prefixes[lang] = os.path.join(tmp_path, lang)
        preprocess.main(["--input", f"{DATA}/{lang}_valid.jsonl.gz", "--tokenizer-model",
                         tok.model_path, "--output-prefix", prefixes[lang], "--append-eod",
                         "--workers", "1"])
        prefixes[lang] += "_text_document"
    log_dir = tmp_path / "run"
    assert train.main([
        "--model-size", "tiny", "--tokenizer-model", tok.model_path, "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2",
        "--data-path", "1.0", f"zh={prefixes['zh']}", "--split", "1,0,0",
        "--valid-data-path", f"zh={prefixes['zh']}", f"en={prefixes['en']}",
        "--eval-interval", "2", "--eval-iters", "2", "--num-workers", "0", "--no-tensorboard",
        "--log-dir", str(log_dir), "--data-cache-path", str(tmp_path / "cache")]) == 0
    rows = [json.loads(line) for line in open(log_dir / "metrics.jsonl")]
    valid = {r["name"]: r for r in rows if r["type"] == "valid"}
    assert set(valid) == {"zh", "en"}
    for r in valid.values():
        assert 0 < r["bpb"] < r["loss"] / math.log(2)  # more than one byte per token
    # Chinese characters are 3 bytes: fewer bits per byte per nat of loss than English
    ratio = {n: r["loss"] / math.log(2) / r["bpb"] for n, r in valid.items()}  # bytes/token
    assert ratio["zh"] > 1.5 and ratio["en"] > 1.5
    assert "bpb)" in capsys.readouterr().out
    run = load_run(str(log_dir / "metrics.jsonl"), "en")
    assert run["bpb"].tolist() == [valid["en"]["bpb"]]
