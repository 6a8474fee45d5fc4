"""`python -m megacpt.evaluate`: RESULTS.json and the table; bad input is one clear line
naming the file, line and field (exit 2); the CLI under torchrun (tp1 x dp2) gives the
single-process numbers; demo tasks; metric definitions."""
import json
import os
import subprocess
import sys

import pytest

from _eval_helpers import REPO

from megacpt.evaluate import main
from megacpt.evaluation.tasks import TaskItem, item_scores, task_metrics


def _write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
            f.write("\n")
    return str(path)


def test_results_json_and_table(eval_assets, tmp_path, capsys):
    out = tmp_path / "r" / "results.json"
    code = main(["--load", eval_assets["hf"], "--task-file", f"en={eval_assets['tasks']['en']}",
                 "--task-file", f"zh={eval_assets['tasks']['zh']}", "--output", str(out),
                 "--no-progress", "--micro-batch-size", "5"])
    assert code == 0
    res = json.load(open(out))
    assert set(res["tasks"]) == {"en", "zh"}
    for m in res["tasks"].values():
        assert m["num_items"] == 10 and 0 <= m["acc"] <= 1 and 0 <= m["acc_norm"] <= 1
        assert set(m["per_language"]) <= {"en", "zh"}
    assert res["num_requests"] == 80 and res["items_per_second"] > 0
    table = capsys.readouterr().out
    assert "| task | items | acc | acc_norm |" in table and "| zh | 10 |" in table


GOOD = {"context": "a b", "choices": ["c", "d"], "gold": 1}


@pytest.mark.parametrize("rows,match", [
    (['{"context": "a", "choices": ["x"], "gold": 0', ], r"t\.jsonl:1: malformed JSON"),
    ([GOOD, {**GOOD, "gold": 2}], r"t\.jsonl:2: field 'gold' is 2, out of range for 2 choices"),
    ([{**GOOD, "choices": []}], r"t\.jsonl:1: field 'choices' must be a non-empty list"),
    ([{**GOOD, "choices": ["a", ""]}], r"t\.jsonl:1: field 'choices\[1\]' must be a non-empty"),
    ([{"choices": ["a"], "gold": 0}], r"t\.jsonl:1: field 'context' must be a string"),
    ([GOOD, "", "[1, 2]"], r"t\.jsonl:3: expected a JSON object"),
    ([{**GOOD, "gold": "1"}], r"t\.jsonl:1: field 'gold' must be an integer"),
])
def test_bad_task_files(rows, match, tmp_path, capsys):
    path = _write(tmp_path / "t.jsonl", rows)
    assert main(["--load", str(tmp_path), "--task-file", f"t={path}"]) == 2
    out = capsys.readouterr().out
    assert "Traceback" not in out
    import re
    assert re.search(match, out), out


def test_missing_checkpoint_tokenizer_and_task(eval_assets, tmp_path, capsys):
    task = _write(tmp_path / "t.jsonl", [GOOD])
    assert main(["--load", str(tmp_path / "nope"), "--task-file", f"t={task}"]) == 2
    assert "nope does not exist" in capsys.readouterr().out
    assert main(["--load", eval_assets["ckpt"], "--task-file", f"t={task}",
                 "--tokenizer-model", str(tmp_path / "missing.model")]) == 2
    assert "missing.model: file not found" in capsys.readouterr().out
    assert main(["--load", eval_assets["ckpt"], "--task-file", f"t={tmp_path}/x.jsonl"]) == 2
    assert "x.jsonl: task file not found" in capsys.readouterr().out
    assert main(["--load", eval_assets["ckpt"], "--task-file", "no-equals-sign"]) == 2
    assert "expected NAME=FILE.jsonl" in capsys.readouterr().out


def test_long_context_is_truncated_from_the_left_and_reported(eval_assets, tmp_path, capsys):
    long_ctx = "the river and the stone " * 100  # far more than 128 tokens
    task = _write(tmp_path / "t.jsonl", [{"context": long_ctx, "choices": ["a", "b"], "gold": 0},
                                         GOOD])
    out = tmp_path / "r.json"
    assert main(["--load", eval_assets["ckpt"], "--task-file", f"t={task}", "--output",
                 str(out), "--no-progress"]) == 0
    assert json.load(open(out))["tasks"]["t"]["truncated_items"] == 1
    assert "1 of 2 items are longer than the model's 128 tokens" in capsys.readouterr().out


def test_metrics_follow_lm_eval_definitions():
    item = TaskItem("q", ["aaaa", "b"], gold=0)
    # acc: raw argmax; acc_norm: argmax of ll / len(choice in characters)
    assert item_scores(item, [-2.0, -1.0]) == {"acc": 0.0, "acc_norm": 1.0}  # -0.5 > -1.0
    assert item_scores(item, [-0.9, -1.0]) == {"acc": 1.0, "acc_norm": 1.0}
    assert item_scores(item, [-8.0, -1.0]) == {"acc": 0.0, "acc_norm": 0.0}  # -2.0 < -1.0
    assert item_scores(item, [-1.0, -1.0])["acc"] == 1.0  # ties: the first, like np.argmax
    m = task_metrics([item, item], [[-2.0, -1.0], [-8.0, -1.0]])
    assert m["acc"] == 0.0 and m["acc_norm"] == 0.5 and m["num_items"] == 2
    assert m["acc_norm_stderr"] == pytest.approx(0.5)  # sample std 0.7071 / sqrt(2)


@pytest.mark.slow
def test_cli_under_torchrun_dp2_matches_one_process(eval_assets, tmp_path):
    single, multi = tmp_path / "one.json", tmp_path / "two.json"
    flags = ["--load", eval_assets["ckpt"], "--task-file", f"zh={eval_assets['tasks']['zh']}",
             "--no-progress", "--attention-backend", "eager", "--micro-batch-size", "3"]
    assert main(flags + ["--output", str(single)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--standalone", "tools/evaluate.py", *flags, "--output", str(multi)]
    subprocess.run(cmd, check=True, cwd=REPO, env=env, timeout=240, capture_output=True)
    a, b = json.load(open(single)), json.load(open(multi))
    assert b["layout"] == "tp1pp1dp2"
    assert a["tasks"]["zh"]["acc"] == b["tasks"]["zh"]["acc"]
    assert a["tasks"]["zh"]["acc_norm"] == b["tasks"]["zh"]["acc_norm"]
