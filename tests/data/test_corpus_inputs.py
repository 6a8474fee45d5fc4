"""Corpus containers: the same documents as .jsonl, .gz, .zst, .bz2, .parquet, text, over
several files / globs / directories give byte-identical .bin/.idx; clear refusals."""
import bz2
import gzip
import json

import pytest

from megacpt.data.corpus import CorpusError, expand_inputs, iter_documents
from megacpt.data.preprocess import main as preprocess_main

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstd = pytest.importorskip("zstandard")


@pytest.fixture(scope="module")
def docs(small_jsonl):
    texts = [json.loads(ln)["text"] for ln in open(small_jsonl, encoding="utf-8")][:150]
    return texts + ["", "🦊 x"]


def jsonl_bytes(texts):
    return "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()


def write_parquet(path, texts, row_group_size):
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), str(path),
                   row_group_size=row_group_size)


def write_zst_frames(path, data: bytes, parts: int):
    """Several concatenated zstd frames, as multi-part .zst corpora are written."""
    cut = [len(data) * k // parts for k in range(parts + 1)]
    with open(path, "wb") as f:
        for a, b in zip(cut, cut[1:]):
            f.write(zstd.ZstdCompressor(level=3).compress(data[a:b]))


def preprocess(inputs, out, model, *extra):
    preprocess_main(["--input", *map(str, inputs), "--json-keys", "text", "--tokenizer-model",
                     model, "--output-prefix", str(out), "--append-eod", "--log-interval",
                     "100000", *extra])
    prefix = str(out) + "_text_document"
    return open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()


def test_every_container_gives_identical_binaries(docs, spm_model, tmp_path):
    data = jsonl_bytes(docs)
    half = jsonl_bytes(docs[:70]), jsonl_bytes(docs[70:])
    (tmp_path / "a.jsonl").write_bytes(data)
    with gzip.open(tmp_path / "a.jsonl.gz", "wb") as f:
        f.write(data)
    write_zst_frames(tmp_path / "a.jsonl.zst", data, 3)
    (tmp_path / "a.jsonl.bz2").write_bytes(bz2.compress(data))
    write_parquet(tmp_path / "a.parquet", docs, row_group_size=40)
    d = tmp_path / "dir" / "a_sub"
    d.mkdir(parents=True)
    write_zst_frames(d / "p0.jsonl.zst", half[0], 1)  # directory: sorted, recursive
    write_parquet(tmp_path / "dir" / "p1.parquet", docs[70:], row_group_size=7)
    (tmp_path / "dir" / "README.md").write_text("not a corpus")
    g = tmp_path / "glob"
    g.mkdir()
    (g / "part-0.jsonl").write_bytes(half[0])
    write_parquet(g / "part-1.parquet", docs[70:], row_group_size=1000)

    ref = preprocess([tmp_path / "a.jsonl"], tmp_path / "ref", spm_model)
    for k, inputs in enumerate([[tmp_path / "a.jsonl.gz"], [tmp_path / "a.jsonl.zst"],
                                [tmp_path / "a.jsonl.bz2"], [tmp_path / "a.parquet"],
                                [tmp_path / "dir"], [str(g / "part-*")]]):
        got = preprocess(inputs, tmp_path / f"o{k}", spm_model, "--workers", "2",
                         "--block-mb", "0.01")
        assert got == ref, inputs


def test_plain_text_one_document_per_line(docs, spm_model, tmp_path):
    lines = [t for t in docs if t.strip() and "\n" not in t and "\r" not in t][:60]
    (tmp_path / "t.jsonl").write_bytes(jsonl_bytes(lines))
    text = "\r\n".join(lines).encode() + b"\n\n"  # CRLF endings and a trailing blank line
    (tmp_path / "t.txt").write_bytes(text)
    write_zst_frames(tmp_path / "t.txt.zst", text, 2)
    ref = preprocess([tmp_path / "t.jsonl"], tmp_path / "r", spm_model)
    assert preprocess([tmp_path / "t.txt"], tmp_path / "x", spm_model) == ref
    assert preprocess([tmp_path / "t.txt.zst"], tmp_path / "z", spm_model, "--workers",
                      "2") == ref


def test_refusals_name_the_file_and_the_problem(spm_model, tmp_path, capsys):
    lz4 = tmp_path / "c.jsonl.lz4"
    lz4.write_bytes(b"\x04\x22\x4d\x18" + b"\x00" * 20)
    with pytest.raises(SystemExit):
        preprocess([lz4], tmp_path / "o", spm_model)
    assert "c.jsonl.lz4: lz4-compressed input is not supported" in capsys.readouterr().err
    sneaky = tmp_path / "c.jsonl"  # zstd content under a plain name still reads as zstd
    write_zst_frames(sneaky, b'{"text": "hi"}\n', 1)
    assert list(iter_documents(expand_inputs([str(sneaky)])[0], ["text"])) == [["hi"]]
    write_parquet(tmp_path / "p.parquet", ["a", None, "c"], row_group_size=2)
    with pytest.raises(SystemExit, match=r"p\.parquet: row 1: column 'text' is null"):
        preprocess([tmp_path / "p.parquet"], tmp_path / "o", spm_model)
    with pytest.raises(SystemExit):
        preprocess_main(["--input", str(tmp_path / "p.parquet"), "--json-keys", "body",
                         "--tokenizer-model", spm_model, "--output-prefix", str(tmp_path / "o")])
    assert "p.parquet: no column 'body' for --json-keys (columns: ['id', 'text'])" in \
        capsys.readouterr().err
    with pytest.raises(CorpusError, match="matches no file"):
        expand_inputs([str(tmp_path / "none-*.jsonl")])


def test_tokenizer_trains_the_same_from_any_container(docs, tmp_path):
    import sentencepiece as spm

    from megacpt.data.tokenizer_train import main as train_main

    data = jsonl_bytes(docs)
    (tmp_path / "a.jsonl").write_bytes(data)
    write_zst_frames(tmp_path / "b.jsonl.zst", jsonl_bytes(docs[:80]), 2)
    write_parquet(tmp_path / "c.parquet", docs[80:], row_group_size=30)
    models = []
    for name, inputs in (("ref", [tmp_path / "a.jsonl"]),
                         ("mix", [tmp_path / "b.jsonl.zst", tmp_path / "c.parquet"])):
        train_main(["--input", *map(str, inputs), "--vocab-size", "600", "--character-coverage",
                    "0.98", "--model-prefix", str(tmp_path / name), "--num-threads", "1"])
        sp = spm.SentencePieceProcessor(model_file=str(tmp_path / f"{name}.model"))
        models.append([(sp.id_to_piece(i), sp.get_score(i)) for i in range(len(sp))])
    assert len(models[0]) == 600 and models[0] == models[1]  # same pieces, same order


def test_huggingface_tokenizer_json(docs, tmp_path):
    """--tokenizer-type HuggingFaceTokenizer (Llama 3 / Qwen2.5 tokenizer.json): ids without
    special tokens, then the eos token as EOD; parquet and jsonl agree."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from megacpt.data.indexed import IndexedDataset

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=400,
                                                      special_tokens=["<|end_of_text|>"]))
    d = tmp_path / "hf"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(docs))
    write_parquet(tmp_path / "a.parquet", docs, row_group_size=50)
    outs = []
    for name in ("a.jsonl", "a.parquet"):
        preprocess_main(["--input", str(tmp_path / name), "--tokenizer-type",
                         "HuggingFaceTokenizer", "--tokenizer-model", str(d), "--output-prefix",
                         str(tmp_path / name), "--append-eod", "--workers", "2"])
        outs.append(IndexedDataset(str(tmp_path / name) + "_text_document"))
    eod = tok.token_to_id("<|end_of_text|>")
    for k in (0, 7, len(docs) - 1):
        want = tok.encode(docs[k], add_special_tokens=False).ids + [eod]
        assert list(outs[0][k]) == want and list(outs[1][k]) == want
