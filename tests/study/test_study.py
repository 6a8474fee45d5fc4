"""tools/run_study.py and megacpt.study: the tiny example study end to end, resume, print mode,
planning and config errors.

The example study (examples/study_tiny.yaml: 2 debug sizes x scratch/CPT/CPT+30% replay on
the bundled corpus) runs once per module; the other tests reuse its output directory.
"""
import json
import math
import os

import numpy as np
import pytest
import yaml

from megacpt import sizes, study
from megacpt.training.metrics import read_metrics

from _harness import load_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(REPO, "examples", "study_tiny.yaml")


def _load_tool():
    return load_script("tools/run_study.py")


run_study = _load_tool()


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert run_study.main(["--config", EXAMPLE, "--out", str(out)]) == 0
    cfg = study.load_config(EXAMPLE, str(out))
    return out, cfg, study.plan_runs(cfg, study.vocab_size(cfg))


def test_example_runs_are_sized_by_tokens_per_param(example):
    out, cfg, runs = example
    assert [r.name for r in runs] == [
        "en_tiny_source", "en_debug-xs_source", "zh_tiny_scratch", "zh_tiny_cpt",
        "zh_tiny_cpt_replay0.3", "zh_debug-xs_scratch", "zh_debug-xs_cpt",
        "zh_debug-xs_cpt_replay0.3"]
    for r in runs:
        shape = sizes.get_size(r.size)
        n = sizes.param_count(shape.hidden_size, shape.ffn_hidden_size, shape.num_layers,
                              shape.num_attention_heads, shape.num_query_groups, 2048)
        assert r.num_parameters == n
        assert r.train_iters == math.ceil(0.05 * n / (8 * 64))
        rows = read_metrics(r.run_dir, "train")
        assert rows[-1]["iteration"] == r.train_iters
        per = rows[-1]["consumed_tokens_per_dataset"]
        if r.replay:  # exact 30% replay of English samples
            assert per["en"] / (per["en"] + per["zh"]) == pytest.approx(0.3, abs=0.02)
        else:
            assert set(per) == {r.lang}
        if r.kind == "cpt":
            assert r.init_from == os.path.join(str(out), "checkpoints", f"en_{r.size}_source")
            assert read_metrics(r.run_dir, "header")[0]["run_kind"] == "cpt"


def test_example_results_and_report(example):
    out, cfg, runs = example
    with open(out / "results.json", encoding="utf-8") as f:
        res = json.load(f)
    assert all(r["finished"] for r in res["runs"]) and len(res["runs"]) == 8
    zh = res["languages"]["zh"]
    assert set(zh["fits"]) == {"scratch", "cpt", "cpt_replay0.3"}
    for name, fit in zh["fits"].items():  # fitted, or a stated reason it was not
        assert "error" in fit or all(np.isfinite(fit[k]) for k in ("E", "A", "B", "beta"))
    scratch = zh["fits"]["scratch"]
    if "error" not in scratch:  # two sizes can never identify E, A and alpha: must be said
        assert any("only 2 model sizes" in n for n in scratch["quality_notes"])
    # forgetting rows are the runs' own final source-language losses
    by_name = {r.name: r for r in runs}
    assert len(zh["forgetting"]) == 4
    for row in zh["forgetting"]:
        valid = [v for v in read_metrics(by_name[row["run"]].run_dir, "valid")
                 if v["name"] == "en"]
        assert row["final_source_loss"] == pytest.approx(valid[-1]["loss"])
        src = [v for v in read_metrics(by_name[f"en_{row['size']}_source"].run_dir, "valid")
               if v["name"] == "en"]
        assert row["source_model_loss"] == pytest.approx(src[-1]["loss"])
    # the points fitted are the scratch runs' zh validation rows past 10% of their tokens
    pts = zh["points"]["scratch"]
    expected = sum(
        sum(1 for v in read_metrics(by_name[n].run_dir, "valid")
            if v["name"] == "zh" and v["iteration"] >= 0.1 * by_name[n].train_iters)
        for n in ("zh_tiny_scratch", "zh_debug-xs_scratch"))
    assert len(pts["loss"]) == expected
    report = (out / "report.md").read_text()
    for heading in ("## Runs", "### Scaling-law fits", "### Compute-optimal allocation",
                    "### Loss-compute frontier", "### Transfer", "### Forgetting"):
        assert heading in report
    assert "Poorly determined" in report
    assert "Intermediate checkpoints fitted" in report  # study_tiny opts in: flagged
    for png in ("zh_loss_compute.png", "zh_forgetting.png"):
        with open(out / "plots" / png, "rb") as f:
            assert f.read(4) == b"\x89PNG"
    assert (out / "fits" / "zh_fit_scratch.json").is_file()


