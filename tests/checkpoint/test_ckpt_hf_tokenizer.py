"""A Llama 3.x / Qwen2.5 byte-level BPE tokenizer.json carried end to end, offline: an HF
directory (tiny random LlamaForCausalLM / Qwen2ForCausalLM with a tokenizer.json built by
the `tokenizers` library) -> preprocess_data.py with its tokenizer -> megacpt.train
--init-from it with --tokenizer-model tokenizer.json (bits per byte, dataset-tokenizer check)
-> extend_vocab.py (new tokens as BPE merges, new rows the mean of their source split) ->
convert_checkpoint.py --to-hf: transformers' AutoTokenizer on the export encodes English and
Chinese exactly like ours, its model's logits equal ours, and megacpt.generate's greedy
tokens equal transformers' generate. Mismatches are one-line errors naming the files."""
import json
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import _hf_fixtures as F  # noqa: E402
from megacpt.checkpoint import load_model  # noqa: E402
from megacpt.data.tokenizer import find_tokenizer, load_tokenizer  # noqa: E402

K = 20  # new tokens asked for


def _write_corpus(path: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for t in F.ZH_CORPUS + F.TEXTS * 4:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module", params=sorted(F.FAMILIES))
def pipeline(request, tmp_path_factory):
    """Run the whole path for one family; returns its directories."""
    from megacpt.checkpoint.convert import main as convert_main
    from megacpt.checkpoint.vocab import main as extend_main
    from megacpt.data.preprocess import main as preprocess_main
    from megacpt.train import main as train_main

    family = request.param
    root = tmp_path_factory.mktemp(f"hftok_{family}")
    hf = str(root / "hf")
    F.build_hf_model(hf, family)
    corpus = _write_corpus(str(root / "zh.jsonl"))
    typ = ["--tokenizer-type", "HuggingFaceTokenizer"] if family == "llama3" else []
    preprocess_main(["--input", corpus, "--tokenizer-model", hf, "--output-prefix",
                     str(root / "zh"), "--append-eod"] + typ)
    ck = str(root / "ck")
    flags = ["--init-from", hf, "--tokenizer-model", os.path.join(hf, "tokenizer.json"),
             "--data-path", str(root / "zh_text_document"), "--split", "90,10,0",
             "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
             "--train-iters", "2", "--lr", "1e-3", "--attention-backend", "eager",
             "--no-use-kernels", "--eval-interval", "2", "--eval-iters", "1",
             "--log-interval", "1", "--num-workers", "0", "--no-tensorboard", "--save", ck,
             "--log-dir", str(root / "log")] + typ
    assert train_main(flags) == 0
    ext = str(root / "ext")
    extend_main(["--tokenizer-model", ck, "--corpus", corpus, "--new-pieces", str(K),
                 "--load-dir", ck, "--save-dir", ext])
    export = str(root / "export")
    convert_main(["--load-dir", ext, "--to-hf", export, "--no-progress"])
    return {"family": family, "root": root, "hf": hf, "ck": ck, "ext": ext, "export": export,
            "data": str(root / "zh_text_document")}


def test_trained_with_the_hf_tokenizer(pipeline):
    from megacpt.training.metrics import read_metrics

    ck = pipeline["ck"]
    assert find_tokenizer(ck) == os.path.join(ck, "tokenizer.json")  # carried in the checkpoint
    valid = read_metrics(str(pipeline["root"] / "log"), "valid")
    assert valid and all(math.isfinite(r["bpb"]) and 0 < r["bpb"] for r in valid)
    # bits per byte counts the UTF-8 bytes the byte-level pieces stand for
    tok = load_tokenizer(pipeline["hf"])
    table = tok.token_bytes()
    for text in F.TEXTS + F.ZH_CORPUS[:5]:
        assert sum(table[i] for i in tok.tokenize(text)) == len(text.encode("utf-8"))
    assert table[tok.eod] == 0


def test_extension_adds_merges_and_initialises_rows(pipeline):
    src, ext = load_tokenizer(pipeline["ck"]), load_tokenizer(pipeline["ext"])
    rep = json.load(open(os.path.join(pipeline["ext"], "vocab_extension.json")))
    v = src.vocab_size
    assert rep["method"] == "bpe-merges" and 8 <= rep["new_pieces"] <= K
    assert rep["new_vocab_size"] == ext.vocab_size == v + rep["new_pieces"]
    assert rep["tokens_per_char"]["after"] < rep["tokens_per_char"]["before"]
    used = {i for t in F.ZH_CORPUS for i in ext.tokenize(t)}
    assert len(used & set(range(v, ext.vocab_size))) > rep["new_pieces"] // 2
    for text in F.TEXTS[:2]:  # English: no new token applies, ids unchanged
        assert ext.tokenize(text) == src.tokenize(text)
    for text in F.TEXTS + F.ZH_CORPUS[:5]:
        assert ext.detokenize(ext.tokenize(text)) == text
    old, new = load_model(pipeline["ck"]), load_model(pipeline["ext"])
    assert new.cfg.vocab_size == max(old.cfg.vocab_size, ext.vocab_size)  # Qwen2: spare rows
    e_old, e_new = old.embedding.weight.detach(), new.embedding.weight.detach()
    torch.testing.assert_close(e_new[:v], e_old[:v], rtol=0, atol=0)
    for p in rep["pieces"]:
        torch.testing.assert_close(e_new[p["id"]], e_old[p["source_ids"]].mean(0))
        assert "".join(src.id_to_piece(i) for i in p["source_ids"]) == p["token"]


def test_export_tokenizer_and_logits_equal_transformers(pipeline):
    from megacpt.evaluation.tasks import PairEncoder

    export, ext = pipeline["export"], pipeline["ext"]
    ours = load_tokenizer(ext)
    theirs = transformers.AutoTokenizer.from_pretrained(export)
    enc = PairEncoder(ours)
    for text in F.TEXTS + F.ZH_CORPUS[:5]:
        assert theirs(text, add_special_tokens=False)["input_ids"] == ours.tokenize(text)
        assert theirs(text)["input_ids"] == enc.encode(text)  # BOS exactly when HF adds one
    assert (ours.bos is not None) == (pipeline["family"] == "llama3")
    cfg = json.load(open(os.path.join(export, "config.json")))
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (ours.bos, ours.eod)
    assert cfg["max_position_embeddings"] == 64  # the source's, not the --seq-length trained at
    cls = getattr(transformers, F.FAMILIES[pipeline["family"]][5][0])
    hf_model = cls.from_pretrained(export, dtype=torch.float32).eval()
    model = load_model(ext)
    ids = torch.tensor([enc.encode(F.ZH_CORPUS[0])[:16], enc.encode(F.TEXTS[4])[:16]])
    assert (ids >= load_tokenizer(pipeline["ck"]).vocab_size).any()  # new tokens in the input
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_model(ids).logits, rtol=1e-4, atol=1e-4)


