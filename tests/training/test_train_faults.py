"""Faults and bad input: SIGTERM checkpoint + exit 0 (real CLI process), and a list of bad
inputs that must fail with a clear error before any compute starts."""
import json
import os
import shutil

import pytest

from megacpt.checkpoint import CheckpointError
from megacpt.config import ConfigError
from megacpt.train import EXIT_BAD_INPUT, main
from megacpt.training import loop
from megacpt.training.loop import Trainer, train
from megacpt.training.metrics import read_metrics
from _train_helpers import config, mock_args, real_args, signal_when, train_rows, write_indexed


def test_sigterm_saves_checkpoint_and_exits_zero(tmp_path):
    ck, logs = str(tmp_path / "ck"), str(tmp_path / "log")
    argv = mock_args("--save", ck, "--log-dir", logs, iters=3000)
    proc, out = signal_when(argv, lambda _: train_rows(logs))
    assert proc.returncode == 0, out
    assert "SIGTERM" in out
    saved = int(open(f"{ck}/latest_checkpointed_iteration.txt").read())
    last = read_metrics(logs, "train")[-1]["iteration"]
    assert saved == last and 0 < saved < 3000
    meta = json.load(open(f"{ck}/iter_{saved:07d}/meta.json"))
    assert meta["state"]["counters"]["consumed_samples"] == 4 * saved


@pytest.fixture
def no_compute(monkeypatch):
    """Bad input must be reported before the model is even built."""
    def refuse(*a, **k):
        raise AssertionError("the model was built before the bad input was reported")
    monkeypatch.setattr(loop, "LlamaModel", refuse)


@pytest.fixture(scope="module")
def src_ckpt(tmp_path_factory):
    ck = str(tmp_path_factory.mktemp("src") / "ck")
    train(*config(mock_args("--save", ck, iters=1)))
    return ck


def _tokenizer(tmp_path, vocab: int) -> str:
    import sentencepiece as spm

    text = os.path.join(tmp_path, "text.txt")
    with open(text, "w") as f:
        f.write("\n".join(f"word{i} other{i % 7} thing{i % 13} the a of" for i in range(400)))
    spm.SentencePieceTrainer.train(input=text, model_prefix=os.path.join(tmp_path, "tok"),
                                   vocab_size=vocab, model_type="bpe", minloglevel=2)
    return os.path.join(tmp_path, "tok.model")


def _corrupt_copy(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    for root, _, files in os.walk(dst):
        for f in files:
            if f == "model.safetensors":
                open(os.path.join(root, f), "wb").write(b"\x10\x00\x00\x00junk")
    return dst


BAD_INPUTS = {
    "missing data files": (lambda c, t, s: real_args(c) + ["--data-path", "1.0",
                           f"zh={t}/nope_text_document"], "missing|not found"),
    "token ids beyond the vocabulary": (lambda c, t, s: real_args(c) + ["--vocab-size", "200"],
                                        r"token id \d+ .*vocabulary of 200"),
    "truncated index": (lambda c, t, s: real_args(c) + ["--data-path", "1.0",
                        f"zh={_truncated(c, t)}"], "truncated|size"),
    "validation set too small": (lambda c, t, s: real_args(c, "--eval-iters", "400"),
                                 "fewer than --eval-iters"),
    "unknown target": (lambda c, t, s: mock_args("--target", "fr"), "--target 'fr'"),
    "init-from missing": (lambda c, t, s: mock_args("--init-from", f"{t}/none"),
                          "no such file"),
    "init-from vocabulary larger than the embedding": (
        lambda c, t, s: mock_args("--init-from", s, "--vocab-size", "250"),
        r"--vocab-size 250 contradicts the --init-from checkpoint .*vocab_size = 300"),
    "init-from different shape": (lambda c, t, s: mock_args("--init-from", s, "--model-size",
                                  "debug-xs"), "debug-xs has num_layers = 4 but the --init-from checkpoint .* has num_layers = 2"),
    "init-from weights that don't parse": (
        lambda c, t, s: mock_args("--init-from", _corrupt_copy(s, f"{t}/bad")),
        r"bad/iter_0000001/mp_rank_00_000/model.safetensors: header length .* the file is truncated"),
    "tokenizer larger than --vocab-size": (
        lambda c, t, s: mock_args("--tokenizer-model", _tokenizer(t, 320)),
        "has 320 tokens, more than --vocab-size 300"),
    "load dir whose tracker names a missing iteration": (
        lambda c, t, s: mock_args("--load", _broken_tracker(t)), "incomplete checkpoint"),
}


def _truncated(corpus, tmp):
    prefix = f"{tmp}/cut_text_document"
    shutil.copy(corpus["zh"] + ".bin", prefix + ".bin")
    data = open(corpus["zh"] + ".idx", "rb").read()
    open(prefix + ".idx", "wb").write(data[:-16])
    return prefix


def _broken_tracker(tmp):
    os.makedirs(f"{tmp}/load", exist_ok=True)
    open(f"{tmp}/load/latest_checkpointed_iteration.txt", "w").write("7\n")
    return f"{tmp}/load"


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_before_compute(case, corpus, src_ckpt, tmp_path, no_compute):
    make_argv, match = BAD_INPUTS[case]
    with pytest.raises((ConfigError, CheckpointError), match=match):
        Trainer(*config(make_argv(corpus, str(tmp_path), src_ckpt)))


def test_cli_reports_bad_input_with_exit_code(corpus, tmp_path, capsys, no_compute):
    argv = real_args(corpus) + ["--data-path", "1.0", f"zh={tmp_path}/nope_text_document"]
    assert main(argv) == EXIT_BAD_INPUT
    out = capsys.readouterr().out
    assert "bad input" in out and "nope_text_document" in out
    assert main(mock_args("--fp16")) == EXIT_BAD_INPUT


def test_vocab_check_uses_written_dtype(tmp_path, no_compute):
    """Signed token files with negative ids are rejected too."""
    import numpy as np

    prefix = write_indexed(f"{tmp_path}/neg_text_document",
                           [np.array([1, 2, -3, 4] * 10)], dtype=np.int32)
    argv = mock_args("--valid-data-path", f"neg={prefix}")
    with pytest.raises(ConfigError, match="token id -3"):
        Trainer(*config(argv))