def test_downstream_eval_of_every_final_checkpoint_in_results_and_report(example):
    """study_tiny's downstream: demo tasks per language on each run's final checkpoint."""
    from megacpt.evaluation.report import evaluate_checkpoints
    from megacpt.study.downstream import EVAL_FILE, evaluate_pending, task_sources

    out, cfg, runs = example
    tasks = task_sources(cfg)
    assert set(tasks) == {"demo_en", "demo_zh"}
    for r in runs:
        ev = json.loads(open(os.path.join(r.run_dir, EVAL_FILE), encoding="utf-8").read())
        assert ev["iteration"] == r.train_iters and ev["checkpoint"] == r.ckpt_dir
        assert {t: m["num_items"] for t, m in ev["tasks"].items()} == {"demo_en": 16,
                                                                       "demo_zh": 16}
    run = next(r for r in runs if r.name == "zh_tiny_cpt_replay0.3")  # the real final model
    again = evaluate_checkpoints({run.name: run.ckpt_dir}, tasks, 32, "cpu")[run.name]
    ev = json.loads(open(os.path.join(run.run_dir, EVAL_FILE), encoding="utf-8").read())
    for t in tasks:
        assert (ev["tasks"][t]["acc"], ev["tasks"][t]["acc_norm"]) == \
            (again[t]["acc"], again[t]["acc_norm"])
    res = json.loads((out / "results.json").read_text())["downstream"]
    assert [r["run"] for r in res["runs"]] == [r.name for r in runs]
    assert res["chance"] == {"demo_en": 0.25, "demo_zh": 0.25}
    report = (out / "report.md").read_text()
    acc = ev["tasks"]["demo_zh"]
    assert "## Downstream evaluation" in report and "| demo_en (0.25) | demo_zh (0.25) |" in report
    assert "| zh_tiny_cpt_replay0.3 | cpt_replay0.3 | 30% | " in report
    assert f"{acc['acc_norm']:.3f} ({acc['acc']:.3f}) |" in report
    assert "![zh downstream](plots/zh_downstream.png)" in report
    with open(out / "plots" / "zh_downstream.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"
    # current eval.json files are kept; a stale one (another iteration) is redone
    assert evaluate_pending(cfg, runs) == 0
    stale = dict(ev, iteration=1)
    with open(os.path.join(run.run_dir, EVAL_FILE), "w", encoding="utf-8") as f:
        json.dump(stale, f)
    assert evaluate_pending(cfg, runs) == 1
    assert json.loads(open(os.path.join(run.run_dir, EVAL_FILE)).read())["iteration"] == \
        run.train_iters
    # what print/slurm commands run after training: scores the run again, the same
    os.remove(os.path.join(run.run_dir, EVAL_FILE))
    assert run_study.main(["--config", EXAMPLE, "--out", str(out), "--evaluate-run",
                           run.name]) == 0
    assert json.loads(open(os.path.join(run.run_dir, EVAL_FILE)).read())["tasks"] == ev["tasks"]


def test_downstream_config_forms(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"context": "a", "choices": ["b", "c"], "gold": 0}\n')
    for tasks in ({"t": "t.jsonl"}, ["t=t.jsonl"]):
        cfg = study.load_config(_write(tmp_path, downstream={"tasks": tasks}))
        assert cfg.downstream == {"tasks": {"t": str(tmp_path / "t.jsonl")}, "lm_eval_tasks": [],
                                  "demo_items": 0, "languages": ["en", "zh"], "batch_size": 16}
    assert study.load_config(_write(tmp_path)).downstream == {}


def test_downstream_in_slurm_scripts_after_each_final_run_only(tmp_path):
    """Dry run (no Slurm needed): each end-of-schedule run's array task evaluates it after
    training; WSD stable trunks are not evaluated; the analysis job catches what is left."""
    path = _write(tmp_path, launch="slurm", kinds=["cpt"], design="wsd", budgets=[20, 40],
                  downstream={"demo_items": 4})
    assert run_study.main(["--config", path, "--dry-run"]) == 0
    sdir = tmp_path / "o" / "slurm"
    source, target, branch = ((sdir / f"{s}.sbatch").read_text()
                              for s in ("source", "target", "branch"))
    assert source.rstrip().count("--evaluate-run en_tiny_source\n") == 1
    assert "zh_tiny_cpt_stable" in target and "--evaluate-run" not in target
    for b in ("20", "40"):
        assert f"--evaluate-run zh_tiny_cpt_d{b}\n" in branch
    assert "--fit-only" in (sdir / "analysis.sbatch").read_text()


def test_downstream_bad_task_file_is_a_one_line_run_error(example, tmp_path):
    import dataclasses

    from megacpt.study.downstream import evaluate_run

    out, cfg, runs = example
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["b"], "gold": 3}\n')
    cfg2 = dataclasses.replace(cfg, downstream={**cfg.downstream, "tasks": {"bad": str(bad)}})
    with pytest.raises(RuntimeError, match=f"run zh_tiny_cpt: downstream evaluation: {bad}:1"):
        evaluate_run(cfg2, next(r for r in runs if r.name == "zh_tiny_cpt"))


