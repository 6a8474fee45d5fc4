"""The paper's protocol in a study config: batch sizes by size, held-out samples across the
set, Figure 4, the cross-language summary and FLOPs saved with the source model's compute."""
import json
import os

import numpy as np
import pytest
import yaml

from megacpt import study
from megacpt.data.indexed import IndexedDataset, IndexedDatasetBuilder, bin_path, idx_path
from megacpt.study.run import sample_heldout

from _harness import load_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER = os.path.join(REPO, "examples", "study_paper.yaml")


def _tool():
    return load_script("tools/run_study.py")


def test_paper_config_plans_batch_sizes_budgets_and_slurm_scripts(tmp_path):
    cfg = study.load_config(PAPER, str(tmp_path / "o"))
    runs = study.plan_runs(cfg, 36152)
    by = {r.name: r for r in runs}
    for name, tokens in (("fr_49M_scratch_stable", 1 << 20), ("zh_1393M_cpt_d20", 2 << 20),
                         ("ru_2791M_cpt_replay0.3_d5", 4 << 20), ("en_992M_source", 1 << 20)):
        c, _ = by[name].resolved()
        assert c.training.global_batch_size * c.model.seq_length == tokens, name
    c, _ = by["zh_1393M_cpt_d40"].resolved()
    n = c.model.num_parameters()
    assert by["zh_1393M_cpt_d40"].train_iters == -(-40 * n // (2 << 20))
    assert c.training.eval_iters == -(-1_000_000 // (4 * 2048))  # 10^6 held-out tokens
    assert c.optim.lr_decay_style == "WSD" and c.parallel.use_distributed_optimizer
    assert c.data.valid_data_path["zh"].endswith("zh_heldout_sample")
    assert len(runs) == 12 + 3 * 12 * 4 * 5  # sources + langs x sizes x 4 strategies x (1 + 4)
    assert run_study_dry(tmp_path) == 0
    branch = (tmp_path / "o" / "slurm" / "branch.sbatch").read_text()
    assert "#SBATCH --gres=gpu:8" in branch and "--prepare-run" in branch
    assert "torchrun --nproc-per-node 8 -m megacpt.train" in branch


def run_study_dry(tmp_path):
    return _tool().main(["--config", PAPER, "--out", str(tmp_path / "o"), "--dry-run"])


def test_heldout_sample_spans_the_set(tmp_path):
    """valid_tokens: whole documents drawn across the held-out set, enough for the evaluation."""
    prefixes = {}
    for lang in ("en", "zh"):
        p = str(tmp_path / f"{lang}_valid")
        b = IndexedDatasetBuilder(bin_path(p), np.uint16)
        for d in range(300):
            b.add_item(np.full(20 + d % 7, d, dtype=np.uint16))
            b.end_document()
        b.finalize(idx_path(p))
        prefixes[lang] = p
    cfg_path = tmp_path / "s.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "out_dir": str(tmp_path / "o"), "sizes": ["tiny"], "target_langs": ["zh"],
        "seq_length": 16, "micro_batch_size": 2, "global_batch_size": 2, "eval_iters": None,
        "valid_tokens": 1000, "data": {"tokenizer_model": "t.model", "train": prefixes,
                                       "valid": prefixes}}))
    cfg = study.load_config(str(cfg_path))
    got = sample_heldout(cfg)
    need = 32 * 2 * 16 + 1  # ceil(1000 / 32) micro-batches of 2 x 16 tokens, + 1 label
    for lang in ("en", "zh"):
        ds = IndexedDataset(study.data_files(cfg)["valid"][lang])
        docs = [int(ds[i][0]) for i in range(len(ds))]  # each document holds its own index
        assert got[lang] == ds.num_tokens >= need > ds.num_tokens - 27
        assert docs == sorted(docs) and len(set(docs)) == len(docs)
        assert min(docs) < 60 and max(docs) > 240  # across the set, not its first documents
    assert sample_heldout(cfg) == got  # kept