def test_generate_equals_transformers(pipeline, tmp_path):
    from megacpt.generate import main as generate_main

    prompt = F.ZH_CORPUS[1][:4]
    out = tmp_path / "gen.jsonl"
    assert generate_main(["--load", pipeline["ext"], "--prompt", prompt, "--max-new-tokens",
                          "5", "--device", "cpu", "--output", str(out)]) == 0
    ours = json.loads(out.read_text())["tokens"]
    export = pipeline["export"]
    tok = transformers.AutoTokenizer.from_pretrained(export)
    cls = getattr(transformers, F.FAMILIES[pipeline["family"]][5][0])
    model = cls.from_pretrained(export, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    eos = load_tokenizer(pipeline["ext"]).eod
    g = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=eos)[0, ids.shape[1]:]
    new = g.tolist()
    assert ours and ours == (new[: new.index(eos)] if eos in new else new)


def test_mismatches_are_named(pipeline):
    from megacpt.arguments import parse_args
    from megacpt.config import ConfigError
    from megacpt.evaluation.runner import EvalModel
    from megacpt.evaluation.tasks import EvalInputError
    from megacpt.training.checks import check_tokenizer_sidecar

    ext_tok = os.path.join(pipeline["ext"], "tokenizer.json")
    with pytest.raises(ConfigError, match=r"tokenized with another tokenizer than "
                                          r"--tokenizer-model .*ext/tokenizer.json"):
        check_tokenizer_sidecar("--data-path", "zh", pipeline["data"], ext_tok)
    check_tokenizer_sidecar("--data-path", "zh", pipeline["data"], pipeline["hf"])  # same file
    if pipeline["family"] == "llama3":  # (Qwen2's spare rows hold the new ids)
        with pytest.raises(ConfigError, match=r"tokenizer.json has \d+ tokens, more than the "
                                              r"--init-from checkpoint's vocab_size"):
            parse_args(["--init-from", pipeline["hf"], "--tokenizer-model", ext_tok,
                        "--mock-data", "--train-iters", "1", "--seq-length", "16"])
        with pytest.raises(EvalInputError, match=r"ext/tokenizer.json: the tokenizer has \d+ "
                                                 r"tokens but the model .*hf has vocab_size"):
            EvalModel.load(pipeline["hf"], tokenizer_model=ext_tok)


