"""The lm-eval adapter (`megacpt` LM): loglikelihood_rolling and generate_until give what
lm-eval's own `hf` model gives on the HF export; `--lm-eval-tasks` runs a local YAML task
through lm-eval with our model and reproduces our evaluator's numbers; without lm-eval the
flag says how to install it."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402

import pytest  # noqa: E402

from _eval_helpers import read_items, write_lm_eval_tasks  # noqa: E402

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")
pytest.importorskip("google.protobuf")


@pytest.fixture(scope="module")
def pair(eval_assets):
    from lm_eval.models.huggingface import HFLM

    from megacpt.evaluation.lm_eval_adapter import MegacptLM

    hf = HFLM(pretrained=eval_assets["hf"], batch_size=4, device="cpu", dtype="float32")
    ours = MegacptLM(load=eval_assets["ckpt"], batch_size=4, progress=False)
    return hf, ours


def _instances(kind, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i)
            for i, a in enumerate(args_list)]


def test_rolling_loglikelihood_matches_hf(eval_assets, pair):
    hf, ours = pair
    texts = [it["context"] + " " + it["choices"][it["gold"]]
             for lang in ("en", "zh") for it in read_items(eval_assets["tasks"][lang])[:2]]
    texts.append(" ".join(texts))  # longer than the model: several rolling windows
    reqs = _instances("loglikelihood_rolling", [(t,) for t in texts])
    want = hf.loglikelihood_rolling(reqs, disable_tqdm=True)
    got = ours.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert len(ours.tok_encode(texts[-1])) > 2 * ours.max_length
    for g, w in zip(got, want):
        assert abs(g - w) <= 1e-4 * max(1.0, abs(w)), (got, want)


def test_generate_until_matches_hf_greedy(eval_assets, pair):
    hf, ours = pair
    items = read_items(eval_assets["tasks"]["en"])[:1] + read_items(eval_assets["tasks"]["zh"])[:1]
    args = [(it["context"][:60], {"until": ["\n\n", "。"], "max_gen_toks": 12, "do_sample": False})
            for it in items]
    want = hf.generate_until(_instances("generate_until", args), disable_tqdm=True)
    got = ours.generate_until(_instances("generate_until", args), disable_tqdm=True)
    assert got == want


def test_lm_eval_tasks_flag_runs_local_task(eval_assets, tmp_path):
    from megacpt.evaluate import main

    include = write_lm_eval_tasks({"demo_zh_lm": eval_assets["tasks"]["zh"]},
                                  str(tmp_path / "yaml"))
    out = tmp_path / "res.json"
    code = main(["--load", eval_assets["ckpt"], "--task-file", f"zh={eval_assets['tasks']['zh']}",
                 "--lm-eval-tasks", "demo_zh_lm", "--lm-eval-include-path", include,
                 "--output", str(out), "--no-progress", "--attention-backend", "eager"])
    assert code == 0
    res = json.load(open(out))
    ours, via_lm_eval = res["tasks"]["zh"], res["lm_eval"]["demo_zh_lm"]
    assert via_lm_eval["acc"] == ours["acc"] and via_lm_eval["acc_norm"] == ours["acc_norm"]
    assert via_lm_eval["num_items"] == ours["num_items"] == 10


def test_without_lm_eval_the_flag_says_how_to_install(eval_assets, monkeypatch, capsys):
    from megacpt.evaluate import main
    from megacpt.evaluation import lm_eval_adapter

    monkeypatch.setattr(lm_eval_adapter, "_MISSING", ImportError("No module named 'lm_eval'"))
    code = main(["--load", eval_assets["ckpt"], "--lm-eval-tasks", "xnli_zh", "--no-progress"])
    assert code == 2
    assert "pip install 'megacpt[eval]'" in capsys.readouterr().out
