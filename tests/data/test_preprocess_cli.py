"""tools/preprocess_data.py: exact token content and order, gzip, bad lines, partitions."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megacpt.data.indexed import IndexedDataset
from megacpt.data.preprocess import main as preprocess_main
from megacpt.data.tokenizer import SentencePieceTokenizer

from _data_helpers import REPO

EXTRA = ["", "x", "床前明月光", "tab\there\nnewline", "🦊 emoji"]


@pytest.fixture(scope="module")
def corpus(small_jsonl, tmp_path_factory):
    """small_jsonl + a few edge-case documents (empty text, emoji), plus a blank line."""
    path = tmp_path_factory.mktemp("pp") / "in.jsonl"
    lines = open(small_jsonl, "rb").read().splitlines()[:120]
    lines[5:5] = [json.dumps({"text": t, "id": k}, ensure_ascii=False).encode()
                  for k, t in enumerate(EXTRA)]
    lines.insert(40, b"   ")
    path.write_bytes(b"\n".join(lines) + b"\n")
    texts = [json.loads(ln)["text"] for ln in lines if ln.strip()]
    return str(path), texts


def run(inp, out, model, *extra):
    preprocess_main(["--input", inp, "--json-keys", "text", "--tokenizer-type",
                     "SentencePieceTokenizer", "--tokenizer-model", model,
                     "--output-prefix", out, "--log-interval", "50", *extra])
    return out + "_text_document"


def files(prefix):
    return open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()


def test_each_document_is_ids_then_eod_in_order(corpus, spm_model, tmp_path, capsys):
    inp, texts = corpus
    prefix = run(inp, str(tmp_path / "o"), spm_model, "--workers", "2", "--append-eod",
                 "--block-mb", "0.01")  # many small blocks through 2 processes
    tok = SentencePieceTokenizer(spm_model)
    ds = IndexedDataset(prefix)
    ds.verify()
    assert ds.dtype == np.uint16 and len(ds) == len(texts)
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(texts) + 1))
    for k, text in enumerate(texts):
        assert list(ds[k]) == tok.tokenize(text) + [tok.eod], k
    err = capsys.readouterr().err
    assert "docs/s" in err and "MB/s" in err and "ETA" in err
    assert f"done: {len(texts)} documents" in err


def test_gzip_workers_and_no_eod_agree(corpus, spm_model, tmp_path):
    inp, texts = corpus
    gz = str(tmp_path / "in.jsonl.gz")
    with gzip.open(gz, "wb") as f:
        f.write(open(inp, "rb").read())
    a = run(inp, str(tmp_path / "a"), spm_model, "--workers", "1", "--append-eod")
    b = run(gz, str(tmp_path / "b"), spm_model, "--workers", "2", "--append-eod")
    assert files(a) == files(b)
    c = IndexedDataset(run(gz, str(tmp_path / "c"), spm_model, "--workers", "1"))
    tok = SentencePieceTokenizer(spm_model)
    assert [list(c[k]) for k in range(len(c))] == [tok.tokenize(t) for t in texts]
    assert c.sequence_lengths[5] == 0  # the empty document stays, with no tokens


def test_bad_line_names_file_and_line(corpus, spm_model, tmp_path, capsys):
    inp, texts = corpus
    lines = open(inp, "rb").read().splitlines()
    lines[2] = b'{"text": "unterminated'
    lines[70] = b'{"body": "wrong key"}'
    bad = str(tmp_path / "bad.jsonl")
    open(bad, "wb").write(b"\n".join(lines) + b"\n")
    with pytest.raises(SystemExit, match=r"bad\.jsonl:3: malformed JSON"):
        run(bad, str(tmp_path / "x"), spm_model, "--workers", "2", "--block-mb", "0.01")
    assert not [f for f in os.listdir(tmp_path) if f.startswith("x_")]  # nothing half-written
    prefix = run(bad, str(tmp_path / "y"), spm_model, "--workers", "2", "--skip-bad-lines",
                 "--block-mb", "0.01")
    err = capsys.readouterr().err
    assert "skipped 2 malformed lines" in err and "bad.jsonl:71: missing key 'text'" in err
    assert len(IndexedDataset(prefix)) == len(texts) - 2


def test_partitions_equal_single_pass_and_resume(corpus, spm_model, tmp_path, capsys):
    inp, _ = corpus
    whole = run(inp, str(tmp_path / "w"), spm_model, "--workers", "2", "--append-eod")
    run(inp, str(tmp_path / "p"), spm_model, "--workers", "2", "--append-eod",
        "--partitions", "3", "--partition-index", "1")
    shard = str(tmp_path / "p_1_text_document")
    assert os.path.exists(shard + ".idx") and not os.path.exists(tmp_path / "p_0_text_document.idx")
    merged = run(inp, str(tmp_path / "p"), spm_model, "--workers", "2", "--append-eod",
                 "--partitions", "3")
    assert "partition 1: " in capsys.readouterr().err  # shard 1 was reused, not redone
    assert files(merged) == files(whole)
    assert not os.path.exists(shard + ".idx")  # shards removed after the merge


def test_gzip_cannot_be_partitioned(corpus, spm_model, tmp_path):
    gz = str(tmp_path / "in.jsonl.gz")
    with gzip.open(gz, "wb") as f:
        f.write(b'{"text": "a"}\n')
    with pytest.raises(SystemExit):
        run(gz, str(tmp_path / "g"), spm_model, "--partitions", "2")


def test_runs_without_torch_through_the_tool_script(corpus, spm_model, tmp_path):
    inp, texts = corpus
    code = ("import sys, runpy; sys.modules['torch'] = None; "
            "sys.argv = ['preprocess_data.py'] + sys.argv[1:]; "
            f"runpy.run_path({os.path.join(REPO, 'tools', 'preprocess_data.py')!r}, "
            "run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code, "--input", inp, "--tokenizer-model",
                          spm_model, "--output-prefix", str(tmp_path / "nt"), "--workers", "2",
                          "--json-keys", "text", "id"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "in.jsonl:1: missing key 'id'" in out.stderr
    lines = [json.dumps({"text": t, "title": t[:10]}, ensure_ascii=False) for t in texts[:20]]
    two = tmp_path / "two.jsonl"
    two.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-c", code, "--input", str(two), "--tokenizer-model",
                          spm_model, "--output-prefix", str(tmp_path / "nt"), "--workers", "2",
                          "--json-keys", "text", "title"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    tok = SentencePieceTokenizer(spm_model)
    title = IndexedDataset(str(tmp_path / "nt_title_document"))
    assert [list(title[k]) for k in range(20)] == [tok.tokenize(t[:10]) for t in texts[:20]]
    assert len(IndexedDataset(str(tmp_path / "nt_text_document"))) == 20
