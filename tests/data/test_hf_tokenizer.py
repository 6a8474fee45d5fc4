"""One tokenizer interface (`megacpt.data.tokenizer`): SentencePiece and HuggingFace
tokenizer.json behind `load_tokenizer`, the kind from the path; the HF one encodes exactly
like transformers' AutoTokenizer (Llama 3 and Qwen2.5 shapes, English and Chinese), its
byte table counts UTF-8 bytes, it pickles by path, and preprocess_data.py takes an HF
directory. Bad paths are errors naming the file and what was expected."""
import json
import os
import pickle

import pytest

pytest.importorskip("tokenizers")

import _hf_fixtures as F  # noqa: E402
from megacpt.data.tokenizer import find_tokenizer, load_tokenizer  # noqa: E402


@pytest.fixture(scope="module", params=sorted(F.FAMILIES))
def hf_tok(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(f"tok_{request.param}"))
    return request.param, F.build_tokenizer_json(folder, request.param)


def test_kind_follows_the_path(hf_tok, spm_model, tmp_path):
    family, folder = hf_tok
    for path in (folder, os.path.join(folder, "tokenizer.json")):
        tok = load_tokenizer(path)
        assert tok.kind == "huggingface" and tok.vocab_size == 403
    assert load_tokenizer(spm_model).kind == "sentencepiece"
    assert load_tokenizer(spm_model).bos is not None  # <s>
    tok = load_tokenizer(folder)
    assert tok.eod == tok.piece_to_id(F.FAMILIES[family][3])
    assert tok.bos == (tok.piece_to_id("<|begin_of_text|>") if family == "llama3" else None)
    again = pickle.loads(pickle.dumps(tok))
    assert again.tokenize(F.TEXTS[2]) == tok.tokenize(F.TEXTS[2])
    assert set(tok.files()) == {"tokenizer.json", "tokenizer_config.json"}  # names -> bytes


def test_encodes_like_transformers_and_counts_bytes(hf_tok):
    transformers = pytest.importorskip("transformers")
    _, folder = hf_tok
    ours = load_tokenizer(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    table = ours.token_bytes()
    assert len(table) == ours.vocab_size and table[ours.eod] == 0
    for text in F.TEXTS + F.ZH_CORPUS[:5]:
        ids = ours.tokenize(text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids
        assert ours.tokenize_batch([text, text]) == [ids, ids]
        assert ours.detokenize(ids) == text
        assert sum(table[i] for i in ids) == len(text.encode("utf-8"))


def test_bad_paths_are_named(hf_tok, tmp_path):
    _, folder = hf_tok
    with pytest.raises(FileNotFoundError, match=r"empty: directory holds no tokenizer.model "
                                                r"\(SentencePiece\) and no tokenizer.json"):
        os.makedirs(tmp_path / "empty")
        load_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"tokenizer.json: not a SentencePiece model"):
        load_tokenizer(os.path.join(folder, "tokenizer.json"), "SentencePieceTokenizer")
    with pytest.raises(ValueError, match="--tokenizer-type 'GPT2BPETokenizer' is not supported"):
        load_tokenizer(folder, "GPT2BPETokenizer")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.json: not a HuggingFace tokenizer.json"):
        load_tokenizer(str(tmp_path / "bad.json"))
    bare = tmp_path / "bare"
    os.makedirs(bare)
    with open(os.path.join(folder, "tokenizer.json")) as f:
        (bare / "tokenizer.json").write_text(f.read())
    with pytest.raises(ValueError, match=r"bare/tokenizer.json: no end-of-sequence token"):
        load_tokenizer(str(bare))
    assert find_tokenizer(str(bare)) == str(bare / "tokenizer.json")
    (bare / "tokenizer.model").write_bytes(b"tiktoken, not sentencepiece")
    assert find_tokenizer(str(bare)) == str(bare / "tokenizer.json")  # Llama 3 repositories


def test_preprocess_takes_an_hf_directory(hf_tok, tmp_path):
    from megacpt.data import sidecar
    from megacpt.data.indexed import IndexedDataset
    from megacpt.data.preprocess import main as preprocess_main

    _, folder = hf_tok
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in F.TEXTS))
    preprocess_main(["--input", str(inp), "--tokenizer-model", folder, "--output-prefix",
                     str(tmp_path / "d"), "--append-eod"])  # no --tokenizer-type needed
    tok = load_tokenizer(folder)
    ds = IndexedDataset(str(tmp_path / "d_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.tokenize(t) + [tok.eod]
                                                        for t in F.TEXTS]
    rec = sidecar.read(str(tmp_path / "d_text_document"))
    assert rec["tokenizer_sha256"] == sidecar.fingerprint(os.path.join(folder, "tokenizer.json"))


def test_copy_keeps_eos_taken_from_config_json(hf_tok, tmp_path):
    """A tokenizer whose eos comes from config.json beside it still knows it once copied
    into a checkpoint (no config.json there): the copied tokenizer_config.json names it."""
    from megacpt.data.tokenizer import copy_tokenizer

    _, folder = hf_tok
    src = tmp_path / "src"
    os.makedirs(src)
    (src / "tokenizer.json").write_bytes(open(os.path.join(folder, "tokenizer.json"), "rb").read())
    tok = load_tokenizer(folder)
    (src / "config.json").write_text(json.dumps({"eos_token_id": tok.eod}))
    os.makedirs(tmp_path / "ck")
    copy_tokenizer(str(src), str(tmp_path / "ck"))
    assert sorted(os.listdir(tmp_path / "ck")) == ["tokenizer.json", "tokenizer_config.json"]
    copied = load_tokenizer(str(tmp_path / "ck"))
    assert (copied.eod, copied.bos) == (tok.eod, tok.bos)
    os.makedirs(tmp_path / "ck2")
    copy_tokenizer(folder, str(tmp_path / "ck2"))  # an existing config is copied byte for byte
    assert open(tmp_path / "ck2" / "tokenizer_config.json", "rb").read() == \
        open(os.path.join(folder, "tokenizer_config.json"), "rb").read()