def test_rerun_skips_finished_runs_and_redoes_a_missing_one(example):
    out, cfg, runs = example
    victim = next(r for r in runs if r.name == "zh_tiny_scratch")
    others = {r.name: os.path.getmtime(os.path.join(r.run_dir, "metrics.jsonl"))
              for r in runs if r is not victim}
    evals = {r.name: os.path.getmtime(os.path.join(r.run_dir, "eval.json")) for r in runs}
    os.remove(os.path.join(victim.ckpt_dir, "latest_checkpointed_iteration.txt"))
    assert not study.run_finished(victim)
    # print mode lists only what is left and fits nothing yet
    os.remove(out / "report.md")
    assert run_study.main(["--config", EXAMPLE, "--out", str(out), "--launch", "print"]) == 0
    cmds = [ln for ln in (out / "commands.sh").read_text().splitlines()
            if "megacpt.train" in ln and not ln.startswith("#")]
    assert len(cmds) == 1 and f"--log-dir {victim.run_dir} " in cmds[0]
    assert cmds[0].endswith(f"--out {out} --evaluate-run {victim.name}")  # after training
    assert not (out / "report.md").exists()
    assert run_study.main(["--config", EXAMPLE, "--out", str(out)]) == 0
    assert study.run_finished(victim) and (out / "report.md").is_file()
    for r in runs:
        if r is not victim:
            assert os.path.getmtime(os.path.join(r.run_dir, "metrics.jsonl")) == others[r.name]
    # the retrained run is scored anew; the others' downstream scores are kept
    assert {r.name for r in runs if os.path.getmtime(os.path.join(r.run_dir, "eval.json"))
            != evals[r.name]} == {victim.name}


def _write(tmp_path, **fields):
    base = {"out_dir": str(tmp_path / "o"), "sizes": ["tiny"], "target_langs": ["zh"],
            "data": {"corpus_dir": os.path.join(REPO, "examples", "data"), "vocab_size": 2048}}
    base.update(fields)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(base))
    return str(path)