def _fake(run, D, loss, en_loss, en_tokens):
    os.makedirs(run.run_dir, exist_ok=True)
    rows = [{"type": "header", "model_size": run.size, "num_parameters": run.num_parameters,
             "run_kind": "cpt" if run.kind == "cpt" else "scratch", "target": run.lang,
             "blend": {run.lang: 1.0}}]
    for i, (d, l_, e, t) in enumerate(zip(D, loss, en_loss, en_tokens), 1):
        rows.append({"type": "train", "iteration": i, "consumed_tokens": int(d + t),
                     "consumed_tokens_per_dataset": {run.lang: int(d), "en": int(t)}})
        for name, v in ((run.lang, l_), ("en", e)):
            rows.append({"type": "valid", "name": name, "iteration": i, "loss": v,
                         "consumed_tokens": int(d + t), "flops": 6.0 * run.num_parameters * d})
    with open(os.path.join(run.run_dir, "metrics.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_figure4_cross_language_and_flops_with_source(tmp_path):
    cfg_path = tmp_path / "s.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "out_dir": str(tmp_path / "o"), "sizes": ["tiny", "debug-xs", "debug-s"],
        "target_langs": ["fr", "zh"], "replay_ratios": [0.0, 0.3], "budgets": [1, 2, 4],
        "fit": {"bootstrap": 0},
        "data": {"corpus_dir": os.path.join(REPO, "examples", "data"), "vocab_size": 2048}}))
    cfg = study.load_config(str(cfg_path))
    runs = study.plan_runs(cfg, 2048)
    law = {"E": 1.5, "A": 400.0, "B": 700.0, "alpha": 0.4, "beta": 0.3}
    for r in runs:
        n, d = r.num_parameters, np.geomspace(0.2, 1, 4) * r.budget * r.num_parameters
        loss = law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"] * (
            0.8 if r.kind == "cpt" else 1.0)
        share = {"cpt": r.replay / (1 - r.replay), "source": 1.0}.get(r.kind, 0.0)
        _fake(r, d, loss, 3.0 + 0.1 * np.arange(4), d * share)
    from megacpt.study.analysis import analyze_language, cross_language

    res = {"name": "t", "source_lang": "en", "runs": [],
           "languages": {x: analyze_language(cfg, runs, x) for x in ("fr", "zh")}}
    res["cross_language"] = cross_language(res)
    assert [row["lang"] for row in res["cross_language"]] == ["fr", "zh"]
    zh = res["languages"]["zh"]
    fig4 = {row["run"]: row for row in zh["figure4"]}
    row = fig4["zh_debug-s_cpt_replay0.3_d4"]
    n = row["N"]
    assert row["target"]["C"] == pytest.approx(
        (6 * n * np.geomspace(0.2, 1, 4) * 4 * n).tolist(), rel=1e-6)
    assert row["source"]["C"] == pytest.approx([c * 0.3 / 0.7 for c in row["target"]["C"]],
                                               rel=1e-3)
    assert fig4["zh_tiny_cpt_d1"]["source"]["C"] == []  # no replay: no source compute
    t = zh["transfer"]["cpt"]
    assert t["summary"]["flops_saved_median"] > 0
    for p in t["pairs"]:
        src = next(r for r in runs if r.kind == "source" and r.num_parameters == p["N"])
        c_src = 6.0 * src.num_parameters * src.train_iters * 1024 * 2048
        assert p["C_source"] == pytest.approx(c_src)
        assert np.allclose(np.array(p["flops_saved"]) - np.array(p["flops_saved_with_source"]),
                           c_src / np.array(p["C_scratch"]))
    from megacpt.study.report import plot_figure4, write_report

    png = plot_figure4(zh["figure4"], "en", "zh", str(tmp_path / "fig4.png"))
    assert os.path.getsize(png) > 1000
    report = open(write_report(cfg, res, {"zh": [png]}), encoding="utf-8").read()
    assert "## Across target languages" in report and "| fr |" in report
    assert "counting the source model's compute" in report


