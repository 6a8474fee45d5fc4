"""megacpt.generate: greedy output equals transformers' `generate` token for token (on the HF
export of the trained checkpoint and on a random HF model imported as is), the KV cache gives
the logits of a full forward, tp2 gives the tp1 tokens, sampling is seeded and respects
top-k / top-p, and the CLI reports bad input in one line."""
import json

import pytest
import torch

from megacpt.evaluation.runner import EvalModel
from megacpt.evaluation.tasks import PairEncoder
from megacpt.generate import KVCache, forward_cached, generate_ids, main, sample_next
from _harness import run_distributed

transformers = pytest.importorskip("transformers")
pytest.importorskip("google.protobuf")

PROMPTS = ["One bright Sunday morning, in the shadows of the", "子曰：学而时习之，不亦",
           "The house of the"]


@pytest.fixture(scope="module")
def random_hf(eval_assets, tmp_path_factory):
    """A random LLaMA with large weights (varied greedy tokens) saved by transformers, with
    the test tokenizer."""
    import shutil

    d = tmp_path_factory.mktemp("random_hf")
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128,
                                   initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):  # the same weights in any test order
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(f"{eval_assets['hf']}/{f}", d / f)
    return str(d)


TIE = 1e-4
"""A greedy step whose top-2 logits are closer than this is a tie within fp32 rounding."""


def _hf_greedy(hf_dir, prompts, n):
    """[(prompt ids, greedy new ids, top-1 - top-2 logit gap of each step)]."""
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        g = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=2,
                           output_logits=True, return_dict_in_generate=True)
        new = g.sequences[0, ids.shape[1]:].tolist()
        keep = new.index(2) + 1 if 2 in new else len(new)
        top2 = torch.cat(g.logits[:keep]).topk(2, dim=-1).values  # [steps, 2]
        out.append((ids[0].tolist(), new[: keep - 1] if 2 in new else new,
                    (top2[:, 0] - top2[:, 1]).tolist()))
    return out


@pytest.mark.parametrize("which", ["export", "random"])
def test_greedy_equals_transformers_generate(which, eval_assets, random_hf):
    hf_dir, load = (eval_assets["hf"], eval_assets["ckpt"]) if which == "export" else \
        (random_hf, random_hf)
    model = EvalModel.load(load)
    enc = PairEncoder(model.tokenizer)
    want = _hf_greedy(hf_dir, PROMPTS, 24)
    got = generate_ids(model.model, [enc.encode(p) for p in PROMPTS], 24, model.tokenizer.eod)
    compared = 0
    for (prompt_ids, w, gaps), g, p in zip(want, got, PROMPTS):
        assert enc.encode(p) == prompt_ids
        k = next((i for i, (a, b) in enumerate(zip(g + [-1], w + [-1])) if a != b), None)
        # equal token for token, up to a step whose top-2 logits tie within fp32 rounding
        # (the reference depends on the session's trained tokenizer and checkpoint, and
        # rounding differs with thread counts and kernels: such a tie may go either way)
        assert k is None or gaps[k] < TIE, (p, k, gaps[k], g, w)
        compared += len(w) if k is None else k
    assert compared >= 10  # real tokens compared, not only a first-step tie or an early EOS
    if which == "random":  # not a degenerate repetition, over all prompts (one may stop at EOS)
        assert len({t for g in got for t in g}) > 5


def test_kv_cache_matches_full_forward(random_hf):
    model = EvalModel.load(random_hf).model
    tokens = torch.randint(3, 1000, (2, 20), generator=torch.Generator().manual_seed(0))
    full = model(tokens)  # [b, s, V]
    cache = KVCache()
    parts = [forward_cached(model, tokens[:, :12], cache)]
    parts += [forward_cached(model, tokens[:, i:i + 1], cache) for i in range(12, 20)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-4)


def test_sampling_filters_and_seed():
    logits = torch.tensor([[4.0, 3.0, 2.0, -1.0, -5.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    top2 = sample_next(logits, 1.0, 2, 1.0, gen)
    assert set(top2.tolist()) == {0, 1}
    nucleus = sample_next(logits, 1.0, 0, 0.5, gen)  # p(0) = 0.66 > 0.5: only token 0
    assert set(nucleus.tolist()) == {0}
    a = sample_next(logits, 1.5, 0, 1.0, torch.Generator().manual_seed(3))
    b = sample_next(logits, 1.5, 0, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and len(set(a.tolist())) >= 3
    assert torch.equal(sample_next(logits, 0.0, 0, 1.0, None), torch.zeros(200, dtype=torch.long))


def _tp_generate(load, prompts):
    from megacpt.parallel.context import ParallelContext

    ctx = ParallelContext.build(tp=2, device="cpu")
    model = EvalModel.load(load, ctx)
    enc = PairEncoder(model.tokenizer)
    ids = [enc.encode(p) for p in prompts]
    return (generate_ids(model.model, ids, 16, model.tokenizer.eod),
            generate_ids(model.model, ids, 16, None, temperature=0.9, top_p=0.9, seed=5))


def test_tp2_generates_the_tp1_tokens(random_hf):
    model = EvalModel.load(random_hf)
    enc = PairEncoder(model.tokenizer)
    ids = [enc.encode(p) for p in PROMPTS]
    want = (generate_ids(model.model, ids, 16, model.tokenizer.eod),
            generate_ids(model.model, ids, 16, None, temperature=0.9, top_p=0.9, seed=5))
    for got in run_distributed(_tp_generate, 2, random_hf, PROMPTS):
        assert got == want


def test_cli(eval_assets, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text('The house\n{"prompt": "子曰"}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["--load", eval_assets["ckpt"], "--prompt-file", str(prompts), "--prompt",
                 "One", "--max-new-tokens", "5", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert [r["prompt"] for r in rows] == ["One", "The house", "子曰"]
    assert all(len(r["tokens"]) <= 5 for r in rows)
    prompts.write_text('{"prompt": 3}\n', encoding="utf-8")
    assert main(["--load", eval_assets["ckpt"], "--prompt-file", str(prompts)]) == 2
    assert "p.txt:1: field 'prompt' must be a string" in capsys.readouterr().out