@pytest.mark.parametrize("fields, words", [
    ({"sizez": ["tiny"]}, ["unknown fields", "sizez"]),
    ({"sizes": ["tiny", "huge"]}, ["field 'sizes'", "unknown sizes ['huge']"]),
    ({"replay_ratios": [0.0, 1.5]}, ["field 'replay_ratios'", "[0, 1)"]),
    ({"kinds": ["scratch", "distill"]}, ["field 'kinds'"]),
    ({"launch": "kubernetes"}, ["field 'launch'", "local"]),
    ({"target_langs": ["en"]}, ["field 'target_langs'"]),
    ({"global_batch_size": 12, "micro_batch_size": 8}, ["field 'global_batch_size'"]),
    ({"seq_length": "long"}, ["field 'seq_length'", "expected int"]),
    ({"data": {"corpus_dir": "/nonexistent"}}, ["field 'data.corpus_dir'", "en_train"]),
    ({"data": {"tokenizer_model": "t.model", "train": {"en": "x"}, "valid": {}}},
     ["field 'data.train'", "'zh'"]),
    ({"downstream": 5}, ["field 'downstream'", "expected a mapping"]),
    ({"downstream": {"demo_item": 4}}, ["field 'downstream'", "unknown keys ['demo_item']"]),
    ({"downstream": {"tasks": {"x": "missing.jsonl"}}},
     ["field 'downstream.tasks.x'", "missing.jsonl not found"]),
    ({"downstream": {"tasks": {"x": 3}}}, ["field 'downstream.tasks.x'", "NAME.jsonl"]),
    ({"downstream": {"tasks": ["x.jsonl"]}}, ["field 'downstream.tasks'", "NAME=FILE.jsonl"]),
    ({"downstream": {"demo_items": 4, "languages": ["de"]}}, ["field 'downstream.languages'"]),
    ({"downstream": {"demo_items": 4, "batch_size": 0}}, ["field 'downstream'", "batch_size"]),
    ({"downstream": {"languages": ["zh"]}}, ["field 'downstream'", "no tasks"]),
    ({"downstream": {"demo_items": 4}, "data": {
        "tokenizer_model": "t.model", "train": {"en": "a", "zh": "b"},
        "valid": {"en": "c", "zh": "d"}}}, ["field 'downstream.demo_items'", "corpus_dir"]),
])
def test_config_errors_name_file_and_field(tmp_path, fields, words):
    path = _write(tmp_path, **fields)
    with pytest.raises(study.StudyConfigError) as e:
        study.load_config(path)
    assert str(e.value).startswith(path)
    for w in words:
        assert w in str(e.value)


def test_plan_and_print_mode_without_training(tmp_path):
    fields = dict(sizes=["tiny", "debug-s"], target_langs=["zh", "fr"], kinds=["cpt"],
                  replay_ratios=[0.0, 0.25], launch="print",
                  launcher="torchrun --nproc-per-node 8 -m megacpt.train",
                  extra_args=["--save-interval", "500"])
    path = _write(tmp_path, **fields)
    assert run_study.main(["--config", path]) == 0  # nothing runs: commands only
    cfg = study.load_config(path)
    runs = study.plan_runs(cfg, 2048)
    assert [r.name for r in runs] == [
        "en_tiny_source", "en_debug-s_source", "zh_tiny_cpt", "zh_tiny_cpt_replay0.25",
        "zh_debug-s_cpt", "zh_debug-s_cpt_replay0.25", "fr_tiny_cpt", "fr_tiny_cpt_replay0.25",
        "fr_debug-s_cpt", "fr_debug-s_cpt_replay0.25"]
    replay = runs[3].argv
    blend = replay[replay.index("--data-path") + 1: replay.index("--split")]
    assert blend[0] == "0.75" and blend[1].startswith("zh=") and blend[2] == "0.25" \
        and blend[3].startswith("en=")
    assert replay[replay.index("--save-interval") + 1] == "500"  # extra_args
    lines = (tmp_path / "o" / "commands.sh").read_text().splitlines()
    body = [ln for ln in lines if ln and not ln.startswith("#") and ln != "set -e"]
    assert body[0].startswith("python -m megacpt.data.tokenizer_train --input")
    assert len(body) == 7 + 10  # tokenizer + 3 languages x 2 splits, 2 sources + 8 targets
    assert all(ln.startswith("torchrun --nproc-per-node 8 -m megacpt.train") for ln in body[7:])
    assert "--init-from" not in body[7] and "--init-from" in body[9]
    assert not (tmp_path / "o" / "runs").exists()
    # the same out_dir with changed flags is refused once a run has started
    os.makedirs(runs[0].run_dir)
    changed = study.load_config(_write(tmp_path, **fields, lr=1e-3))
    with pytest.raises(study.StudyConfigError, match="en_tiny_source .* other flags"):
        study.check_plan(changed, study.plan_runs(changed, 2048))