def test_only_bpe_tokenizer_json_extends(tmp_path, capsys):
    from tokenizers import Tokenizer, models

    from megacpt.checkpoint.vocab import main as extend_main

    os.makedirs(tmp_path / "wl")
    tok = Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token="a"))
    tok.save(str(tmp_path / "wl" / "tokenizer.json"))
    (tmp_path / "wl" / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    corpus = _write_corpus(str(tmp_path / "c.jsonl"))
    with pytest.raises(SystemExit) as e:
        extend_main(["--tokenizer-model", str(tmp_path / "wl"), "--corpus", corpus,
                     "--new-pieces", "4", "--from-hf", str(tmp_path / "wl"), "--save-dir",
                     str(tmp_path / "o")])
    assert e.value.code == 2
    assert "wl/tokenizer.json: field 'model.type' is 'WordLevel'" in capsys.readouterr().err


def test_evaluator_scores_equal_transformers(pipeline, tmp_path):
    """megacpt.evaluate on the extended checkpoint (its tokenizer.json): per-choice
    log-likelihoods equal transformers' on the export with AutoTokenizer's encoding."""
    from megacpt.evaluate import main as evaluate_main
    from megacpt.evaluation.runner import EvalModel, loglikelihoods
    from megacpt.evaluation.tasks import PairEncoder

    items = [{"context": t[:5], "choices": [t[5:9], F.ZH_CORPUS[(i + 1) % 5][5:9]], "gold": 0}
             for i, t in enumerate(F.ZH_CORPUS[:3])]
    task = tmp_path / "zh.jsonl"
    task.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items))
    out = tmp_path / "r.json"
    assert evaluate_main(["--load", pipeline["ext"], "--task-file", f"zh={task}", "--output",
                          str(out), "--device", "cpu", "--no-progress"]) == 0
    assert "zh" in out.read_text()
    em = EvalModel.load(pipeline["ext"])
    enc = PairEncoder(em.tokenizer)
    reqs = [enc.pair(x["context"], " " + c) for x in items for c in x["choices"]]
    ours = [ll for ll, _ in loglikelihoods(em, reqs, batch_size=4, progress=False)]
    export = pipeline["export"]
    tok = transformers.AutoTokenizer.from_pretrained(export)
    cls = getattr(transformers, F.FAMILIES[pipeline["family"]][5][0])
    model = cls.from_pretrained(export, dtype=torch.float32).eval()
    theirs = []
    for x in items:
        for c in x["choices"]:
            whole = tok(x["context"] + " " + c)["input_ids"]
            ctx = tok(x["context"])["input_ids"]
            if not ctx:  # (lm-eval starts an empty context with the prefix token)
                ctx = [enc.prefix_token_id]
                whole = ctx + whole
            with torch.no_grad():
                logp = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            theirs.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
    assert ours == pytest.approx(theirs, abs=1e-4)
