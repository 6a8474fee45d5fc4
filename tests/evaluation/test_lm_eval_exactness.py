"""Exactness: lm-evaluation-harness's own `hf` model on the HF export of a trained tiny
checkpoint and our evaluator on the checkpoint itself (one process, and tp2 x dp2 / pp2 x dp2
in a 4-rank world) give the same per-choice log-likelihoods (fp32, 1e-4) and acc/acc_norm,
on English and Chinese (no spaces, byte-fallback pieces) items, some truncated from the left.
No network: the tasks are local YAML tasks over JSON-lines files."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from _harness import run_distributed, torch_threads  # noqa: E402
from _eval_helpers import layouts_worker, lm_eval_hf, write_lm_eval_tasks  # noqa: E402

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf model needs it
pytest.importorskip("google.protobuf")  # transformers' LLaMA tokenizer from tokenizer.model


@pytest.fixture(scope="module")
def reference(eval_assets, tmp_path_factory):
    include = write_lm_eval_tasks(eval_assets["tasks"], str(tmp_path_factory.mktemp("yaml")))
    with torch_threads(2):
        return lm_eval_hf(eval_assets["hf"], include, list(eval_assets["tasks"]))


def _compare(ours: dict, ref: dict):
    for name, want in ref.items():
        got = ours[name]
        assert len(got["loglikelihoods"]) == len(want["lls"]) == got["num_items"]
        for k, (g, w) in enumerate(zip(got["loglikelihoods"], want["lls"])):
            assert len(g) == len(w)
            for a, b in zip(g, w):
                assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (name, k, g, w)
        assert got["acc"] == want["acc"], name
        assert got["acc_norm"] == want["acc_norm"], name


def test_single_process_matches_lm_eval_hf(eval_assets, reference):
    from megacpt.evaluate import evaluate_tasks
    from megacpt.evaluation.runner import EvalModel
    from megacpt.evaluation.tasks import read_task_file

    model = EvalModel.load(eval_assets["ckpt"], attention_backend="eager")
    items = {n: read_task_file(p) for n, p in eval_assets["tasks"].items()}
    ours, _ = evaluate_tasks(model, items, batch_size=3, progress=False, return_lls=True)
    _compare(ours, reference)
    # the items exercise lm-eval's left truncation and the untruncated path
    assert 0 < ours["en"]["truncated_items"] + ours["zh"]["truncated_items"] < 20
    # the Chinese items contain byte-fallback pieces
    pieces = [model.tokenizer.id_to_piece(i) for it in items["zh"]
              for i in model.tokenizer.tokenize(it.context + "".join(it.choices))]
    assert any(p.startswith("<0x") for p in pieces)


def test_tp_and_pp_with_dp_match_lm_eval_hf(eval_assets, reference):
    tasks = eval_assets["tasks"]
    out = run_distributed(layouts_worker, 4, eval_assets["ckpt"], tasks, timeout=240)
    for rank_results in out:
        for layout, ours in rank_results.items():
            _compare(ours, reference)