def test_fit_quality_flags_what_the_data_cannot_determine():
    from megacpt.scaling import Points, chinchilla, fit_law

    def points(ns):
        N = np.repeat(ns, 6)
        D = np.tile(np.geomspace(1e8, 1e10, 6), len(ns))
        loss = 1.7 + 400 / N ** 0.34 + 410 / D ** 0.28
        return Points(N, D, loss, 6 * N * D, np.repeat([str(n) for n in ns], 6))

    good = points([1e7, 3e7, 1e8, 3e8, 1e9])
    fit = fit_law(chinchilla(), good.loss, N=good.N, D=good.D)
    assert fit["alpha"] == pytest.approx(0.34, rel=1e-3)
    assert study.fit_quality(fit, good, 5) == []
    two = points([1e7, 1e9])
    notes = study.fit_quality(fit_law(chinchilla(), two.loss, N=two.N, D=two.D), two, 5)
    assert any("only 2 model sizes" in n for n in notes)
    bad = dict(fit, allocation=None, beta=0.1, gamma=0.2)
    assert any("no finite compute-optimal allocation" in n
               for n in study.fit_quality(bad, good, 5))


def _fake_metrics(run, D, losses, en_losses=None):
    """A metrics.jsonl in the trainer's format whose validation losses are given."""
    os.makedirs(run.run_dir, exist_ok=True)
    rows = [{"type": "header", "model_size": run.size, "num_parameters": run.num_parameters,
             "run_kind": "cpt" if run.kind == "cpt" else "scratch", "target": run.lang,
             "blend": {run.lang: 1.0}}]
    for i, (d, loss) in enumerate(zip(D, losses), 1):
        rows.append({"type": "train", "iteration": i, "consumed_tokens": int(d),
                     "consumed_tokens_per_dataset": {run.lang: int(d)}})
        rows.append({"type": "valid", "name": run.lang, "iteration": i, "loss": loss,
                     "consumed_tokens": int(d), "flops": 6.0 * run.num_parameters * d})
        if en_losses is not None:
            rows.append({"type": "valid", "name": "en", "iteration": i, "loss": en_losses[i - 1],
                         "consumed_tokens": int(d), "flops": 6.0 * run.num_parameters * d})
    with open(os.path.join(run.run_dir, "metrics.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_analysis_recovers_known_laws_and_reports_them(tmp_path):
    """Runs whose losses follow the paper's laws exactly: the study's fits find the laws."""
    path = _write(tmp_path, sizes=["tiny", "debug-xs", "debug-s"], replay_ratios=[0.0],
                  fit={"bootstrap": 20, "checkpoints": "all"})
    cfg = study.load_config(path)
    runs = study.plan_runs(cfg, 2048)
    scratch = {"E": 1.55, "A": 420.0, "B": 719.5, "alpha": 0.40, "beta": 0.30}
    cpt = {**scratch, "B": 433.3, "beta": 0.20, "gamma": 0.08}
    D = np.geomspace(2e5, 2e6, 5)
    for r in runs:
        n = r.num_parameters
        law = cpt if r.kind == "cpt" else scratch
        loss = law["E"] + law["A"] / n ** law["alpha"] + \
            law["B"] / (D ** law["beta"] * n ** law.get("gamma", 0.0))
        _fake_metrics(r, D, loss.tolist(), en_losses=[3.0 + 0.1 * k for k in range(5)]
                      if r.kind != "scratch" else None)
    res = study.analyze_language(cfg, runs, "zh")
    fit_s, fit_c = res["fits"]["scratch"], res["fits"]["cpt"]
    for k, v in scratch.items():
        assert fit_s[k] == pytest.approx(v, rel=1e-3), k
    for k in ("B", "beta", "gamma"):
        assert fit_c[k] == pytest.approx(cpt[k], rel=1e-3), k
    assert fit_s["quality_notes"] == [] and fit_c["quality_notes"] == []
    assert fit_c["allocation"]["a"] == pytest.approx(0.20 / (0.40 + 0.20 - 0.08), rel=1e-3)
    assert all(f > 0 for f in res["transfer"]["cpt"]["pairs"][0]["flops_saved"])
    assert [row["final_source_loss"] for row in res["forgetting"]] == pytest.approx([3.4] * 3)
    results = {"source_lang": "en", "runs": [], "languages": {"zh": res}}
    files = run_study.make_plots(results, str(tmp_path))["zh"]
    assert os.path.join(str(tmp_path), "plots", "zh_isoloss.png") in files
    assert all(os.path.getsize(f) > 1000 for f in files)
    res["fits"]["cpt"] = {"law": "cpt", "error": "no points"}
    report = run_study.write_report(cfg, results, {"zh": files})
    text = open(report, encoding="utf-8").read()
    assert "| cpt | cpt | - |" in text and "not fitted: no points" in text
    assert f"{fit_s['allocation']['N_coef']:.3g} C^{fit_s['allocation']['a']:.3f}" in text


def test_wsd_design_branches_cooldowns_from_one_stable_run(tmp_path):
    """design wsd: a stable run saves where each cooldown starts; each branch resumes there
    (same weights, data position, tokens) and decays to min_lr at exactly its budget."""
    path = _write(tmp_path, sizes=["tiny"], kinds=["scratch"], design="wsd",
                  budgets=[0.02, 0.04], cooldown_fraction=0.25, seq_length=32,
                  micro_batch_size=4, global_batch_size=4, lr=3e-3, evals_per_run=2,
                  eval_iters=1, device="cpu", threads=1, data={
                      "corpus_dir": os.path.join(REPO, "examples", "data"), "vocab_size": 2048,
                      "character_coverage": 0.99})
    assert run_study.main(["--config", path]) == 0
    cfg = study.load_config(path)
    runs = {r.name: r for r in study.plan_runs(cfg, 2048)}
    assert set(runs) == {"zh_tiny_scratch_stable", "zh_tiny_scratch_d0.02",
                         "zh_tiny_scratch_d0.04"}
    stable = runs["zh_tiny_scratch_stable"]
    n = stable.num_parameters
    for b in (0.02, 0.04):
        br = runs[f"zh_tiny_scratch_d{b:g}"]
        end = math.ceil(b * n / (4 * 32))
        start = end - round(0.25 * end)
        assert (br.role, br.train_iters, br.branch_iter) == ("branch", end, start)
        assert os.path.isdir(os.path.join(stable.ckpt_dir, f"iter_{start:07d}"))
        train = read_metrics(br.run_dir, "train")
        assert train[0]["iteration"] == start + 1 and train[-1]["iteration"] == end
        assert train[-1]["consumed_tokens"] == end * 4 * 32  # the budget, exactly
        assert train[-1]["lr"] == pytest.approx(3e-4)  # decayed to min_lr
        assert all(r["lr"] < 3e-3 for r in train)
        # the branch continues the stable run's data position: its first step is step start+1
        assert train[0]["consumed_tokens"] == (start + 1) * 4 * 32
    assert stable.train_iters == max(r.branch_iter for r in runs.values() if r.branch_iter)
    assert all(r["lr"] == pytest.approx(3e-3) for r in read_metrics(stable.run_dir, "train")
               if r["iteration"] > round(0.05 * math.ceil(0.02 * n / 128)))
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    pts = res["languages"]["zh"]["points"]["scratch"]
    assert len(pts["loss"]) == 2  # end-of-schedule points only: one per branch
    assert "end-of-schedule losses only" in (tmp_path / "o" / "report.md").read_text()
