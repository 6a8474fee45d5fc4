"""Reading the trainer's metrics.jsonl run directories and N,D,loss CSV files."""
import json
import logging

import numpy as np
import pytest
from scaling_synth import CPT, SIZES, write_run

from megacpt.scaling import load_runs, points_from_runs, predict, read_points_csv
from megacpt.scaling.runs import load_points


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_load_runs_reads_study(study_dir):
    runs = load_runs([study_dir / "scratch", study_dir / "cpt"])
    assert len(runs) == 2 * len(SIZES)
    cpt_runs = [r for r in runs if r["run_kind"] == "cpt"]
    for r in runs:
        assert r["target"] == r["valid_name"] == "zh"
        assert r["dropped_zero_tokens"] == 1  # the evaluation before training
        assert r["D_source"] == "consumed_tokens_per_dataset[zh]"
        assert np.all(np.diff(r["iteration"]) > 0)
        assert np.allclose(r["C"], 6 * r["N"] * r["D"])
        assert np.allclose(r["flops"], 6 * r["N"] * r["tokens"])
    for r in cpt_runs:
        assert np.allclose(r["D"], 0.7 * r["tokens"])  # replay tokens are not target tokens
        assert r["blend"] == {"zh": 0.7, "en": 0.3} and r["init_from"]
        # the losses are the file's zh validation rows, in iteration order
        want = [(row["iteration"], row["loss"]) for row in _rows(r["path"])
                if row["type"] == "valid" and row["name"] == "zh" and row["iteration"] > 0]
        assert [tuple(x) for x in zip(r["iteration"], r["loss"])] == want
        # noise is 0.2%: the points follow the generating law
        assert np.allclose(r["loss"], predict(CPT, N=r["N"], D=r["D"]), rtol=0.01)
    pts = points_from_runs(runs)
    assert len(pts) == sum(len(r["loss"]) for r in runs)
    assert len(dict.fromkeys(pts.group)) == len(runs)


def test_valid_name_selects_other_language(study_dir):
    (run,) = load_runs(study_dir / "cpt" / "cpt-1e+07", valid_name="en")
    assert run["valid_name"] == "en" and np.allclose(run["loss"], 2.9)
    assert np.allclose(run["D"], 0.7 * run["tokens"])  # still target-language tokens


def test_unknown_valid_name_warns(study_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="megacpt.scaling.runs"):
        (run,) = load_runs(study_dir / "cpt" / "cpt-1e+07", valid_name="fr")
    assert run["loss"].size == 0 and "no validation rows named 'fr'" in caplog.text
    assert "['en', 'zh']" in caplog.text


def test_target_share_when_no_train_row_at_eval(tmp_path):
    write_run(tmp_path / "r", 4e7, "cpt", CPT, train_at_evals=False)
    (run,) = load_runs(tmp_path / "r")
    assert run["D_source"] == "consumed_tokens_per_dataset[zh]"
    assert np.allclose(run["D"], 0.7 * run["tokens"])


def test_total_tokens_fallback_warns(tmp_path, caplog):
    write_run(tmp_path / "r", 4e7, "cpt", CPT, per_dataset=False)
    with caplog.at_level(logging.WARNING, logger="megacpt.scaling.runs"):
        (run,) = load_runs(tmp_path / "r" / "metrics.jsonl")
    assert run["D_source"] == "consumed_tokens"
    assert np.allclose(run["D"], run["tokens"])
    assert "no per-dataset token counts" in caplog.text


def test_resumed_run_keeps_last_rows_and_skips_cut_line(tmp_path, caplog):
    path = write_run(tmp_path / "r", 4e7, "scratch", CPT)
    rows = _rows(path)
    last = max(r["iteration"] for r in rows if r["type"] == "valid")
    with open(path, "a") as fh:  # restart from a checkpoint, re-evaluate, crash mid-write
        fh.write(json.dumps(rows[0]) + "\n")
        fh.write(json.dumps({**rows[-2], "iteration": last, "loss": 1.999}) + "\n")
        fh.write('{"type": "valid", "na')
    with caplog.at_level(logging.WARNING):
        (run,) = load_runs(tmp_path / "r")
    assert run["loss"][-1] == 1.999 and "truncated last line" in caplog.text
    assert len(run["loss"]) == len(set(run["iteration"]))


@pytest.mark.parametrize("edit,match", [
    (lambda rows: rows[1:],
     r"metrics.jsonl:1: first row has type 'valid'; expected the 'header' row"),
    (lambda rows: [{k: v for k, v in rows[0].items() if k != "num_parameters"}] + rows[1:],
     r"metrics.jsonl:1: header row lacks field 'num_parameters'"),
    (lambda rows: rows + [{**rows[0], "num_parameters": 7}],
     r"header disagrees with line 1"),
    (lambda rows: rows + [{"type": "valid", "name": "zh", "iteration": 10 ** 9,
                           "loss": float("nan"), "consumed_tokens": 1e9}],
     r"field 'loss' is nan; expected finite"),
    (lambda rows: rows + [{"type": "valid", "name": "zh", "iteration": 10 ** 9,
                           "loss": None, "consumed_tokens": 1e9}],
     r"field 'loss' is null"),
    (lambda rows: rows + [{"type": "valid", "name": "zh", "iteration": 10 ** 9,
                           "loss": "abc", "consumed_tokens": 1e9}],
     r"field 'loss' = 'abc' is not a number"),
    (lambda rows: rows + [{"type": "valid", "name": "zh", "iteration": 10 ** 9,
                           "loss": -1.0, "consumed_tokens": 1e9}],
     r"field 'loss' = -1.0; expected > 0"),
])
def test_bad_metrics_rows_rejected(tmp_path, edit, match):
    path = write_run(tmp_path / "r", 4e7, "scratch", CPT)
    rows = edit(_rows(path))
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r, allow_nan=True) + "\n" for r in rows)
    with pytest.raises(ValueError, match=match):
        load_runs(tmp_path / "r")


def test_bad_json_line_and_missing_dir(tmp_path):
    path = write_run(tmp_path / "r", 4e7, "scratch", CPT)
    lines = open(path).read().split("\n")
    lines[3] = "{oops"
    open(path, "w").write("\n".join(lines))
    with pytest.raises(ValueError, match=r"metrics.jsonl:4: not valid JSON"):
        load_runs(tmp_path / "r")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        load_runs(tmp_path / "empty")


def test_read_points_csv(tmp_path):
    good = tmp_path / "pts.csv"
    good.write_text("run,N,D,loss,extra\na,1e8,1e9,3.1,x\na,1e8,2e9,3.0,y\nb,2e8,1e9,2.9,z\n")
    pts = read_points_csv(str(good))
    assert pts.N.tolist() == [1e8, 1e8, 2e8] and pts.group.tolist() == ["a", "a", "b"]
    assert np.allclose(pts.C, 6 * pts.N * pts.D)
    both = load_points([str(good)], None)
    assert len(both) == 3
    cases = {"N,D\n1,2\n": r"missing column\(s\) \['loss'\]",
             "N,D,loss\n1e8,1e9,abc\n": r"pts.csv:2: column 'loss' = 'abc' is not a number",
             "N,D,loss\n1e8,1e9,3\n1e8,0,3\n": r"pts.csv:3: column 'D' = '0'; expected",
             "N,D,loss\n1e8,1e9,nan\n": r"pts.csv:2: column 'loss' = 'nan'; expected",
             "N,D,loss\n": "no data rows"}
    for text, match in cases.items():
        good.write_text(text)
        with pytest.raises(ValueError, match=match):
            read_points_csv(str(good))