def test_report_lists_downstream_evaluation_of_runs_that_have_one():
    from megacpt.study.report import eval_section

    row = {"lang": "zh", "size": "49M", "kind": "cpt", "strategy": "cpt_replay0.3",
           "replay": 0.3, "budget": 20.0, "iteration": 9}
    ds = {"tasks": {"xnli_zh": "lm_eval:xnli_zh", "xcopa_zh": "x.jsonl"},
          "chance": {"xcopa_zh": 0.5},
          "runs": [{**row, "run": "zh_49M_cpt_replay0.3", "tasks": {
              "xnli_zh": {"acc": 0.41}, "xcopa_zh": {"acc": 0.55, "acc_norm": 0.6}}},
              {**row, "run": "zh_49M_cpt", "replay": 0.0, "strategy": "cpt", "tasks": {}}]}
    lines = eval_section({"downstream": ds})
    assert lines[0] == "## Downstream evaluation"
    assert lines[4] == "| run | strategy | replay | xnli_zh | xcopa_zh (0.50) |"
    assert lines[6] == "| zh_49M_cpt_replay0.3 | cpt_replay0.3 | 30% | 0.410 (0.410) | " \
                       "0.600 (0.550) |"
    assert lines[7] == "| zh_49M_cpt | cpt | 0% | - | - |"
    assert eval_section({"downstream": None}) == [] and eval_section({}) == []


def test_downstream_bars_per_size_budget_kind_and_replay(tmp_path):
    from megacpt.study.report import plot_downstream_bars

    rows = [{"run": f"en_{n}_source", "lang": "en", "size": n, "kind": "source",
             "strategy": "source", "replay": 0.0, "budget": 40.0,
             "tasks": {"demo_zh": {"acc": 0.3, "acc_norm": 0.3}}} for n in ("49M", "86M")]
    for n in ("49M", "86M"):
        for b in (20.0, 40.0):
            for kind, r in (("scratch", 0.0), ("cpt", 0.0), ("cpt", 0.3)):
                strategy = kind if not r else f"cpt_replay{r:g}"
                rows.append({"run": f"zh_{n}_{strategy}_d{b:g}", "lang": "zh", "size": n,
                             "kind": kind, "strategy": strategy, "replay": r, "budget": b,
                             "tasks": {t: {"acc": 0.4, "acc_norm": 0.5}
                                       for t in ("demo_zh", "demo_en", "xcopa_zh")}})
    ds = {"tasks": {"demo_zh": "a", "demo_en": "b", "xcopa_zh": "c"},
          "chance": {"demo_zh": 0.25}, "runs": rows}
    png = plot_downstream_bars(ds, "zh", "en", str(tmp_path / "zh_downstream.png"))
    assert os.path.getsize(png) > 5000
    assert plot_downstream_bars(ds, "fr", "de", str(tmp_path / "fr.png")) is None  # no runs


def test_demo_config_plans_and_its_committed_output_is_identifiable(tmp_path):
    cfg = study.load_config(os.path.join(REPO, "examples", "study_demo.yaml"), str(tmp_path))
    runs = study.plan_runs(cfg, 512)
    assert len(runs) == 4 + 4 * 2 * (1 + 4) and len(cfg.sizes) == 4
    assert sum(r.end_of_schedule and r.kind == "scratch" for r in runs) == 16
    out = os.path.join(REPO, "examples", "study_demo_output")
    for name, keys in (("fr_fit_scratch.json", ("E", "A", "B", "alpha", "beta")),
                       ("fr_fit_cpt.json", ("B", "beta", "gamma"))):
        with open(os.path.join(out, "fits", name), encoding="utf-8") as f:
            fit = json.load(f)
        assert fit["identifiable"] and all(fit[k] > 0 for k in keys), name
        assert fit["intervals"]["beta"][0] > 0 and "warnings" in fit
    assert "95% intervals" in open(os.path.join(out, "report.md"), encoding="utf-8").read()
